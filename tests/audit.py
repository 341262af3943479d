"""Audits of a native allocator from the outside, shared by the reliability tests:
its invariants (:func:`audit_allocator`), the process's descriptors and the ranges
of the process's call gates (which belong to no test)."""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from typing import Any

import execmem
from execmem import TextState, _gates
from execmem.native import NativeBackend
from execmem.native._mapping import Region

PAGE = 4096


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def gate_ranges() -> list[tuple[int, int]]:
    """What the process's call gates own (``execmem._gates``): one allocator for the
    whole process, made by the first ``function()`` and never closed."""
    gates = _gates.allocator_of_gates()
    if gates is None:
        return []
    assert isinstance(gates.backend, NativeBackend)
    return list(gates.backend.owned_ranges())


def contents(backend: NativeBackend, region: Region) -> bytes | None:
    """The region's bytes as they are now (None where nothing can read them)."""
    if backend.mode == "dual-mapping":
        if region.rw_fd >= 0:  # written with pwrite: read the file the same way
            return os.pread(region.rw_fd, region.size, 0)
        return ctypes.string_at(region.write_base, region.size)
    if region.mapped or len(region.rw_pages) * PAGE >= region.size:
        return ctypes.string_at(region.address, region.size)
    return None


def audit_allocator(a: execmem.Allocator) -> list[str]:
    """Invariants of an allocator on the native backend, from the outside in:

    accounting adds up per pack and per state; every chunk that is free or
    quarantined reads as trap filler unless its refill is pending (then it is not
    handed out), every retired pack too; a LIVE text's memory equals its shadow copy,
    a RESERVED text's memory is still trap filler, and the padding around a text in
    its chunks is trap filler; chunks in use are exactly the texts' (pinned texts,
    freed while a call runs, included), none twice."""
    problems: list[str] = []
    st: dict[str, Any] = a.stats()
    backend = a.backend
    assert isinstance(backend, NativeBackend)
    gran = a.granularity
    for p in st["packs"]:
        if p["live_bytes"] + p["free_bytes"] + p["quarantined_bytes"] != p["size"]:
            problems.append(f"pack {p['address']:#x}: bytes do not add up: {p}")
    totals = st["totals"]
    for key in ("live_bytes", "free_bytes", "quarantined_bytes"):
        if totals[key] != sum(p[key] for p in st["packs"]):
            problems.append(f"totals[{key}] != sum over packs")
    live_texts = [t for t in a._texts if t.state is not TextState.FREED]
    by_state = Counter(t.state.name for t in live_texts)
    for name in ("RESERVED", "WRITING", "LIVE"):
        if st["texts"][name] != by_state[name]:
            problems.append(f"stats texts[{name}] = {st['texts'][name]}, handles say {by_state[name]}")
    for pack, retired in a._pool.rows():
        region = pack.reservation.token
        assert isinstance(region, Region)
        mem = contents(backend, region)
        traps = a.arch.trap_bytes(region.size)
        unfilled = pack.chunks.dirty
        if retired:
            if mem is not None and any(
                not unfilled >> i & 1 and mem[i * gran : (i + 1) * gran] != traps[i * gran : (i + 1) * gran]
                for i in range(pack.chunks.n)
            ):
                problems.append(f"retired pack {pack.address:#x} holds something other than traps")
            continue
        if unfilled & pack.chunks.used:
            problems.append(f"pack {pack.address:#x}: a chunk whose refill is pending was handed out")
        texts = [t for t in (*a._texts, *a._pinned) if t._pack is pack]
        owned = 0
        for t in texts:
            bits = ((1 << t._nchunks) - 1) << t._chunk
            if owned & bits:
                problems.append(f"{t!r}: chunks owned twice")
            owned |= bits
        if owned != pack.chunks.used:
            problems.append(f"pack {pack.address:#x}: chunks in use do not match the texts holding them")
        if owned & pack.chunks.quarantined:
            problems.append(f"pack {pack.address:#x}: a chunk is both in use and quarantined")
        if mem is None:
            continue
        for i in range(pack.chunks.n):
            lo, hi = i * gran, (i + 1) * gran
            if not (pack.chunks.used | unfilled) >> i & 1 and mem[lo:hi] != traps[lo:hi]:
                problems.append(f"{pack.chunks.state(i)} chunk {i} of {pack.address:#x} is not traps")
        for t in texts:
            off = t.address - pack.address
            lo, hi = t._chunk * gran, (t._chunk + t._nchunks) * gran
            body = mem[off : off + t.size]
            if t.state is TextState.LIVE and body != bytes(t._shadow):
                problems.append(f"{t!r}: memory differs from its shadow")
            if t.state is TextState.RESERVED and body != traps[off : off + t.size]:
                problems.append(f"{t!r}: RESERVED but its memory is not trap filler")
            if t.state is not TextState.FREED and (mem[lo:off] != traps[lo:off] or mem[off + t.size : hi] != traps[off + t.size : hi]):
                problems.append(f"{t!r}: padding in its chunks is not trap filler")
    return problems
