"""The allocator core on the MemoryBackend: recipes, batches, quarantine, packs,
patch rules, states, bad inputs, fork and close."""

from __future__ import annotations

from typing import Any

import pytest

import execmem
from execmem import TextState
from execmem._errors import (
    AlignmentError,
    BadStateError,
    ForkedProcessError,
    OutOfBoundsError,
    OutOfMemoryError,
    UnsafePatchError,
    UnsupportedError,
    UseAfterFreeError,
)
from execmem._memory_backend import MemoryBackend

X86_RET42 = b"\xb8\x2a\x00\x00\x00\xc3"  # mov eax, 42; ret
NOP8 = b"\x90" * 8


def steps(backend: MemoryBackend) -> list[str]:
    return [name for name, _ in backend.steps]


def verbs(backend: MemoryBackend, since: int = 0) -> list[object]:
    out: list[object] = []
    for call in backend.calls[since:]:
        out.append(call[1] if call[0] == "run_step" else call[0])
    return out


def S(allocator: execmem.Allocator) -> dict[str, Any]:
    return allocator.stats()


# -- recipes ------------------------------------------------------------------------------


def test_fresh_pack_x86_writes_then_maps_without_remote_cse(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(16)
    t.write(0, X86_RET42)
    assert backend.read(t.address, 6) == b"\xcc" * 6  # staged, not in memory yet
    mark = len(backend.calls)
    t.map()
    assert verbs(backend, mark) == ["write", "map"]
    assert t.state is TextState.LIVE
    assert backend.read(t.address, 16) == X86_RET42 + b"\xcc" * 10
    assert backend.remote_cse_count == 0


def test_fresh_pack_arm64_maintenance_before_map(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64")
    t = a.jit_text_alloc(8)
    t.write(0, execmem.asm("mov x0, #42\nret", "arm64", t.address))
    t.map()
    assert verbs(backend)[1:] == ["write", "clean_dcache", "barrier", "invalidate_icache", "barrier", "map"]
    assert backend.steps[0] == ("clean_dcache", ((t.address, 8),))


def test_mapped_pack_runs_publish_with_one_remote_cse(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64")
    first = a.jit_text_alloc(8)
    first.map()
    mark = len(backend.calls)
    t = a.jit_text_alloc(8)
    t.write(0, execmem.asm("mov x0, #1\nret", "arm64", t.address))
    t.map()
    assert verbs(backend, mark) == [
        "write", "clean_dcache", "barrier", "invalidate_icache", "barrier", "local_cse", "remote_cse",
    ]
    assert S(a)["epochs"] == {"started": 1, "completed": 1, "forced": 0}


def test_cache_features_remove_steps(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64", cache_features=("idc", "dic"))
    a.jit_text_alloc(8).map()
    t = a.jit_text_alloc(8)
    t.write(0, execmem.asm("ret", "arm64"))
    mark = len(backend.calls)
    t.map()
    assert verbs(backend, mark) == ["write", "barrier", "barrier", "local_cse", "remote_cse"]


def test_recipes_overridable(make_allocator: Any) -> None:
    spec = execmem.arch.get("x86_64")
    backend, a = make_allocator(spec.with_recipes(publish=spec.publish.without("remote_cse")))
    a.jit_text_alloc(8).map()
    a.jit_text_alloc(8).map()
    assert backend.remote_cse_count == 0
    backend2, b = make_allocator(spec.with_recipes(publish_fresh=spec.publish_fresh.moved_before("map", "write")))
    t = b.jit_text_alloc(8)
    t.write(0, X86_RET42)
    t.map()
    assert verbs(backend2)[1:] == ["map", "write"]


def test_batch_of_fresh_mapped_and_patch_has_one_remote_cse(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096)
    live = a.jit_text_alloc(2048)
    live.write(0, NOP8)
    live.map()
    mapped = a.jit_text_alloc(64)  # same (mapped) pack
    fresh = a.jit_text_alloc(2048)  # the first pack is full: a new one
    assert fresh.address // 4096 != live.address // 4096
    mark = len(backend.calls)
    with a.batch():
        mapped.write(0, X86_RET42)
        fresh.write(0, X86_RET42)
        mapped.map()
        fresh.map()
        live.update(0, b"\xcc")
        assert mapped.state is TextState.RESERVED  # deferred
        assert backend.calls[mark:] == []
    assert mapped.state is fresh.state is TextState.LIVE
    assert verbs(backend, mark) == [
        "write", "map",  # publish_fresh
        "write", "local_cse",  # publish, its remote_cse merged into the last one
        "atomic_store", "local_cse", "remote_cse",  # patch
    ]
    (_name, ranges), = [s for s in backend.steps if s[0] == "remote_cse"]
    assert set(ranges) == {(fresh.address, 2048), (mapped.address, 64), (live.address, 8)}
    assert S(a)["steps"]["remote_cse_merged"] == 1
    assert backend.read(live.address, 2) == b"\xcc\x90"


def test_publish_many_texts_once(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64")
    a.jit_text_alloc(8).map()
    texts = [a.jit_text_alloc(8) for _ in range(5)]
    mark = len(backend.calls)
    execmem.publish(texts)
    assert verbs(backend, mark).count("remote_cse") == 1
    assert verbs(backend, mark).count("clean_dcache") == 1
    assert all(t.state is TextState.LIVE for t in texts)
    with pytest.raises(BadStateError):
        a.publish([texts[0]])


def test_batch_exception_cancels_everything(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    live = a.jit_text_alloc(8)
    live.write(0, NOP8)
    live.map()
    t = a.jit_text_alloc(8)
    t.write(0, X86_RET42)
    before = backend.snapshot()
    mark = len(backend.calls)
    with pytest.raises(RuntimeError), a.batch():
        t.map()
        live.update(0, b"\xcc")
        raise RuntimeError("boom")
    assert backend.calls[mark:] == []
    assert backend.snapshot() == before
    assert t.state is TextState.RESERVED and live.read() == NOP8
    t.write(0, b"\xc3")  # usable again: no longer queued
    t.map()


def test_queued_text_refuses_writes_and_freeing_removes_it(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64")
    t, u = a.jit_text_alloc(8), a.jit_text_alloc(8)
    with a.batch():
        t.map()
        with pytest.raises(BadStateError):
            t.write(0, b"\x90")
        with pytest.raises(BadStateError):
            t.map()
        u.map()
        u.free()
    assert t.state is TextState.LIVE and u.state is TextState.FREED


def test_failed_step_leaves_text_unpublished(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    a.jit_text_alloc(8).map()
    t = a.jit_text_alloc(8)
    t.write(0, X86_RET42)
    backend.fail("run_step:remote_cse")
    with pytest.raises(OutOfMemoryError):
        t.map()
    assert t.state is TextState.RESERVED
    assert backend.read(t.address, 8) == b"\xcc" * 8
    t.map()
    assert backend.read(t.address, 6) == X86_RET42


# -- in place -----------------------------------------------------------------------------


def test_inplace_flow(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(16)
    t.write(0, b"\x90")  # staged before switching: carried over
    t.map_rw_inplace()
    assert t.state is TextState.WRITING
    assert backend.inplace_units(backend.reservations[0])
    t.write(1, X86_RET42)
    assert backend.read(t.address, 7) == b"\x90" + X86_RET42  # directly in place
    mark = len(backend.calls)
    t.finalize()
    assert verbs(backend, mark) == ["end_inplace", "map"]  # in-place: nothing to copy
    assert t.read()[:7] == b"\x90" + X86_RET42
    assert t.state.name == "LIVE" and t.read()[:7] == b"\x90" + X86_RET42
    assert backend.inplace_units(backend.reservations[0]) == {}


def test_free_while_writing_ends_inplace_and_refills_before_reuse(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(16)
    t.map_rw_inplace()
    t.write(0, X86_RET42)
    t.free()
    assert backend.inplace_units(backend.reservations[0]) == {}
    assert backend.read(t.address, len(X86_RET42)) == X86_RET42  # no write at the free
    assert S(a)["totals"]["unfilled_bytes"] == 64
    u = a.jit_text_alloc(16)  # first fit picks the freed chunk (never mapped: no quarantine)
    assert u.address == t.address and backend.read(t.address, 16) == b"\xcc" * 16  # refilled first


def test_frees_are_refilled_at_the_next_epoch_one_write_per_run(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    texts = a.jit_text_alloc_many([64] * 8)
    a.publish(texts, [X86_RET42] * 8)
    mark = len(backend.calls)
    for t in texts[1:4] + texts[5:7]:
        t.free()
    assert verbs(backend, mark) == []  # a free makes no call at all
    assert S(a)["totals"]["quarantined_bytes"] == 5 * 64
    fresh = a.jit_text_alloc(64)
    fresh.write(0, X86_RET42)
    fresh.map()  # a publish into the mapped pack: its epoch refills the two runs
    assert verbs(backend, mark) == ["write", "local_cse", "remote_cse", "write", "write"]
    for t in texts[1:4] + texts[5:7]:
        assert backend.read(t.address, 64) == b"\xcc" * 64
    assert S(a)["events"]["refill_writes"] == 2 and S(a)["totals"]["quarantined_bytes"] == 0


def test_frees_in_a_batch_share_its_one_synchronization(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    texts = a.jit_text_alloc_many([64] * 4)
    a.publish(texts, [X86_RET42] * 4)
    mark = len(backend.calls)
    with a.batch():
        new = a.jit_text_alloc(64)
        new.write(0, X86_RET42)
        new.map()
        texts[1].free()
        texts[2].free()
        assert verbs(backend, mark) == []  # nothing happens before the block ends
    # One remote_cse: it publishes the new text and ends the freed texts' quarantine; their
    # refill follows once the batch is committed (an undone free finds its code in place).
    assert verbs(backend, mark) == ["write", "local_cse", "remote_cse", "write"]
    assert backend.read(texts[1].address, 128) == b"\xcc" * 128
    assert S(a)["totals"]["quarantined_bytes"] == 0  # the epoch started after the frees


def test_a_refused_refill_is_made_before_the_chunks_are_reused(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096)
    t = a.jit_text_alloc(16)
    t.write(0, X86_RET42)
    t.map()
    t.free()
    backend.fail("write")
    with a._lock:
        a._pool.remote_cse([])  # the epoch's refill is refused: not an error of the epoch
    assert S(a)["events"]["refill_errors"] == 1 and S(a)["totals"]["unfilled_bytes"] == 64
    assert backend.read(t.address, len(X86_RET42)) == X86_RET42
    u = a.jit_text_alloc(16)  # first fit picks it: refilled first
    assert u.address == t.address and backend.read(t.address, 16) == b"\xcc" * 16
    assert S(a)["totals"]["unfilled_bytes"] == 0


# -- quarantine, epochs, packs ---------------------------------------------------------------


def test_quarantine_forces_one_epoch_instead_of_a_new_pack(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096)
    t1, t2 = a.jit_text_alloc(2048), a.jit_text_alloc(2048)
    a.publish([t1, t2])
    address = t1.address
    t1.free()
    assert backend.read(address, 2048) == b"\xcc" * 2048
    assert S(a)["totals"]["quarantined_bytes"] == 2048
    t3 = a.jit_text_alloc(2048)
    assert t3.address == address
    assert S(a)["epochs"] == {"started": 1, "completed": 1, "forced": 1}
    assert backend.steps[-1] == ("remote_cse", ())
    assert backend.counts["reserve"] == 1


def test_quarantine_matures_with_a_publish_epoch(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64", pack_size=4096)
    t1, t2, t3 = (a.jit_text_alloc(1024) for _ in range(3))
    t1.map()  # fresh
    t1.free()  # quarantined (the pack is mapped)
    t2.map()  # mapped pack: publish's remote_cse completes an epoch
    assert S(a)["totals"]["quarantined_bytes"] == 0
    t4 = a.jit_text_alloc(1024)
    assert t4.address == t1.address
    assert S(a)["epochs"]["forced"] == 0
    del t3


def test_no_quarantine_before_the_pack_was_ever_mapped(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(64)
    t.free()
    assert a.jit_text_alloc(64).address == t.address
    assert S(a)["epochs"]["started"] == 0


def test_quarantine_disabled_reuses_at_once(make_allocator: Any) -> None:
    _backend, a = make_allocator(execmem.arch.get("x86_64").without_quarantine())
    a.jit_text_alloc(64).map()
    t = a.jit_text_alloc(64)
    t.map()
    t.free()
    assert a.jit_text_alloc(64).address == t.address


def test_empty_packs_beyond_keep_empty_are_unmapped_then_reused_after_an_epoch(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096, keep_empty=0)
    t = a.jit_text_alloc(64)
    t.map()
    pack = backend.reservations[0]
    t.free()
    assert verbs(backend)[-2:] == ["map", "unmap"]  # no refill at the free
    assert not pack.mapped
    (row,) = S(a)["packs"]
    assert row["retired"] and row["quarantined_bytes"] == 4096
    mark = len(backend.calls)
    u = a.jit_text_alloc(64)
    assert u.address == t.address  # the same reservation, reused as a fresh pack
    assert verbs(backend, mark) == ["remote_cse", "write"]  # the epoch, then the refill
    assert S(a)["epochs"]["forced"] == 1
    u.write(0, X86_RET42)
    u.map()
    assert verbs(backend)[-2:] == ["write", "map"]  # publish_fresh again


def test_retired_pack_released_one_epoch_after_maturing(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096, keep_empty=0)
    keep = a.jit_text_alloc(3000)  # dedicated? no: > pack/2 -> dedicated reservation
    assert S(a)["packs"][0]["dedicated"]
    keep.map()
    t = a.jit_text_alloc(64)
    t.map()
    t.free()  # empty regular pack -> retired
    assert backend.counts["unmap"] == 1
    other = a.jit_text_alloc(32)  # nothing else: forced epoch matures it and reuses it
    other.free()  # never mapped since reuse: released at once
    assert backend.counts["release"] == 1
    assert len(backend.reservations) == 1


def test_matured_pack_not_reused_is_released(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=4096, keep_empty=0)
    anchor = a.jit_text_alloc(64)
    anchor.map()
    t = a.jit_text_alloc(2048)
    t.map()
    t2 = a.jit_text_alloc(2048)  # second pack
    t2.map()
    t2.free()  # second pack empty -> retired
    assert backend.counts["unmap"] == 1
    for _ in range(2):  # two publish epochs in the first pack: mature, then release
        x = a.jit_text_alloc(64)
        x.map()
    assert backend.counts["release"] == 1
    del anchor, t


def test_big_text_gets_its_own_reservation_and_is_released(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64", pack_size=8192)
    small = a.jit_text_alloc(64)
    small.map()
    big = a.jit_text_alloc(5000, align=8192)
    assert big.address % 8192 == 0
    assert len(backend.reservations) == 2
    big.map()
    big.free()
    assert backend.counts["unmap"] == 1  # retired, quarantined
    a.jit_text_alloc(64).map()  # an epoch: a dedicated reservation is released when mature
    assert backend.counts["release"] == 1


def test_align_and_first_fit(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64", pack_size=1 << 16)
    t1 = a.jit_text_alloc(10)
    t2 = a.jit_text_alloc(10, align=256)
    t3 = a.jit_text_alloc(100)
    assert t2.address % 256 == 0
    assert t3.address == t1.address + 64  # first fit fills the gap before t2
    assert t2.address == t1.address + 256


# -- coarse write units (mprotect-like) -------------------------------------------------------


def test_coarse_units_dense_until_mapped_then_whole_pages(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64", write_unit=4096, pack_size=1 << 16)
    t1, t2 = a.jit_text_alloc(16), a.jit_text_alloc(16)
    assert t2.address == t1.address + 64  # dense: nothing can execute an unmapped pack
    t1.map()
    t3 = a.jit_text_alloc(16)
    assert t3.address % 4096 == 0 and t3.address != t1.address
    assert S(a)["totals"]["live_bytes"] == 64 + 64 + 4096
    with pytest.raises(UnsupportedError, match="write unit"):
        t2.map_rw_inplace()  # shares page 0 with live t1
    t3.map_rw_inplace()  # owns its page
    t3.write(0, X86_RET42)
    t3.finalize()
    with pytest.raises(UnsafePatchError, match="briefly non-executable"):
        t3.update(0, b"\xb8")


def test_coarse_inplace_in_unmapped_pack_claims_its_page(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64", write_unit=4096, pack_size=1 << 16)
    t1 = a.jit_text_alloc(16)
    t1.map_rw_inplace()
    t2 = a.jit_text_alloc(16)
    assert t2.address == t1.address + 4096
    assert a.occupancy()[0]["runs"] == [("live", 65), ("free", 1024 - 65)]


# -- live patching ---------------------------------------------------------------------------


def test_x86_patch_rules(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(32)
    code = NOP8 + X86_RET42 + b"\x90\x90" + b"\x90" * 6 + b"\x90\x90"
    t.write(0, code)
    t.map()
    t.update(3, b"\xcc")  # one whole 1-byte instruction
    assert backend.calls[-3][0] == "atomic_store" and backend.calls[-3][1:] == (t.address, 8)
    assert backend.read(t.address, 8) == b"\x90\x90\x90\xcc\x90\x90\x90\x90"
    t.update(8, b"\xb8\x07\x00\x00\x00")  # mov eax, 42 -> mov eax, 7: whole, same length
    assert t.read()[8:14] == b"\xb8\x07\x00\x00\x00\xc3"
    with pytest.raises(UnsafePatchError, match="one whole"):
        t.update(8, b"\xb9")  # first byte of a 5-byte instruction
    with pytest.raises(UnsafePatchError, match="8-byte word"):
        t.update(7, b"\x90\x90")  # crosses the aligned word
    with pytest.raises(UnsafePatchError, match="swap the pointer"):
        t.update(14, b"\x90\x90")  # two instructions, not one
    assert backend.read(t.address + 8, 6) == b"\xb8\x07\x00\x00\x00\xc3"


def test_arm64_patch_rules(make_allocator: Any) -> None:
    backend, a = make_allocator("arm64")
    t = a.jit_text_alloc(16)
    base = t.address  # branch targets are absolute and must be in reach (asm() checks)
    t.write(0, execmem.asm(f"nop\nb.ne {base + 0x100:#x}\nret\nmov x0, #1", "arm64", base))
    t.map()
    t.update(0, execmem.asm(f"b {base + 0x40:#x}", "arm64", base))  # nop -> b: both on the CMODX list
    t.update(4, execmem.asm(f"b.eq {base + 0x104:#x}", "arm64", base + 4))  # b.cond -> b.cond
    with pytest.raises(UnsafePatchError, match="'ret'"):
        t.update(8, execmem.asm("nop", "arm64"))
    with pytest.raises(UnsafePatchError, match="'mov'"):
        t.update(12, execmem.asm("nop", "arm64"))
    with pytest.raises(UnsafePatchError):
        t.update(2, b"\x1f\x20")  # not 4-byte aligned: two half instructions
    with pytest.raises(UnsafePatchError):
        t.update(0, execmem.asm("nop\nnop", "arm64"))  # two instructions, two words
    assert backend.read(base, 8) == execmem.asm(f"b {base + 0x40:#x}\nb.eq {base + 0x104:#x}", "arm64", base)
    assert steps(backend)[-6:] == ["clean_dcache", "barrier", "invalidate_icache", "barrier", "local_cse", "remote_cse"]


def test_update_only_when_live(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(8)
    with pytest.raises(BadStateError, match="RESERVED"):
        t.update(0, b"\x90")
    t.map()
    t.free()
    with pytest.raises(UseAfterFreeError):
        t.update(0, b"\x90")


# -- states and bad inputs ----------------------------------------------------------------------


VERBS = {
    "write": lambda t: t.write(0, b"\x90"),
    "map": lambda t: t.map(),
    "map_rw_inplace": lambda t: t.map_rw_inplace(),
    "finalize": lambda t: t.finalize(),
    "update": lambda t: t.update(0, b"\xcc"),
    "free": lambda t: t.free(),
    "read": lambda t: t.read(),
}
LEGAL = {
    TextState.RESERVED: {"write", "map", "map_rw_inplace", "free", "read"},
    TextState.WRITING: {"write", "finalize", "free", "read"},
    TextState.LIVE: {"update", "free", "read"},
    TextState.FREED: set(),
}


def _text_in(a: execmem.Allocator, state: TextState) -> execmem.JitText:
    t = a.jit_text_alloc(16)
    t.write(0, NOP8)
    if state is TextState.WRITING:
        t.map_rw_inplace()
    elif state is TextState.LIVE:
        t.map()
    elif state is TextState.FREED:
        t.free()
    return t


@pytest.mark.parametrize("state", list(TextState))
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_transition_table(make_allocator: Any, state: TextState, verb: str) -> None:
    backend, a = make_allocator("x86_64")
    a.jit_text_alloc(8).map()  # a mapped pack, so every path is exercised
    t = _text_in(a, state)
    before = (backend.snapshot(), S(a), t.state)
    if verb in LEGAL[state]:
        VERBS[verb](t)
        return
    expected = UseAfterFreeError if state is TextState.FREED else BadStateError
    with pytest.raises(expected):
        VERBS[verb](t)
    assert (backend.snapshot(), S(a), t.state) == before


@pytest.mark.parametrize(
    ("size", "align", "error"),
    [
        (0, 16, AlignmentError),
        (-5, 16, AlignmentError),
        (16, 0, AlignmentError),
        (16, 24, AlignmentError),
        (16, -16, AlignmentError),
        (True, 16, TypeError),
        ("16", 16, TypeError),
        (16, 16.0, TypeError),
        (16, None, TypeError),
    ],
)
def test_bad_alloc_arguments(make_allocator: Any, size: Any, align: Any, error: type[Exception]) -> None:
    backend, a = make_allocator("x86_64")
    with pytest.raises(error):
        a.jit_text_alloc(size, align)
    assert backend.calls == []


def test_bad_write_arguments_change_nothing(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(16)
    for offset, data, error in [
        (-1, b"\x90", OutOfBoundsError),
        (16, b"\x90", OutOfBoundsError),
        (10, b"\x90" * 7, OutOfBoundsError),
        (0, "nop", TypeError),
        (0, [0x90], TypeError),
        (1.0, b"\x90", TypeError),
    ]:
        with pytest.raises(error):
            t.write(offset, data)
    assert t.read() == b"\xcc" * 16
    t.write(0, memoryview(b"\x90\x90"))
    t.write(16, b"")
    assert t.read()[:3] == b"\x90\x90\xcc"


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"granularity": 48}, AlignmentError),
        ({"granularity": 0}, AlignmentError),
        ({"pack_size": 3 << 20}, AlignmentError),
        ({"pack_size": 1024}, AlignmentError),
        ({"keep_empty": -1}, AlignmentError),
        ({"granularity": 64.0}, TypeError),
        ({"granularity": True}, TypeError),
    ],
)
def test_bad_allocator_arguments(kw: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        execmem.Allocator(backend=MemoryBackend("x86_64"), **kw)


def test_granularity_at_least_the_patch_word() -> None:
    with pytest.raises(AlignmentError, match=">= 8"):
        execmem.Allocator(backend=MemoryBackend("x86_64"), granularity=4)
    execmem.Allocator(backend=MemoryBackend("arm64"), granularity=4).close()


def test_backend_must_be_a_backend() -> None:
    with pytest.raises(TypeError):
        execmem.Allocator(backend=object())  # type: ignore[arg-type]


def test_text_of_another_allocator(make_allocator: Any) -> None:
    _, a = make_allocator("x86_64")
    _, b = make_allocator("x86_64")
    t = a.jit_text_alloc(8)
    with pytest.raises(BadStateError, match="another allocator"):
        b.publish([t])
    with pytest.raises(TypeError):
        a.publish(["not a text"])


def test_function_needs_an_executing_backend(make_allocator: Any) -> None:
    _, a = make_allocator("x86_64")
    t = a.jit_text_alloc(8)
    t.map()
    with pytest.raises(UnsupportedError, match="call"):
        t.function(None)
    with pytest.raises(OutOfBoundsError):
        t.function(None, offset=8)


# -- fork, close, reporting ---------------------------------------------------------------------


def test_forked_process_is_refused(make_allocator: Any) -> None:
    backend, a = make_allocator("x86_64")
    t = a.jit_text_alloc(8)
    a._generation = -1  # as if this were a forked child
    for action in (lambda: a.jit_text_alloc(8), lambda: t.write(0, b"\x90"), t.map, t.free, a.stats):
        with pytest.raises(ForkedProcessError):
            action()
    a.close()  # allowed, touches nothing (the parent owns the memory)
    assert len(backend.reservations) == 1


def test_close_releases_everything_and_is_idempotent() -> None:
    backend = MemoryBackend("x86_64")
    a = execmem.Allocator(backend=backend, pack_size=4096, keep_empty=0)
    t = a.jit_text_alloc(64)
    t.map()
    a.jit_text_alloc(3000)
    u = a.jit_text_alloc(64)
    u.map()
    u.free()
    a.close()
    a.close()
    assert backend.reservations == []
    assert not backend.closed  # not ours to close
    with pytest.raises(BadStateError):
        a.jit_text_alloc(8)
    with pytest.raises(BadStateError):
        t.update(0, b"\x90")
    with pytest.raises(BadStateError), a.batch():
        pass


def test_context_manager() -> None:
    backend = MemoryBackend("x86_64")
    with execmem.Allocator(backend=backend) as a:
        a.jit_text_alloc(8).map()
    assert backend.reservations == []


def test_stats_and_occupancy(make_allocator: Any) -> None:
    _backend, a = make_allocator("x86_64", pack_size=4096)
    t1, t2, t3 = a.jit_text_alloc(100), a.jit_text_alloc(64), a.jit_text_alloc(64)
    t1.map()
    t2.map()
    t2.free()
    st = S(a)
    assert st["arch"] == "x86_64" and st["mode"] == "memory"
    assert st["granularity"] == 64 and st["pack_size"] == 4096
    (pack,) = st["packs"]
    assert pack["mapped"] and pack["live_bytes"] == 128 + 64 and pack["quarantined_bytes"] == 64
    assert pack["live_bytes"] + pack["free_bytes"] + pack["quarantined_bytes"] == pack["size"]
    assert st["texts"] == {"RESERVED": 1, "WRITING": 0, "LIVE": 1, "FREED": 1}
    assert st["recipes"] == {"publish_fresh": 1, "publish": 1}
    assert st["steps"]["remote_cse"] == 1
    assert st["backend"]["mode"] == "memory"
    (occ,) = a.occupancy()
    assert occ["runs"] == [("live", 2), ("quarantined", 1), ("live", 1), ("free", 60)]
    del t3


# -- interrupted verbs (the enumeration is tests/reliability/fork_and_signals/test_interrupts_enumerated.py) ------------


def test_an_interrupted_rollback_is_finished_by_the_next_verb(make_allocator: Any) -> None:
    """The undo of a verb stays registered until it has run to its end: here the
    publish fails (a refused step), and its rollback is stopped too (a refused trap
    write, as an exception would stop it); the next verb finishes the rollback first."""
    backend, a = make_allocator("x86_64", pack_size=4096)
    a.jit_text_alloc(64).map()  # a mapped pack: publish runs local_cse
    t = a.jit_text_alloc(64)
    t.write(0, X86_RET42)
    before = backend.snapshot()
    backend.fail("run_step:local_cse")
    real_write = backend.write
    writes = [0]

    def write_then_fail(res: Any, offset: int, data: bytes) -> None:
        writes[0] += 1
        if writes[0] == 2:  # the first write publishes; the second is the rollback's
            raise execmem.OutOfMemoryError("the rollback is interrupted")
        real_write(res, offset, data)

    backend.write = write_then_fail  # type: ignore[method-assign]
    with pytest.raises(execmem.OutOfMemoryError, match="rollback is interrupted"):
        t.map()
    assert a._undo  # still registered: the rollback did not finish
    backend.write = real_write  # type: ignore[method-assign]
    assert S(a)["texts"]["LIVE"] == 1  # any verb finishes the rollback first
    assert not a._undo and t.state is TextState.RESERVED and backend.snapshot() == before
    t.map()
    assert t.state is TextState.LIVE and backend.read(t.address, len(X86_RET42)) == X86_RET42


def test_integers_are_plain_integers_before_any_bounds_check(make_allocator: Any) -> None:
    """An int subclass that lies in its comparisons and arithmetic cannot slip past a
    bounds check (issue 10): every size, offset and alignment is taken with operator.index."""

    class Liar(int):
        def __lt__(self, other: object) -> bool:
            return False

        def __le__(self, other: object) -> bool:
            return True

        def __gt__(self, other: object) -> bool:
            return False

        def __ge__(self, other: object) -> bool:
            return True

        def __add__(self, other: object) -> int:
            return 0

        __radd__ = __add__

    _backend, a = make_allocator("x86_64")
    t, u = a.jit_text_alloc(16), a.jit_text_alloc(16)
    with pytest.raises(execmem.OutOfBoundsError):
        t.write(Liar(40), b"\x90" * 8)  # would land in u
    with pytest.raises(execmem.OutOfBoundsError):
        t.write(Liar(-8), b"\x90" * 8)
    with pytest.raises(execmem.SizeError):
        a.jit_text_alloc(Liar(0))
    with pytest.raises(execmem.SizeError):
        a.jit_text_alloc(Liar(-64))
    assert a.jit_text_alloc(Liar(8), align=Liar(64)).address % 64 == 0
    assert (t.read(), u.read()) == (b"\xcc" * 16, b"\xcc" * 16)


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_sizes_below_one_are_size_errors(make_allocator: Any, size: int) -> None:
    backend, a = make_allocator("x86_64")
    with pytest.raises(execmem.SizeError) as info:
        a.jit_text_alloc(size)
    assert isinstance(info.value, ValueError) and isinstance(info.value, execmem.ExecmemError)
    with pytest.raises(execmem.SizeError):
        a.jit_text_alloc_many([16, size])
    assert a.jit_text_alloc_many([]) == [] and backend.calls == []


def test_numpy_like_integers_are_accepted(make_allocator: Any) -> None:
    class Index:  # what numpy integers are to Python: __index__, not int
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            return self.value

    _, a = make_allocator("x86_64")
    t = a.jit_text_alloc(Index(32), align=Index(32))  # type: ignore[arg-type]
    t.write(Index(4), b"\x90")  # type: ignore[arg-type]
    assert t.size == 32 and type(t.size) is int and t.read()[4] == 0x90
    with pytest.raises(TypeError):
        a.jit_text_alloc(32.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.jit_text_alloc(True)
