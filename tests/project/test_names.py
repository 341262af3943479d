"""Text names and ``text_at``: names given, defaulted and refused; the text holding
an address in any allocator, checked against a brute-force model on random
histories, from several threads, without keeping freed texts alive."""

from __future__ import annotations

import ctypes
import gc
import os
import random
import threading
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import execmem
from execmem import BadNameError, JitText, TextState, _gates
from execmem._names import MAX_NAME

#: Freed addresses reused at once (the verification catalog's no-quarantine spec).
NO_QUARANTINE = execmem.arch.get("x86_64").without_quarantine()


def test_names_given_and_defaulted(make_allocator: Any) -> None:
    _, a = make_allocator()
    t = a.jit_text_alloc(16, name="answer")
    u = a.jit_text_alloc(16)
    assert t.name == "answer"
    assert u.name == f"jit_{u.address:x}" and u.name.isidentifier()
    assert repr(t).startswith("<JitText 'answer' RESERVED at ")
    assert repr(u).startswith("<JitText RESERVED at ")
    many = a.jit_text_alloc_many([16, 32, 48], names=["f", None, "h é"])
    assert [x.name for x in many] == ["f", f"jit_{many[1].address:x}", "h é"]
    assert a.jit_text_alloc_many([16, 16], names=iter(["x", "y"]))[1].name == "y"
    t.write(0, b"\xc3")
    t.map()
    t.free()
    assert t.name == "answer"  # a freed text keeps its name (error messages use it)


def _snapshot(a: execmem.Allocator) -> tuple[object, object]:
    return a.stats()["texts"], a.occupancy()


@pytest.mark.parametrize(
    "bad",
    ["", "two\nlines", "nul\x00", "tab\there", "\x7f", "x" * (MAX_NAME + 1), "\ud800"],
    ids=["empty", "newline", "nul", "tab", "del", "too-long", "surrogate"],
)
def test_bad_names_are_refused_and_change_nothing(make_allocator: Any, bad: str) -> None:
    _, a = make_allocator()
    a.jit_text_alloc(16, name="bystander")
    before = _snapshot(a)
    with pytest.raises(BadNameError, match="printable"):
        a.jit_text_alloc(16, name=bad)
    with pytest.raises(BadNameError, match="printable"):
        a.jit_text_alloc_many([16, 16], names=["fine", bad])
    assert _snapshot(a) == before
    assert isinstance(BadNameError("x"), ValueError)


def test_names_of_the_wrong_type_or_count(make_allocator: Any) -> None:
    _, a = make_allocator()
    before = _snapshot(a)
    with pytest.raises(TypeError):
        a.jit_text_alloc(16, name=b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="single string"):
        a.jit_text_alloc_many([16, 16], names="ab")
    with pytest.raises(BadNameError, match="2 sizes but 1 names"):
        a.jit_text_alloc_many([16, 16], names=["a"])
    with pytest.raises(TypeError):
        a.jit_text_alloc_many([16], names=[7])  # type: ignore[list-item]
    assert _snapshot(a) == before
    assert len(a.jit_text_alloc(16, name="x" * MAX_NAME).name) == MAX_NAME


def test_module_level_functions_take_names() -> None:
    t = execmem.jit_text_alloc(16, name="module_level")
    many = execmem.jit_text_alloc_many([16, 16], names=[None, "second"])
    try:
        assert t.name == "module_level" and many[1].name == "second"
        assert execmem.text_at(many[1].address + 15) is many[1]
    finally:
        for text in (t, *many):
            text.free()


# -- text_at ----------------------------------------------------------------------------------


def test_text_at_holds_exactly_the_texts_bytes(make_allocator: Any) -> None:
    _, a = make_allocator()
    t = a.jit_text_alloc(20, align=64)
    u = a.jit_text_alloc(64, align=64)
    assert a.text_at(t.address) is t and a.text_at(t.address + 19) is t
    assert a.text_at(t.address + 20) is None  # the padding up to the next chunk
    assert a.text_at(t.address - 1) is None
    assert a.text_at(u.address + 63) is u
    assert execmem.text_at(u.address) is None  # a MemoryBackend's addresses are not this process's
    assert a.text_at(0) is None and a.text_at(2**64) is None and a.text_at(-5) is None
    with pytest.raises(TypeError):
        a.text_at("0x10")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execmem.text_at(1.5)  # type: ignore[arg-type]


def test_text_at_follows_every_state_and_reuse(make_allocator: Any) -> None:
    _, a = make_allocator(NO_QUARANTINE, pack_size=4096)
    t = a.jit_text_alloc(16)
    assert a.text_at(t.address) is t  # RESERVED
    t.map_rw_inplace()
    assert a.text_at(t.address) is t  # WRITING
    t.finalize()
    assert a.text_at(t.address) is t  # LIVE
    address = t.address
    t.free()
    assert a.text_at(address) is None
    u = a.jit_text_alloc(16)
    assert u.address == address  # no quarantine here: the address is reused at once
    assert a.text_at(address) is u  # the index built before is stale, and noticed
    a.close()
    assert a.text_at(address) is None and execmem.text_at(address) is None


def test_text_at_searches_every_allocator_of_the_process() -> None:
    with execmem.Allocator() as a, execmem.Allocator(pack_size=1 << 16) as b:
        ta, tb = a.jit_text_alloc(16), b.jit_text_alloc(16)
        ta.map()
        assert execmem.text_at(ta.address) is ta
        assert execmem.text_at(tb.address + 4) is tb
    assert execmem.text_at(ta.address) is None


def test_text_at_does_not_keep_freed_texts_alive(make_allocator: Any) -> None:
    _, a = make_allocator()
    texts = a.jit_text_alloc_many([16] * 10)
    assert a.text_at(texts[3].address) is texts[3]  # the index now holds all ten
    ref = weakref.ref(texts[3])
    texts[3].free()
    del texts[3]
    gc.collect()
    assert ref() is None
    assert a.text_at(texts[2].address) is texts[2]


def test_text_at_during_a_deferred_free(make_allocator: Any) -> None:
    """A text freed while a call runs in it (its bytes stay until the call returns)
    is no longer anyone's: ``text_at`` says None, also after the index is rebuilt."""
    _, a = make_allocator()
    t = a.jit_text_alloc(16)
    t.map()
    t._slot = _gates.gate_pool().slot(t)  # what function() does first
    counter = ctypes.c_int64.from_address(t._slot.address)
    counter.value = 1  # what a call gate does for a call in flight
    t.free()
    assert a.stats()["events"]["frees_deferred"] == 1
    assert a.text_at(t.address) is None
    assert a.text_at(t.address) is None
    counter.value = 0  # the call returned: the next verb reclaims the text
    a.stats()
    assert not a._pinned and a.text_at(t.address) is None


def test_text_at_on_random_histories_matches_a_brute_force_model(make_allocator: Any) -> None:
    rng = random.Random(13)
    _, a = make_allocator("x86_64" if rng.random() < 0.5 else NO_QUARANTINE, pack_size=1 << 14)
    live: list[JitText] = []
    probes = 0
    for _ in range(400):
        roll = rng.random()
        if roll < 0.3 or not live:
            live.append(a.jit_text_alloc(rng.randint(1, 300), align=rng.choice((16, 64))))
        elif roll < 0.45:
            live += a.jit_text_alloc_many([rng.randint(1, 200) for _ in range(rng.randint(1, 8))])
        elif roll < 0.7:
            live.pop(rng.randrange(len(live))).free()
        elif roll < 0.8:
            fresh = [t for t in live if t.state is TextState.RESERVED]
            if fresh:
                execmem.publish(rng.sample(fresh, rng.randint(1, len(fresh))))
        else:
            for _ in range(20):
                if live and rng.random() < 0.7:
                    near = rng.choice(live)
                    address = near.address + rng.randint(-80, near.size + 80)
                else:
                    address = rng.randrange(0, 1 << 48)
                expected = [t for t in live if t.address <= address < t.address + t.size]
                assert len(expected) <= 1
                assert a.text_at(address) is (expected[0] if expected else None)
                probes += 1
    assert probes > 500


def test_text_at_from_threads_while_texts_come_and_go(make_allocator: Any) -> None:
    _, a = make_allocator()
    stop = threading.Event()
    errors: list[BaseException] = []
    anchors = a.jit_text_alloc_many([64] * 32)

    def look() -> None:
        rng = random.Random(threading.get_ident())
        try:
            while not stop.is_set():
                anchor = rng.choice(anchors)
                found = a.text_at(anchor.address + 10)
                assert found is anchor
                other = a.text_at(rng.randrange(anchors[0].address, anchors[-1].address + (1 << 14)))
                assert other is None or other.state is not TextState.FREED or other._inflight
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=look) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        rng = random.Random(5)
        churn: list[JitText] = []
        for _ in range(600):
            if churn and rng.random() < 0.5:
                churn.pop(rng.randrange(len(churn))).free()
            else:
                churn.append(a.jit_text_alloc(rng.randint(1, 256)))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_text_at_in_a_forked_child() -> None:
    with execmem.Allocator(pack_size=1 << 16) as a:
        t = a.jit_text_alloc(16)
        pid = os.fork()
        if pid == 0:  # the child: the parent's allocator holds nothing for text_at
            code = 1
            try:
                assert execmem.text_at(t.address) is None
                with pytest.raises(execmem.ForkedProcessError):
                    a.text_at(t.address)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert execmem.text_at(t.address) is t


PROPERTY = settings(parent=settings.get_profile("execmem"))


def _memory_allocator() -> execmem.Allocator:
    from execmem._memory_backend import MemoryBackend

    return execmem.Allocator(backend=MemoryBackend("x86_64"))


@PROPERTY
@given(name=st.text(max_size=MAX_NAME + 2))
def test_any_string_is_a_name_or_a_clear_error(name: str) -> None:
    a = _memory_allocator()
    before = _snapshot(a)
    try:
        text = a.jit_text_alloc(16, name=name)
    except BadNameError:
        assert not (name and len(name) <= MAX_NAME and name.isprintable())
        assert _snapshot(a) == before
    else:
        assert text.name == name and name.isprintable()
    finally:
        a.close()
        a.backend.close()


@PROPERTY
@given(address=st.integers(min_value=-(2**70), max_value=2**70), offset=st.integers(0, 200))
def test_any_integer_is_answered(address: int, offset: int) -> None:
    a = _memory_allocator()
    try:
        t = a.jit_text_alloc(100)
        for probe in (address, t.address + offset - 50):
            assert a.text_at(probe) is (t if t.address <= probe < t.address + 100 else None)
    finally:
        a.close()
        a.backend.close()
