"""Hypothesis state machine over the allocator core on the MemoryBackend.

Random alloc / write / map / map_rw_inplace / finalize / update / free / batches
(with frees, cancelled or not) / texts used as context managers / forced epochs /
calls through ``function()`` entering and leaving (their gate's counter moved by hand,
as the gate does it: the MemoryBackend's code cannot run here), against a small model.
After every step:

* no two texts overlap, every text is aligned and inside a live reservation;
* every byte of every reservation that is not in a LIVE or WRITING text reads as
  the architecture's trap filler, or, in a chunk freed and not refilled yet, as what
  the freed text left there; those texts read as their shadow copies;
* quarantined space is not reused before an epoch completed after its free;
* a text freed while calls are in flight keeps its chunks and its code until the
  first verb after the last call returned; a call into a freed text is refused;
* the accounting adds up (per pack, in total, texts by state, reservations);
* an illegal transition raised and changed nothing (backend memory, calls, stats).
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

import execmem
from execmem import JitText, TextState, _gates
from execmem._data import JitData
from execmem._errors import (
    BadStateError,
    SizeError,
    UnsafePatchError,
    UnsupportedError,
    UseAfterFreeError,
)
from execmem._memory_backend import MemoryBackend

ARM64_WORDS = [
    bytes.fromhex("1f2003d5"),  # nop
    bytes.fromhex("00000014"),  # b .
    bytes.fromhex("c0035fd6"),  # ret (not on the CMODX list)
    bytes.fromhex("002020d4"),  # brk #0x100 (the trap filler)
]
X86_BYTES = [b"\x90", b"\xc3", b"\xcc"]  # nop, ret, int3: every byte a whole instruction


class Boom(Exception):
    pass


class AllocatorMachine(RuleBasedStateMachine):
    ARCH = "x86_64"
    WRITE_UNIT = 1

    texts = Bundle("texts")
    datas = Bundle("datas")

    def __init__(self) -> None:
        super().__init__()
        self.backend: MemoryBackend
        self.a: execmem.Allocator
        self.align: dict[JitText, int] = {}
        self.state: dict[JitText, TextState] = {}
        #: (start, end, epoch stamp) of text footprints freed from a mapped reservation.
        self.freed: list[tuple[int, int, int]] = []
        #: Chunk address -> what a freed text left in it (until its refill).
        self.leftover: dict[int, bytes] = {}
        #: Calls in flight per text, and the freed texts they keep (pinned).
        self.calls: dict[JitText, int] = {}
        self.pinned: set[JitText] = set()
        #: What a shrunk LIVE text left after its new size in its last chunk.
        self.kept: dict[JitText, bytes] = {}
        #: Data regions and their expected contents (None once freed).
        self.data: dict[JitData, bytes | None] = {}

    @initialize(pack_shift=st.sampled_from([12, 13, 14]), keep_empty=st.integers(0, 2))
    def setup(self, pack_shift: int, keep_empty: int) -> None:
        self.backend = MemoryBackend(self.ARCH, write_unit=self.WRITE_UNIT)
        self.a = execmem.Allocator(backend=self.backend, pack_size=1 << pack_shift, granularity=64, keep_empty=keep_empty)
        self.spec = self.backend.arch

    def teardown(self) -> None:
        if hasattr(self, "a"):
            if any(self.calls.values()):
                with pytest.raises(BadStateError, match="still running"):
                    self.a.close()
                for t, n in self.calls.items():
                    ctypes.c_int64.from_address(t._slot.address).value -= n  # type: ignore[union-attr]
            self.a.close()
            assert self.backend.reservations == [] and self.backend.data_regions == []

    # -- helpers ------------------------------------------------------------------------------

    def code(self, data: st.DataObject, size: int) -> bytes:
        if self.spec.insn_align == 4:
            n = data.draw(st.integers(1, max(1, size // 4)))
            return b"".join(data.draw(st.sampled_from(ARM64_WORDS)) for _ in range(n))[:size]
        n = data.draw(st.integers(1, min(size, 24)))
        return b"".join(data.draw(st.sampled_from(X86_BYTES)) for _ in range(n))

    def fingerprint(self) -> tuple[Any, ...]:
        return (self.backend.snapshot(), len(self.backend.calls), self.a.stats(), dict(self.state))

    def refused(self, action: Any, *errors: type[Exception]) -> None:
        """``action`` must raise one of ``errors`` and change nothing."""
        before = self.fingerprint()
        with pytest.raises(errors):
            action()
        assert self.fingerprint() == before

    def footprint(self, t: JitText) -> tuple[int, int]:
        start = t._pack.address + t._chunk * self.a.granularity
        return start, start + t._nchunks * self.a.granularity

    def stamp(self) -> tuple[int, int]:
        epochs: dict[str, int] = self.a.stats()["epochs"]  # type: ignore[assignment]
        return epochs["started"], epochs["completed"]

    # -- rules --------------------------------------------------------------------------------

    @rule(target=texts, data=st.data())
    def alloc(self, data: st.DataObject) -> JitText:
        big = data.draw(st.booleans()) and data.draw(st.booleans()) and data.draw(st.booleans())
        size = data.draw(st.integers(1, 3 * self.a.pack_size // 4) if big else st.integers(1, 300))
        align = data.draw(st.sampled_from([1, 4, 16, 64, 256, 1024]))
        t = self.a.jit_text_alloc(size, align)
        assert t.address % align == 0 and t.size == size and t.state is TextState.RESERVED
        _, completed = self.stamp()
        lo, hi = self.footprint(t)
        for start, end, stamp in self.freed:
            if start < hi and lo < end:
                assert completed > stamp, "quarantined space reused before its epoch"
        self.align[t] = align
        self.state[t] = TextState.RESERVED
        return t

    @rule(t=texts, data=st.data())
    def write(self, t: JitText, data: st.DataObject) -> None:
        if self.state[t] not in (TextState.RESERVED, TextState.WRITING):
            self.refused(lambda: t.write(0, b"\x90"), BadStateError)
            return
        code = self.code(data, t.size)
        step = self.spec.insn_align
        offset = data.draw(st.integers(0, (t.size - len(code)) // step)) * step
        before = t.read()
        t.write(offset, code)
        assert t.read() == before[:offset] + code + before[offset + len(code) :]

    @rule(t=texts)
    def map(self, t: JitText) -> None:
        if self.state[t] is not TextState.RESERVED:
            self.refused(t.map, BadStateError)
            return
        t.map()
        self.state[t] = TextState.LIVE

    @rule(t=texts)
    def map_rw_inplace(self, t: JitText) -> None:
        if self.state[t] is not TextState.RESERVED:
            self.refused(t.map_rw_inplace, BadStateError)
            return
        before = self.fingerprint()
        try:
            t.map_rw_inplace()
        except UnsupportedError:  # coarse write units shared with another text
            assert self.a.granularity < self.WRITE_UNIT
            assert self.fingerprint() == before
            return
        self.state[t] = TextState.WRITING

    @rule(t=texts)
    def finalize(self, t: JitText) -> None:
        if self.state[t] is not TextState.WRITING:
            self.refused(t.finalize, BadStateError)
            return
        t.finalize()
        self.state[t] = TextState.LIVE

    @rule(t=texts, data=st.data())
    def update(self, t: JitText, data: st.DataObject) -> None:
        if self.state[t] is not TextState.LIVE:
            self.refused(lambda: t.update(0, b"\x90"), BadStateError)
            return
        step = self.spec.insn_align
        offset = data.draw(st.integers(0, (t.size - 1) // step)) * step
        new = data.draw(st.sampled_from(ARM64_WORDS if step == 4 else X86_BYTES))
        if offset + len(new) > t.size:
            return
        before = self.fingerprint()
        shadow = t.read()
        try:
            t.update(offset, new)
        except UnsafePatchError:
            assert self.fingerprint() == before
            return
        assert t.read() == shadow[:offset] + new + shadow[offset + len(new) :]

    def will_free(self, t: JitText) -> None:
        """Note what ``t`` leaves behind, just before it is freed."""
        lo, hi = self.footprint(t)
        gran = self.a.granularity
        for chunk in range(lo, hi, gran):
            self.leftover[chunk] = self.backend.read(chunk, gran)

    def freed_now(self, t: JitText, mapped: bool, span: tuple[int, int], started: int) -> None:
        self.state[t] = TextState.FREED
        if self.calls.get(t):
            assert t in self.a._pinned  # its chunks go back once the calls have returned
            self.pinned.add(t)
            return
        if mapped:
            self.freed.append((*span, started))

    @rule(t=texts)
    def call_enters(self, t: JitText) -> None:
        """A call through ``function()`` enters the gate: counter up, then the retired
        flag read (a retired text: counter down, the call refused)."""
        if t._slot is None:
            if self.state[t] is not TextState.LIVE:
                return
            t._slot = _gates.gate_pool().slot(t)  # what function() does first
        counter = ctypes.c_int64.from_address(t._slot.address)
        counter.value += 1
        if ctypes.c_uint64.from_address(t._slot.address + 8).value:
            counter.value -= 1
            assert self.state[t] is TextState.FREED
            return
        assert self.state[t] is TextState.LIVE
        self.calls[t] = self.calls.get(t, 0) + 1

    @rule(t=texts)
    def call_returns(self, t: JitText) -> None:
        if not self.calls.get(t):
            return
        assert t._slot is not None
        ctypes.c_int64.from_address(t._slot.address).value -= 1
        self.calls[t] -= 1
        if self.calls[t] == 0 and t in self.pinned:
            self.pinned.discard(t)
            mapped, span = t._pack.reservation.mapped, self.footprint(t)
            started, _ = self.stamp()  # stats(): the first verb after the last return reclaims it
            assert t not in self.a._pinned
            self.freed_now(t, mapped, span, started)

    @rule(t=texts)
    def free(self, t: JitText) -> None:
        if self.state[t] is TextState.FREED:
            self.refused(t.free, UseAfterFreeError)
            return
        mapped = t._pack.reservation.mapped
        span = self.footprint(t)
        started, _ = self.stamp()
        self.will_free(t)
        t.free()
        self.freed_now(t, mapped, span, started)

    @rule(t=texts)
    def free_while_running(self, t: JitText) -> None:
        """``free()`` with a call in flight: FREED now, its chunks back after the return."""
        if self.state[t] is not TextState.LIVE:
            return
        if not self.calls.get(t):
            self.call_enters(t)
        self.free(t)

    @rule(size=st.integers(1, 300), data=st.data())
    def context_manager(self, size: int, data: st.DataObject) -> None:
        """A text used as a context manager is freed when the block ends."""
        with self.a.jit_text_alloc(size) as t:
            self.align[t] = 16
            self.state[t] = TextState.RESERVED
            t.write(0, self.code(data, size))
            t.map()
            self.state[t] = TextState.LIVE
            mapped, span, started = t._pack.reservation.mapped, self.footprint(t), self.stamp()[0]
            self.will_free(t)
        assert t.state is TextState.FREED
        self.freed_now(t, mapped, span, started)

    @rule(ts=st.lists(texts, max_size=4, unique=True), frees=st.lists(st.booleans(), min_size=4, max_size=4),
          fail=st.booleans(), data=st.data())
    def batch(self, ts: list[JitText], frees: list[bool], fail: bool, data: st.DataObject) -> None:
        """Publishes, patches and frees deferred to the end of the block (or cancelled)."""
        before = self.fingerprint()
        started, _ = self.stamp()
        done: dict[JitText, TextState] = {}
        freeing: list[tuple[JitText, bool]] = []
        try:
            with self.a.batch():
                for t, free in zip(ts, frees, strict=False):
                    state = self.state[t]
                    if state is TextState.RESERVED:
                        t.map()
                        done[t] = TextState.LIVE
                    elif state is TextState.WRITING:
                        t.finalize()
                        done[t] = TextState.LIVE
                    elif state is TextState.LIVE and self.spec.insn_align == 1 and self.WRITE_UNIT == 1:
                        t.update(0, data.draw(st.sampled_from(X86_BYTES)))
                    if free and state is not TextState.FREED:
                        self.will_free(t)
                        t.free()
                        freeing.append((t, t._pack.reservation.mapped))
                        with pytest.raises(UseAfterFreeError):
                            t.free()  # queued for freeing already
                    assert t.state is state  # deferred
                if fail:
                    raise Boom
        except Boom:
            assert self.fingerprint() == before
            return
        self.state.update(done)
        for t, mapped in freeing:  # before the batch's publishes: their epoch covers them
            assert t.state is TextState.FREED
            self.freed_now(t, mapped, self.footprint(t), started)

    @rule(t=texts, data=st.data())
    def shrink(self, t: JitText, data: st.DataObject) -> None:
        """The tail back under free's rules; growing, WRITING and FREED texts refused."""
        state = self.state[t]
        if state is TextState.FREED:
            self.refused(lambda: t.shrink(1), UseAfterFreeError)
            return
        if state is TextState.WRITING:
            self.refused(lambda: t.shrink(1), BadStateError)
            return
        self.refused(lambda: t.shrink(t.size + 1), SizeError)
        new = data.draw(st.integers(1, t.size))
        lo, hi = self.footprint(t)
        mapped, (started, _) = t._pack.reservation.mapped, self.stamp()
        before = t.read()
        gran = self.a.granularity
        for chunk in range(lo, hi, gran):  # what the chunks freed now leave behind
            self.leftover[chunk] = self.backend.read(chunk, gran)
        t.shrink(new)
        assert t.size == new and t.read() == before[:new] and t.state is state
        new_lo, new_hi = self.footprint(t)
        assert new_lo == lo and t.address + new <= new_hi <= hi
        if state is TextState.LIVE:  # the rest of its last chunk keeps the old code
            self.kept[t] = self.backend.read(t.address + new, new_hi - t.address - new)
        if mapped and new_hi < hi:
            self.freed.append((new_hi, hi, started))

    @rule(target=datas, size=st.integers(1, 5000), align=st.sampled_from([1, 16, 64, 4096]), near_a_text=st.booleans())
    def data_alloc(self, size: int, align: int, near_a_text: bool) -> JitData:
        live = [t for t, s in self.state.items() if s is not TextState.FREED]
        near = live[0].address if near_a_text and live else None
        packs = [p.reservation for p in self.a._pool.packs]
        d = self.a.jit_data_alloc(size, near=near, align=align)
        assert d.size == size and d.address % max(align, 16) == 0 and d.read() == bytes(size)
        reach = self.spec.branch_reach
        anchors = [near] if near is not None else [a for r in packs for a in (r.address, r.address + r.capacity - 1)]
        assert all(abs(d.address - x) <= reach and abs(d.address + size - 1 - x) <= reach for x in anchors)
        self.data[d] = bytes(size)
        return d

    @rule(d=datas, data=st.data())
    def data_write(self, d: JitData, data: st.DataObject) -> None:
        old = self.data[d]
        if old is None:
            self.refused(lambda: d.write(0, b"x"), UseAfterFreeError)
            return
        self.refused(lambda: d.write(d.size, b"x"), execmem.OutOfBoundsError)
        payload = data.draw(st.binary(min_size=1, max_size=min(64, d.size)))
        offset = data.draw(st.integers(0, d.size - len(payload)))
        d.write(offset, payload)
        self.data[d] = old[:offset] + payload + old[offset + len(payload) :]

    @rule(d=datas)
    def data_free(self, d: JitData) -> None:
        if self.data[d] is None:
            self.refused(d.free, UseAfterFreeError)
            return
        started = self.stamp()[0]
        d.free()
        self.data[d] = None
        assert self.stamp()[0] == started  # no synchronization for data

    @rule()
    def forced_epoch(self) -> None:
        with self.a._lock:
            self.a._pool.remote_cse([])

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def states_match(self) -> None:
        if not hasattr(self, "a"):
            return
        for t, state in self.state.items():
            assert t.state is state

    @invariant()
    def no_overlap_and_inside_reservations(self) -> None:
        if not hasattr(self, "a"):
            return
        live = {r.address: r for r in self.backend.reservations}
        spans = []
        for t, state in self.state.items():
            if state is TextState.FREED and t not in self.pinned:
                continue
            res = t._pack.reservation
            assert live.get(res.address) is res
            lo, hi = self.footprint(t)
            assert res.address <= lo <= t.address and t.address + t.size <= hi <= res.address + res.size
            assert t.address % self.align[t] == 0
            if state is TextState.LIVE or t in self.pinned:
                assert res.mapped
            spans.append((lo, hi))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "texts overlap"

    @invariant()
    def memory_is_trap_except_published_code(self) -> None:
        if not hasattr(self, "a"):
            return
        gran = self.a.granularity
        packs = {pack.reservation.address: pack for pack, _ in self.a._pool.rows()}
        for res in self.backend.reservations:
            expected = bytearray(self.spec.trap_bytes(res.size))
            chunks = packs[res.address].chunks
            assert not chunks.dirty & chunks.used, "a chunk not refilled was handed out"
            for i in range(chunks.n):
                if chunks.dirty >> i & 1:  # freed, not refilled yet: what the text left
                    expected[i * gran : (i + 1) * gran] = self.leftover[res.address + i * gran]
            for t, state in self.state.items():
                if t in self.pinned and t._pack.reservation is res:  # its code until reclaimed
                    lo, hi = self.footprint(t)
                    for chunk in range(lo, hi, gran):
                        expected[chunk - res.address : chunk - res.address + gran] = self.leftover[chunk]
                if state in (TextState.LIVE, TextState.WRITING) and t._pack.reservation is res:
                    offset = t.address - res.address
                    expected[offset : offset + t.size] = t.read()
                    kept = self.kept.get(t, b"")
                    expected[offset + t.size : offset + t.size + len(kept)] = kept
            assert self.backend.read(res.address, res.size) == bytes(expected)

    @invariant()
    def data_regions_hold_what_was_written(self) -> None:
        if not hasattr(self, "a"):
            return
        regions = self.backend.data_regions
        assert not any(r.mapped for r in regions)  # never executable
        spans = []
        for d, expected in self.data.items():
            if expected is None:
                continue
            assert any(r.address <= d.address and d.address + d.size <= r.address + r.size for r in regions)
            assert self.backend.read(d.address, d.size) == expected
            spans.append((d.address, d.address + d.size))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "data regions overlap"
        totals = self.a.stats()["data"]
        assert totals["regions"] == len(spans) and totals["live_bytes"] == sum(e - s for s, e in spans)

    @invariant()
    def accounting_adds_up(self) -> None:
        if not hasattr(self, "a"):
            return
        stats: dict[str, Any] = self.a.stats()
        gran = self.a.granularity
        total = 0
        for pack in stats["packs"]:
            assert pack["live_bytes"] + pack["free_bytes"] + pack["quarantined_bytes"] == pack["size"]
            assert pack["unfilled_bytes"] <= pack["free_bytes"]
            total += pack["live_bytes"]
        footprints = sum(
            self.footprint(t)[1] - self.footprint(t)[0] for t, s in self.state.items() if s is not TextState.FREED or t in self.pinned
        )
        assert total == footprints == stats["totals"]["live_bytes"]
        assert footprints % gran == 0
        for state in (TextState.RESERVED, TextState.WRITING, TextState.LIVE):
            assert stats["texts"][state.name] == sum(1 for s in self.state.values() if s is state)
        assert stats["texts"]["FREED"] == sum(1 for s in self.state.values() if s is TextState.FREED)
        assert len(stats["packs"]) == len(self.backend.reservations)
        assert stats["epochs"]["completed"] == stats["epochs"]["started"] == self.backend.remote_cse_count
        empty_mapped = [p for p in stats["packs"] if not p["dedicated"] and not p["retired"] and p["live_bytes"] == 0]
        assert len(empty_mapped) <= self.a.keep_empty


_SETTINGS = settings(parent=settings.get_profile("execmem"))


class X86Machine(AllocatorMachine):
    ARCH = "x86_64"


class Arm64Machine(AllocatorMachine):
    ARCH = "arm64"


class CoarseUnitMachine(AllocatorMachine):
    """mprotect-like backend: writes change whole 4 KiB pages."""

    ARCH = "x86_64"
    WRITE_UNIT = 4096


TestX86 = X86Machine.TestCase
TestX86.settings = _SETTINGS
TestArm64 = Arm64Machine.TestCase
TestArm64.settings = _SETTINGS
TestCoarseUnits = CoarseUnitMachine.TestCase
TestCoarseUnits.settings = _SETTINGS
