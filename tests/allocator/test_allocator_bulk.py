"""jit_text_alloc_many and publish(texts, codes): placement, coalesced writes, one
synchronization, and bad input that changes nothing."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from programs import CONST_SIZE, const, needs_programs

import execmem
from execmem import TextState
from execmem._errors import AlignmentError, BadStateError, OutOfBoundsError, OutOfMemoryError

RET = [bytes([0xB8, k, 0, 0, 0, 0xC3]) for k in range(256)]  # mov eax, k; ret


def state(backend: Any, a: execmem.Allocator) -> tuple[object, ...]:
    """Everything bad input must leave unchanged."""
    st = a.stats()
    return (st["totals"], st["texts"], a.occupancy(), backend.snapshot(), len(backend.calls))


def test_texts_are_side_by_side_and_like_single_allocations(make_allocator: Any) -> None:
    _, a = make_allocator("x86_64")
    sizes = [16, 64, 65, 1, 130, 40]
    texts = a.jit_text_alloc_many(sizes)
    assert [t.size for t in texts] == sizes
    assert all(t.state is TextState.RESERVED and t.address % 16 == 0 for t in texts)
    assert all(t.read() == b"\xcc" * t.size for t in texts)
    chunks = [-(-s // 64) for s in sizes]
    for t, nxt, n in zip(texts, texts[1:], chunks, strict=False):
        assert nxt.address == t.address + 64 * n
    assert a.stats()["totals"]["live_bytes"] == 64 * sum(chunks)
    # The chunk map holds one allocation per text: each frees on its own.
    texts[2].free()
    single = a.jit_text_alloc(128)
    assert single.address == texts[2].address  # first fit, into the unmapped hole
    for t in texts[:2] + texts[3:]:
        t.free()


def test_alignment_is_honoured_for_every_text(make_allocator: Any) -> None:
    _, a = make_allocator("arm64")
    texts = a.jit_text_alloc_many([8, 100, 4, 300], align=256)
    assert all(t.address % 256 == 0 for t in texts)
    assert all(t.read() == a.arch.trap_bytes(t.size) for t in texts)
    assert len({t.address for t in texts}) == 4


def test_more_than_half_a_pack_is_split_and_big_texts_get_their_own_reservation(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=1 << 16)
    sizes = [64] * 600 + [40_000] + [64] * 600  # 1200 chunks of 1024 per pack, and one dedicated
    texts = a.jit_text_alloc_many(sizes)
    st = a.stats()
    assert st["events"]["dedicated_reserved"] == 1
    assert st["totals"]["packs"] == 3
    assert len({t.address for t in texts}) == len(sizes)
    a.publish(texts, [RET[i % 256] for i in range(len(texts))])
    assert all(t.state is TextState.LIVE for t in texts)
    assert backend.read(texts[-1].address, 6) == RET[(len(texts) - 1) % 256]


def test_publish_with_codes_coalesces_writes_and_syncs_once(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64")
    warm = a.jit_text_alloc(16)
    warm.map()  # the pack is mapped: the next publish needs remote_cse
    texts = a.jit_text_alloc_many([12] * 50)
    codes = [bytes([i]) * 12 for i in range(50)]
    mark = len(backend.calls)
    a.publish(texts, codes)
    writes = [c for c in backend.calls[mark:] if c[0] == "write"]
    assert len(writes) == 1  # adjacent texts: one store for the run
    assert backend.remote_cse_count == 1
    for t, code in zip(texts, codes, strict=True):
        assert t.read() == code and backend.read(t.address, 12) == code
        assert backend.read(t.address + 12, 4) == a.arch.trap_bytes(4)  # padding is trap filler
    # Cache maintenance covers the run as one range (the filler between is harmless).
    ranges = [r for name, r in backend.steps[-6:] if name == "clean_dcache"]
    assert ranges == [((texts[0].address, texts[-1].address + 12 - texts[0].address),)]


@pytest.mark.parametrize("order", ["forward", "reversed", "shuffled"])
def test_texts_in_any_order_are_written_as_one_run(make_allocator: Any, order: str) -> None:
    backend, a = make_allocator("arm64")
    warm = a.jit_text_alloc(16)
    warm.map()
    texts = a.jit_text_alloc_many([12] * 20)
    codes = {t: bytes([i]) * 12 for i, t in enumerate(texts)}
    items = {"forward": texts, "reversed": texts[::-1], "shuffled": texts[1::2] + texts[::2]}[order]
    mark = len(backend.calls)
    a.publish(items, [codes[t] for t in items])
    assert len([c for c in backend.calls[mark:] if c[0] == "write"]) == 1
    ranges = [r for name, r in backend.steps[-6:] if name == "clean_dcache"]
    assert ranges == [((texts[0].address, texts[-1].address + 12 - texts[0].address),)]
    assert all(backend.read(t.address, 12) == codes[t] == t.read() for t in texts)


def test_texts_of_one_size_share_nothing_that_a_write_can_reach(make_allocator: Any) -> None:
    # The initial traps (and a published code) are immutable bytes a text may share with
    # others; a write or a live patch must change that text only.
    backend, a = make_allocator("x86_64")
    t1, t2, t3 = a.jit_text_alloc_many([16, 16, 16])
    t1.write(2, b"\x90")
    assert t1.read() == b"\xcc\xcc\x90" + b"\xcc" * 13
    assert t2.read() == t3.read() == b"\xcc" * 16
    code = RET[7] + b"\xcc" * 10
    a.publish([t2, t3], [code, code])  # one bytes object for both texts
    t2.update(0, RET[8][:5])  # mov eax, 8 (one whole instruction in one word)
    assert t2.read() == RET[8] + b"\xcc" * 10 and backend.read(t2.address, 6) == RET[8]
    assert t3.read() == code and backend.read(t3.address, 16) == code
    assert code == RET[7] + b"\xcc" * 10
    t1.map()
    assert backend.read(t1.address, 16) == t1.read()


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "riscv64"])
def test_a_run_is_written_with_trap_filler_in_phase_between_the_texts(make_allocator: Any, arch: str) -> None:
    backend, a = make_allocator(arch)
    warm = a.jit_text_alloc(16)
    warm.map()
    sizes = [5, 64, 1, 130, 33, 2, 7, 64, 100]
    texts = a.jit_text_alloc_many(sizes)
    codes = [bytes([0x10 + i]) * (size - i % 2) for i, size in enumerate(sizes)]  # some shorter than the text
    mark = len(backend.calls)
    a.publish(texts, codes)
    assert len([c for c in backend.calls[mark:] if c[0] == "write"]) == 1
    start, end = texts[0].address, texts[-1].address + texts[-1].size
    res_start = texts[0]._pack.address
    expected = bytearray(a.arch.trap_bytes(end - res_start))[start - res_start :]  # the pack's own traps
    for t, code in zip(texts, codes, strict=True):
        expected[t.address - start : t.address - start + len(code)] = code
        assert t.read() == code + expected[t.address - start + len(code) : t.address - start + t.size]
    assert backend.read(start, end - start) == bytes(expected)


def test_publish_codes_mixes_staged_inplace_and_unwritten(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t1, t2, t3 = a.jit_text_alloc_many([16, 16, 16])
    t2.map_rw_inplace()
    a.publish([t1, t2, t3], [RET[1], RET[2], b""])
    assert [backend.read(t.address, 6) for t in (t1, t2)] == [RET[1], RET[2]]
    assert backend.read(t3.address, 16) == b"\xcc" * 16
    assert {t.state for t in (t1, t2, t3)} == {TextState.LIVE}


@pytest.mark.parametrize(
    ("sizes", "align", "error"),
    [
        ([16, 0], 16, AlignmentError),
        ([16, -5], 16, AlignmentError),
        ([16, "32"], 16, TypeError),
        ([True], 16, TypeError),
        ([16.0], 16, TypeError),
        ([16], 24, AlignmentError),
        ([16], "16", TypeError),
    ],
)
def test_bad_sizes_allocate_nothing(make_allocator: Any, sizes: list[Any], align: Any, error: type[Exception]) -> None:
    backend, a = make_allocator("x86_64")
    a.jit_text_alloc(16)
    before = state(backend, a)
    with pytest.raises(error):
        a.jit_text_alloc_many(sizes, align=align)
    assert state(backend, a) == before


def test_a_failure_part_way_gives_back_what_was_taken(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=1 << 16)
    a.jit_text_alloc(16)
    before = a.stats()["texts"], a.stats()["totals"]["live_bytes"]
    backend.fail("reserve")  # the second run needs a new pack
    with pytest.raises(OutOfMemoryError):
        a.jit_text_alloc_many([64] * 1500)
    assert (a.stats()["texts"], a.stats()["totals"]["live_bytes"]) == before
    assert len(a.jit_text_alloc_many([64] * 1500)) == 1500  # and it works afterwards


def test_bad_codes_change_nothing(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    texts = a.jit_text_alloc_many([8, 8, 8])
    other = make_allocator("x86_64")[1].jit_text_alloc(8)
    before = state(backend, a)
    cases: list[tuple[list[Any], Any, type[Exception]]] = [
        (texts, [RET[1]] * 2, AlignmentError),  # one code short
        (texts, [RET[1], RET[2], b"\x90" * 9], OutOfBoundsError),  # too long, last
        (texts, [RET[1], "ret", RET[2]], TypeError),
        (texts, [RET[1], None, RET[2]], TypeError),
        ([texts[0], texts[1], texts[0]], [RET[1]] * 3, BadStateError),  # listed twice
        ([texts[0], other], [RET[1]] * 2, BadStateError),  # another allocator's
        ([texts[0], "text"], [RET[1]] * 2, TypeError),
    ]
    for items, codes, error in cases:
        with pytest.raises(error):
            a.publish(items, codes)
        assert state(backend, a) == before, (items, codes)
    assert all(t.read() == b"\xcc" * 8 for t in texts)


def test_codes_in_a_batch_are_staged_then_published_together(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    texts = a.jit_text_alloc_many([16, 16])
    with a.batch():
        a.publish(texts, [RET[3], RET[4]])
        assert backend.read(texts[0].address, 6) == b"\xcc" * 6
        assert texts[0].read()[:6] == RET[3]
    assert backend.read(texts[1].address, 6) == RET[4]


def test_module_level_publish_refuses_texts_of_several_allocators(make_allocator: Any) -> None:
    """One allocator's publish is all-or-nothing; two allocators' could not be."""
    b1, a1 = make_allocator("x86_64")
    b2, a2 = make_allocator("x86_64")
    t1, t2, t3 = a1.jit_text_alloc(8), a2.jit_text_alloc(8), a1.jit_text_alloc(8)
    before = (b1.snapshot(), b2.snapshot(), len(b1.calls), len(b2.calls))
    with pytest.raises(BadStateError, match="2 allocators"):
        execmem.publish([t1, t2, t3], [RET[1], RET[2], RET[3]])
    assert (b1.snapshot(), b2.snapshot(), len(b1.calls), len(b2.calls)) == before
    assert (t1.read()[:6], t2.read()[:6]) == (b"\xcc" * 6, b"\xcc" * 6)
    execmem.publish([t1, t3], [RET[1], RET[3]])  # one allocator's texts: as Allocator.publish
    assert (b1.read(t1.address, 6), b1.read(t3.address, 6)) == (RET[1], RET[3])
    with pytest.raises(AlignmentError):
        execmem.publish([a1.jit_text_alloc(8)], [])


@needs_programs
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_native_many_functions_return_their_values(mode: str) -> None:
    from execmem.native import NativeBackend

    with NativeBackend(mode) as backend, execmem.Allocator(backend=backend) as a:
        first = a.jit_text_alloc_many([16] * 3)
        a.publish(first, [const(k) for k in range(3)])  # the pack is mapped now: the next run is placed in it
        texts = a.jit_text_alloc_many([CONST_SIZE, 16, 64, 33] * 100)
        a.publish(texts, [const(i % 256) for i in range(len(texts))])
        got = [t.function(ctypes.c_int)() for t in first + texts]
        assert got == [0, 1, 2] + [i % 256 for i in range(len(texts))]
        assert a.stats()["epochs"]["started"] == 1


def test_a_failure_among_dedicated_reservations_gives_back_the_earlier_ones(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=1 << 16)
    before = len(backend.reservations)
    real = backend.reserve
    calls = [0]

    def reserve(size: int, align: int) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise OutOfMemoryError("injected")
        return real(size, align)

    backend.reserve = reserve  # type: ignore[method-assign]
    with pytest.raises(OutOfMemoryError):
        a.jit_text_alloc_many([16] * 4, align=1 << 17)  # alignment beyond a pack: one reservation each
    assert len(backend.reservations) == before
    assert a.stats()["texts"]["RESERVED"] == 0
