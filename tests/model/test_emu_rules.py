"""One test per rule of the modeled machine, each asserted both ways.

Every test builds a small guest program and checks that the *stale* outcome is
reachable when the architecture's required step is missing and unreachable when it
is present (exhaustive exploration).
"""

from __future__ import annotations

import pytest

from execmem.emu import Machine

NOP = 0xD503201F
B_PLUS_8 = 0x14000002  # b .+8 (skips the next instruction)


def outcomes(m: Machine, observe) -> set:
    result = m.explore(observe)
    assert result.complete and result.stuck is None
    return set(result.finals)


def self_modify(body: str, **machine) -> set[int]:
    """CPU0 overwrites `m0: b l0` with NOP, runs ``body``, then executes m0 (X9=1: new)."""
    m = Machine("arm64", cpus=1, **machine)
    p = m.load(0, f"str w0, [x1]\n{body}\nm0: b l0\nmov w9, #1\nl0:", perms="rwx")
    m.set_reg(0, "x0", NOP)
    m.set_reg(0, "x1", p.labels["m0"])
    return outcomes(m, lambda st: m.reg(st, 0, "x9"))


CACHESYNC = "dc cvau, x1\ndsb ish\nic ivau, x1\ndsb ish"


def test_sm_stale_fetch_without_and_not_with_cache_maintenance() -> None:
    assert self_modify("isb") == {0, 1}
    assert self_modify(f"{CACHESYNC}\nisb") == {1}


def test_sm_needs_the_isb_too() -> None:
    # IC+DSB without ISB: instructions already fetched stay in flight.
    assert 0 in self_modify(CACHESYNC)


def test_exception_return_is_a_context_synchronization_event() -> None:
    m = Machine("arm64", cpus=1)
    p = m.load(0, f"str w0, [x1]\n{CACHESYNC}\nadr x9, m0\nmsr elr_el1, x9\nmov x9, #0\neret\nm0: b l0\nmov w9, #1\nl0:", perms="rwx")
    m.set_reg(0, "x0", NOP)
    m.set_reg(0, "x1", p.labels["m0"])
    assert outcomes(m, lambda st: m.reg(st, 0, "x9")) == {1}
    # The same jump without ERET (a plain branch) may run the stale instruction.
    assert 0 in self_modify(f"{CACHESYNC}\nb m0")


def test_coff_instruction_cache_may_hold_several_values() -> None:
    """CoFF: a later fetch may return an older value than an earlier fetch."""

    def run(writer: str) -> set[tuple[int, int]]:
        m = Machine("arm64", cpus=2)
        # l0 runs `b l2` (W9=0) at first, NOP (W9=1) or `b .+12` (to l1: W9=2) later.
        m.load(
            1,
            "bl l0\nmov w1, w9\nbl l0\nmov w2, w9\nb end\n"
            "l0: b l2\nmov w9, #1\nret\nl1: mov w9, #2\nret\nl2: mov w9, #0\nret\nend:",
            perms="rwx",
        )
        m.load(0, writer, perms="rwx")
        m.set_reg(0, "x0", NOP)
        m.set_reg(0, "x1", m.symbol("P1:l0"))
        m.set_reg(0, "x2", 0x14000003)  # b .+12
        return outcomes(m, lambda st: (m.reg(st, 1, "w1"), m.reg(st, 1, "w2")))

    # coFF: new then old is Allowed.
    assert (1, 0) in run("str w0, [x1]")
    # coFF+cachesync: an intermediate value, cleaned and invalidated, then the final
    # one: once the final value was fetched, the first one cannot come back.
    assert (1, 0) not in run(f"str w2, [x1]\n{CACHESYNC}\nstr w0, [x1]")


def message_passing(writer_sync: str, reader: str, **machine) -> set[tuple[int, int]]:
    """CPU0 writes new code then a flag; CPU1 reads the flag, then runs the code."""
    m = Machine("arm64", cpus=2, **machine)
    reader_prog = m.load(1, f"ldr w2, [x3]\n{reader}\nm0: b l0\nmov w9, #1\nl0:", perms="rwx")
    flag = m.alloc(4)
    m.load(0, f"str w0, [x1]\n{writer_sync}\nstr w2, [x3]", perms="rwx")
    m.set_reg(0, "x0", NOP)
    m.set_reg(0, "x1", reader_prog.labels["m0"])
    m.set_reg(0, "x2", 1)
    m.set_reg(0, "x3", flag)
    m.set_reg(1, "x3", flag)
    return outcomes(m, lambda st: (m.reg(st, 1, "w2"), m.reg(st, 1, "w9")))


CTRL_ISB = "cbnz w2, l1\nl1: isb"
STALE = (1, 0)  # saw the flag, ran the old code


def test_mp_needs_cache_maintenance_and_a_reader_isb() -> None:
    assert STALE in message_passing("dmb st", CTRL_ISB)  # MP.RF+dmb.st+ctrlisb: Allowed
    assert STALE not in message_passing(CACHESYNC, CTRL_ISB)  # MP.RF+cachesync+ctrlisb: Forbidden
    assert STALE in message_passing(CACHESYNC, "")  # no ISB: the fetch may precede the load


def test_ic_may_run_on_another_cpu_than_the_writer() -> None:
    # The writer cleans; the reader invalidates (DSB; IC; DSB; ISB): Forbidden.
    reader = "dsb ish\nic ivau, x1\ndsb ish\nisb"
    m_stale = message_passing("dc cvau, x1\ndsb ish", "dsb ish\nisb")
    assert STALE in m_stale
    m = Machine("arm64", cpus=2)
    prog = m.load(1, f"ldr w2, [x3]\n{reader}\nm0: b l0\nmov w9, #1\nl0:", perms="rwx")
    flag = m.alloc(4)
    m.load(0, "str w0, [x1]\ndc cvau, x1\ndsb ish\nstr w2, [x3]", perms="rwx")
    for cpu in (0, 1):
        m.set_reg(cpu, "x1", prog.labels["m0"])
        m.set_reg(cpu, "x3", flag)
    m.set_reg(0, "x0", NOP)
    m.set_reg(0, "x2", 1)
    assert STALE not in outcomes(m, lambda st: (m.reg(st, 1, "w2"), m.reg(st, 1, "w9")))


@pytest.mark.parametrize(
    ("writer", "idc", "dic", "stale"),
    [
        ("dsb ish\nic ivau, x1\ndsb ish", False, False, True),  # no DC: stale
        ("dsb ish\nic ivau, x1\ndsb ish", True, False, False),  # IDC=1 makes the DC unnecessary
        ("dc cvau, x1\ndsb ish", False, False, True),  # no IC: stale
        ("dc cvau, x1\ndsb ish", True, True, False),  # DIC=1 makes the IC unnecessary
    ],
)
def test_cache_type_idc_dic(writer: str, idc: bool, dic: bool, stale: bool) -> None:
    assert (STALE in message_passing(writer, CTRL_ISB, idc=idc, dic=dic)) is stale


# ---------------------------------------------------------------- TLB rules
OLD_VALUE, NEW_VALUE = 0x11, 0x22


def remap(flush: list[tuple[str, tuple]], cpus: int = 2, **machine) -> set[tuple[int, int]]:
    """CPU0 remaps a data page from frame A to frame B, flushes, then sets a flag.
    CPU1 reads the flag, then (ordered by DMB LD) reads through the page: (flag, value)."""
    m = Machine("arm64", cpus=cpus, **machine)
    res = m.reserve(0x1000, 0x1000)  # a dynamic (page-table mapped) page
    frame_a = res.token.alias
    frame_b = m.reserve(0x1000, 0x1000).token.alias
    m.poke(frame_a, OLD_VALUE.to_bytes(8, "little"))
    m.poke(frame_b, NEW_VALUE.to_bytes(8, "little"))
    page = res.address
    flag = m.alloc(8)
    host = m.host(0)
    host.pte(page, frame_a, "rw").fence("dsb.full")
    m.load(1, "ldr x2, [x3]\ndmb ld\nldr x4, [x5]")
    m.set_reg(1, "x3", flag)
    m.set_reg(1, "x5", page)
    # The initial mapping must be visible everywhere before the interesting part.
    host.ipi([c for c in range(1, cpus)], "cse").wait()
    host.pte(page, frame_b, "rw")
    for kind, args in flush:
        getattr(host, kind)(*args)
    host.store(flag, 1)
    return outcomes(m, lambda st: (m.reg(st, 1, "x2"), m.reg(st, 1, "x4")))


STALE_TLB = (1, OLD_VALUE)


def test_stale_tlb_entry_survives_until_the_issuers_dsb() -> None:
    before = [("fence", ("dsb.full",)), ("tlbi", (0x4000_0000, "broadcast"))]
    assert STALE_TLB in remap(before)  # TLBI issued, never completed
    completed = remap([*before, ("fence", ("dsb.full",))])
    assert STALE_TLB not in completed
    assert (1, NEW_VALUE) in completed


def test_a_dsb_on_another_cpu_does_not_complete_a_tlbi() -> None:
    """The arm64 batched-flush bug (seeds/002): CPU2's DSB does not complete CPU0's TLBI."""
    m = Machine("arm64", cpus=3)
    res = m.reserve(0x1000, 0x1000)
    frame_a = res.token.alias
    frame_b = m.reserve(0x1000, 0x1000).token.alias
    m.poke(frame_a, OLD_VALUE.to_bytes(8, "little"))
    m.poke(frame_b, NEW_VALUE.to_bytes(8, "little"))
    page, flag, done = res.address, m.alloc(8), m.alloc(8)
    host0 = m.host(0)
    host0.pte(page, frame_a, "rw").fence("dsb.full").ipi([1, 2], "cse").wait()
    host0.pte(page, frame_b, "rw").fence("dsb.full").tlbi(page, "broadcast").store(done, 1)
    # CPU2 waits for CPU0's "TLBI issued" note, then runs a DSB and publishes the flag.
    m.load(2, "w: ldr x2, [x3]\ncbz x2, w\ndsb ish\nmov x4, #1\nstr x4, [x5]")
    m.set_reg(2, "x3", done)
    m.set_reg(2, "x5", flag)
    m.load(1, "ldr x2, [x3]\ndmb ld\nldr x4, [x5]")
    m.set_reg(1, "x3", flag)
    m.set_reg(1, "x5", page)
    result = outcomes(m, lambda st: (m.reg(st, 1, "x2"), m.reg(st, 1, "x4")))
    assert STALE_TLB in result
    assert (1, NEW_VALUE) in result


# ------------------------------------------------------------- x86 rules
def x86_cross_modify(between: list[tuple[str, tuple]], **machine) -> set[tuple[int, int]]:
    """CPU0 rewrites `mov ecx, 1` to `mov ecx, 2`, then sets a flag; CPU1 waits for the
    flag and runs the code without serializing: (flag seen, ecx)."""
    m = Machine("x86_64", cpus=2, **machine)
    flag = m.alloc(8)
    prog = m.load(1, "mov rax, [rbx]\ncode: mov ecx, 1\nnop\nnop\nnop", perms="rwx")
    m.set_reg(1, "rbx", flag)
    host = m.host(0)
    host.store(prog.labels["code"], bytes([0xB9, 2, 0, 0, 0, 0x90, 0x90, 0x90]), 8)
    for kind, args in between:
        getattr(host, kind)(*args)
    host.store(flag, 1)
    return outcomes(m, lambda st: (m.reg(st, 1, "rax"), m.reg(st, 1, "ecx")))


X86_STALE = (1, 1)


def test_x86_cross_modifying_code_needs_serialization_and_an_ipi_serializes() -> None:
    assert X86_STALE in x86_cross_modify([])
    serialized = x86_cross_modify([("ipi", ([1], "cse")), ("wait", ())])
    assert X86_STALE not in serialized
    assert (1, 2) in serialized


def test_x86_serializing_instruction_on_the_executing_cpu() -> None:
    def run(serialize: str) -> set[tuple[int, int]]:
        m = Machine("x86_64", cpus=2)
        flag = m.alloc(8)
        prog = m.load(1, f"w: mov rax, [rbx]\ntest rax, rax\njz w\n{serialize}\ncode: mov ecx, 1\nnop", perms="rwx")
        m.set_reg(1, "rbx", flag)
        m.host(0).store(prog.labels["code"], bytes([0xB9, 2, 0, 0, 0, 0x90, 0x90, 0x90]), 8).store(flag, 1)
        return outcomes(m, lambda st: m.reg(st, 1, "ecx"))

    assert run("") == {1, 2}
    assert run("cpuid") == {2}


def test_x86_own_stores_are_seen_by_own_fetches() -> None:
    m = Machine("x86_64", cpus=1)
    prog = m.load(0, "mov [rbx], rdx\ncode: mov ecx, 1\nnop\nnop\nnop", perms="rwx")
    m.set_reg(0, "rbx", prog.labels["code"])
    m.set_reg(0, "rdx", int.from_bytes(bytes([0xB9, 2, 0, 0, 0, 0x90, 0x90, 0x90]), "little"))
    assert outcomes(m, lambda st: m.reg(st, 0, "ecx")) == {2}


def test_x86_invlpgb_does_not_serialize_but_an_ipi_shootdown_does() -> None:
    page = 0x4000_0000
    invlpgb = [("tlbi", (page, "broadcast")), ("fence", ("tlbsync",))]
    ipi = [("tlbi", (page, "local")), ("ipi", ([1], "tlb", page)), ("wait", ())]
    assert X86_STALE in x86_cross_modify(invlpgb, tlb="invlpgb")
    assert X86_STALE not in x86_cross_modify(ipi)
