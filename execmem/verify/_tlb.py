"""TLB-maintenance scenarios: a page is unmapped, its frame recycled, and a CPU that
still holds the old translation writes through it (seeds/002, seeds/003).

The hazard is the same in both: the recycled frame's new contents are overwritten
by a store that went through a translation the kernel believed invalidated.  The
thread still using the page is a store through the TLB (a host action, the same as a
guest store with no barrier around it), and the kernel's barriers are the
architecture's own (``STEP_FENCES``), so only the variants name an architecture.
``tests/data/litmus-seeds/`` holds the same races as litmus tests, which
``tests/litmus/test_litmus_vmsa.py`` checks against these verdicts.
"""

from __future__ import annotations

from collections.abc import Callable

from execmem.emu import Machine, MachineState
from execmem.verify._framework import SAFE, UNSAFE, Case, Variant

OLD_DATA, NEW_OWNER, STRAY = 0x1111, 0x5EC0, 0xBAD0


def _recycled(m: Machine, frame: int) -> Callable[[MachineState], str]:
    def hazard(st: MachineState) -> str:
        value = int.from_bytes(m.read(st, frame, 8), "little")
        if value == STRAY:
            return "a stale translation wrote into a recycled page"
        return ""

    return hazard


def _fences(m: Machine, what: str) -> tuple[str, ...]:
    fences: tuple[str, ...] = m.isa.STEP_FENCES[what]
    return fences


def _batched(arch: str, fix: str) -> Case:
    """Reclaim with a batched broadcast TLB flush whose completing barrier runs on
    another CPU."""
    m = Machine(arch, cpus=3, tlb="broadcast")
    page, frame = m.page("rw", value=OLD_DATA.to_bytes(8, "little"))
    batched, flushed = m.alloc(8), m.alloc(8)
    # CPU2: a thread of the process still running, storing through the page.
    m.host(2).store(page, STRAY, note="a thread stores through the page")
    reclaim = m.host(0)
    reclaim.pte(page, None, note="ptep_clear: unmap the page")
    for name in _fences(m, "before_tlbi"):
        reclaim.fence(name)
    reclaim.tlbi(page, "broadcast", note="broadcast TLBI (batched: not completed yet)")
    if fix == "flush-mm":
        for name in _fences(m, "complete_tlbi")[:1]:
            reclaim.fence(name, note="flush_tlb_mm: the issuer's DSB completes its TLBI")
    reclaim.store(batched, 1, note="batch pending")
    reclaim.await_value(flushed, 1, note="wait for the batched flush")
    reclaim.store(frame, NEW_OWNER, note="page freed and reused: new owner's data")
    flusher = m.host(1)
    flusher.await_value(batched, 1, note="arch_flush_tlb_batched_pending")
    if fix == "ipi-issuer":
        flusher.ipi([0], "dsb", note="IPI the issuing CPU to DSB").wait()
    else:
        for name in _fences(m, "complete_tlbi")[:1]:
            flusher.fence(name, note="DSB on this CPU (completes nothing of CPU0's)")
    flusher.store(flushed, 1, note="flush done")
    return Case(m, _recycled(m, frame), ("CPU0 reclaim", "CPU1 flush", "CPU2 user"))


def tlb_batch_remote_dsb() -> list[Variant]:
    return [
        Variant(
            "tlb-batch-remote-dsb", "arm64", "remote-dsb", UNSAFE,
            "the DSB ran on CPU1; CPU0's TLBI is still incomplete, so CPU2 may keep the old "
            "translation and write into the recycled page (the bug fixed by 4b634918384c)",
            lambda: _batched("arm64", "remote-dsb"),
        ),
        Variant(
            "tlb-batch-remote-dsb", "arm64", "flush-mm", SAFE,
            "flush_tlb_mm: the issuer completes its TLBI with its own DSB before the page is freed",
            lambda: _batched("arm64", "flush-mm"),
        ),
        Variant(
            "tlb-batch-remote-dsb", "arm64", "ipi-issuer", SAFE,
            "the flushing CPU interrupts the issuer, whose handler's DSB completes the TLBI",
            lambda: _batched("arm64", "ipi-issuer"),
        ),
    ]


def _async(arch: str, wait: bool) -> Case:
    """IPI shootdown: the initiator sends the IPIs and may or may not wait for them."""
    m = Machine(arch, cpus=2, tlb="ipi")
    page, frame = m.page("rw", value=OLD_DATA.to_bytes(8, "little"))
    m.host(1).store(page, STRAY, note="a thread stores through the page")
    host = m.host(0)
    host.pte(page, None, note="unmap the page")
    host.tlbi(page, "local", note="INVLPG on this CPU")
    host.ipi([1], "tlb", page, note="shootdown IPI")
    if wait:
        host.wait(note="wait for every acknowledgement")
    host.store(frame, NEW_OWNER, note="page freed and reused: new owner's data")
    return Case(m, _recycled(m, frame), ("CPU0 unmap", "CPU1 user"))


def tlb_async_flush() -> list[Variant]:
    return [
        Variant(
            "tlb-async-flush", "x86_64", "async", UNSAFE,
            "the frame is reused before CPU1 handled the shootdown; CPU1 still writes through the old translation",
            lambda: _async("x86_64", wait=False),
        ),
        Variant(
            "tlb-async-flush", "x86_64", "sync", SAFE,
            "the initiator waits for every acknowledgement (interrupt delivery drains CPU1's store buffer)",
            lambda: _async("x86_64", wait=True),
        ),
    ]
