"""Pure parts of the native backend, checked on any host: CTR_EL0 decoding, the
routine texts of every architecture (decoded back with Capstone), /proc parsing."""

from __future__ import annotations

from collections.abc import Callable

import capstone
import pytest

import execmem.arch
from execmem._errors import SystemCallError, UnsupportedError
from execmem.native import _libc, _procmaps, _routines, _sync
from execmem.native._mapping import _runs, round_up

pytestmark = pytest.mark.usefixtures("other_thread")


# (CTR_EL0, icache line, dcache line, L1Ip, IDC, DIC, where the value comes from)
CTR_TABLE = [
    (0x84448004, 64, 64, 2, False, False, "Cortex-A53 (QEMU cpu model)"),
    (0x8444C004, 64, 64, 3, False, False, "Cortex-A57/A72, Neoverse N1 (QEMU cpu models)"),
    (0xB444C004, 64, 64, 3, True, True, "Neoverse V1: DIC and IDC set (QEMU cpu model)"),
    (0x000000049444C004, 64, 64, 3, True, False, "Cortex-A710: IDC, TminLine in [37:32] (QEMU)"),
    (0x80030003, 32, 32, 0, False, False, "synthetic: 32-byte lines"),
    (0x8000_0000 | (2 << 16) | 1, 8, 16, 0, False, False, "synthetic: different line sizes"),
]


@pytest.mark.parametrize(("raw", "iline", "dline", "l1ip", "idc", "dic", "source"), CTR_TABLE)
def test_decode_ctr_el0(raw: int, iline: int, dline: int, l1ip: int, idc: bool, dic: bool, source: str) -> None:
    cache = _sync.decode_ctr_el0(raw)
    assert (cache.icache_line, cache.dcache_line, cache.l1ip, cache.idc, cache.dic) == (
        iline,
        dline,
        l1ip,
        idc,
        dic,
    ), source
    assert cache.features == frozenset(n for n, on in (("idc", idc), ("dic", dic)) if on)
    # The recipe drops exactly the steps the features make unnecessary.
    arm = execmem.arch.get("arm64")
    names = [s.name for s in arm.publish.effective(cache.features)]
    assert ("clean_dcache" in names) is not idc
    assert ("invalidate_icache" in names) is not dic


def test_decode_ctr_el0_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        _sync.decode_ctr_el0(-1)


def _disasm(spec: execmem.arch.ArchSpec, code: bytes) -> list[tuple[str, str]]:
    assert spec.engines.capstone is not None
    cs = capstone.Cs(*spec.engines.capstone)
    out = [(i.mnemonic, i.op_str) for i in cs.disasm(code, 0)]
    assert sum(len(i.bytes) for i in cs.disasm(code, 0)) == len(code), "undecodable bytes"
    return out


#: What each routine must contain (mnemonics in order), per architecture.
EXPECTED: dict[str, dict[str, list[str]]] = {
    "x86_64": {
        "store1": ["mov", "ret"],
        "store2": ["mov", "ret"],
        "store4": ["mov", "ret"],
        "store8": ["mov", "ret"],
        # IRET to self: the frame (ss, rsp, rflags, cs, rip) pushed by hand.
        "local_cse": ["mov", "push", "lea", "push", "pushfq", "mov", "push", "lea", "push", "iretq", "ret"],
        "has_serialize": [
            "push", "xor", "cpuid", "cmp", "jb", "mov", "xor", "cpuid", "mov", "shr", "and", "jmp", "xor", "pop", "ret",
        ],
    },
    "arm64": {
        "store1": ["strb", "ret"],
        "store2": ["strh", "ret"],
        "store4": ["str", "ret"],
        "store8": ["str", "ret"],
        "read_cache_type": ["mrs", "ret"],
        "barrier": ["dsb", "ret"],
        "local_cse": ["isb", "ret"],
        "clean_dcache": ["sub", "bic", "dc", "add", "cmp", "b.lo", "ret"],
        "invalidate_icache": ["sub", "bic", "ic", "add", "cmp", "b.lo", "ret"],
    },
    "riscv64": {
        "store1": ["sb", "ret"],
        "store2": ["sh", "ret"],
        "store4": ["sw", "ret"],
        "store8": ["sd", "ret"],
        "barrier": ["fence", "ret"],
        "local_cse": ["fence.i", "ret"],
    },
}


#: Routines checked otherwise: SERIALIZE is unknown to Capstone 5 (its bytes are
#: checked), the fork probes are run in Unicorn (test_native_probe.py).
OTHERWISE = {"serialize", "probe_membarrier"}


@pytest.mark.parametrize("name", execmem.arch.names())
def test_routines_assemble_and_decode(name: str) -> None:
    spec = execmem.arch.get(name)
    code = {k: v for k, v in _routines.assemble(spec).items() if k not in OTHERWISE}
    assert set(code) == set(EXPECTED[name])
    for routine, blob in code.items():
        assert len(blob) % spec.insn_align == 0
        mnemonics = [m for m, _ in _disasm(spec, blob)]
        assert mnemonics == EXPECTED[name][routine], (routine, mnemonics)


def test_arm64_routine_operands() -> None:
    spec = execmem.arch.get("arm64")
    code = _routines.assemble(spec)
    assert _disasm(spec, code["read_cache_type"])[0] == ("mrs", "x0, ctr_el0")
    assert _disasm(spec, code["barrier"])[0] == ("dsb", "ish")
    assert ("dc", "cvau, x0") in _disasm(spec, code["clean_dcache"])
    assert ("ic", "ivau, x0") in _disasm(spec, code["invalidate_icache"])
    # Known encodings (Arm ARM): MRS X0, CTR_EL0 = 0xd53b0020; ISB = 0xd5033fdf.
    assert code["read_cache_type"][:4] == (0xD53B0020).to_bytes(4, "little")
    assert code["local_cse"][:4] == (0xD5033FDF).to_bytes(4, "little")
    # The loops branch back to the maintenance instruction (a loop of one line each).
    loop = _disasm(spec, code["clean_dcache"])
    assert loop[5][0] == "b.lo" and loop[5][1] == "#8"


def test_x86_local_cse_routines_are_serializing_on_the_model() -> None:
    """What the host runs as local_cse is what the model treats as a serializing event:
    the modeled machine performs ``local_cse`` as its "serialize" fence (x86_64_isa
    STEP_FENCES), and decodes both host routines' key instruction to that fence."""
    from execmem.arch import x86_64_isa

    spec = execmem.arch.get("x86_64")
    code = _routines.assemble(spec)
    assert code["serialize"] == bytes.fromhex("0f01e8c3")  # SERIALIZE; RET (SDM Vol. 2B)
    assert x86_64_isa.STEP_FENCES["local_cse"] == ("serialize",)
    for routine, event in (("serialize", "serialize"), ("local_cse", "iret")):
        blob, found = code[routine], []
        at = 0
        while at < len(blob):
            decoded = x86_64_isa.decode_bytes(blob[at:])
            found.append(decoded)
            at += decoded.length
        fences = [d for d in found if d.fence == "serialize"]
        assert len(fences) == 1 and fences[0].mnemonic.startswith(event), (routine, found)
        assert event in spec.cse_events
    # The has_serialize test reads CPUID leaf 7, EDX bit 14, only if leaf 7 exists.
    assert ("mov", "eax, 7") in _disasm(spec, code["has_serialize"])
    assert ("shr", "eax, 0xe") in _disasm(spec, code["has_serialize"])


def test_x86_store_operands() -> None:
    spec = execmem.arch.get("x86_64")
    code = _routines.assemble(spec)
    assert _disasm(spec, code["store8"])[0] == ("mov", "qword ptr [rdi], rsi")
    assert _disasm(spec, code["store1"])[0] == ("mov", "byte ptr [rdi], sil")


def test_riscv_words_are_hand_encoded() -> None:
    spec = execmem.arch.get("riscv64")
    code = _routines.assemble(spec)
    assert _disasm(spec, code["store8"]) == [("sd", "a1, 0(a0)"), ("ret", "")]
    assert _disasm(spec, code["barrier"])[0] == ("fence", "rw, rw")
    assert _routines.words(".word 0x1; .word 2") == b"\x01\0\0\0\x02\0\0\0"
    assert _routines.words("nop") is None
    assert _routines.words("") is None


def test_layout_aligns_and_trap_fills() -> None:
    image, offsets = _routines.layout({"a": b"\x90", "b": b"\xc3\xc3"}, b"\xcc")
    assert offsets == {"a": 0, "b": 16}
    assert image[1:16] == b"\xcc" * 15 and image[16:] == b"\xc3\xc3"


def test_unknown_routine_name_is_rejected() -> None:
    spec = execmem.arch.get("x86_64")
    bad = execmem.arch.ArchSpec(**{**spec.__dict__, "host_routines": (("frobnicate", "ret"),)})
    with pytest.raises(UnsupportedError):
        _routines.assemble(bad)


def test_every_host_has_a_sync_builder() -> None:
    # The builder table covers every architecture the arch layer knows.
    assert set(_sync.HOSTS) == set(execmem.arch.names())


MAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon
7f1c00000000-7f1c00200000 r-xs 00000000 00:01 1234                       /memfd:execmem (deleted)
7f1c00200000-7f1c00400000 rw-s 00000000 00:01 1234                       /memfd:execmem (deleted)
7f1c00400000-7f1c00401000 rwxp 00000000 00:00 0
7ffd1b1e0000-7ffd1b201000 rw-p 00000000 00:00 0                          [stack]
"""


def test_parse_maps_and_wx() -> None:
    vmas = _procmaps.parse_maps(MAPS)
    assert len(vmas) == 5
    assert vmas[1].path == "/memfd:execmem (deleted)" and vmas[1].executable and vmas[1].shared
    assert [v.start for v in _procmaps.wx_violations(vmas=vmas)] == [0x7F1C00400000]
    assert _procmaps.wx_violations([(0x7F1C00000000, 0x400000)], vmas=vmas) == []


SMAPS = """\
7f1c00000000-7f1c00200000 r-xs 00000000 00:01 1234                       /memfd:execmem (deleted)
Size:               2048 kB
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
AnonHugePages:         0 kB
VmFlags: rd ex sh mr mw me ms
7f1c00200000-7f1c00400000 rw-p 00000000 00:00 0
Size:               2048 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac
"""


def test_parse_smaps_sums_overlapping_only() -> None:
    first = _procmaps.parse_smaps(SMAPS, [(0x7F1C00000000, 4096)])
    assert first["vmas"] == 1 and first["ShmemPmdMapped"] == 2 << 20 and first["Size"] == 2 << 20
    assert _procmaps.huge_bytes(first) == 2 << 20
    both = _procmaps.parse_smaps(SMAPS, None)
    assert both["vmas"] == 2 and _procmaps.huge_bytes(both) == 4 << 20
    assert _procmaps.parse_smaps(SMAPS, [(0x1000, 0x1000)]) == {"vmas": 0}


def test_page_runs_and_rounding() -> None:
    assert _runs([5, 1, 2, 3, 7, 8]) == [(1, 3), (5, 1), (7, 2)]
    assert _runs([]) == []
    assert round_up(1, 4096) == 4096 and round_up(8192, 4096) == 8192


# --- the per-host builders, driven with recording routines and system calls -----------


class RecordingSyscalls(_libc.Syscalls):
    """Answers membarrier / riscv_flush_icache like a kernel that has them, and records."""

    def __init__(self, mask: int = 0x1FF) -> None:
        super().__init__()
        self.mask = mask
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def membarrier(self, cmd: int, flags: int = 0) -> int:
        self.calls.append(("membarrier", (cmd,)))
        return self.mask if cmd == 0 else 0

    def riscv_flush_icache(self, start: int, end: int, flags: int) -> None:
        self.calls.append(("riscv_flush_icache", (start, end, flags)))


def recording_routines(spec: execmem.arch.ArchSpec, ctr: int, calls: list[tuple[str, tuple[int, ...]]]) -> _routines.HostRoutines:
    def make(name: str) -> Callable[..., object]:
        def routine(*args: int) -> object:
            calls.append((name, args))
            return ctr if name == "read_cache_type" else None

        return routine

    return _routines.HostRoutines(0, 0, {name: make(name) for name, _ in spec.host_routines})


SAFE = lambda: _sync.ProbeResult(True, "test")  # noqa: E731


def test_arm64_builder_runs_routines_per_line() -> None:
    spec = execmem.arch.get("arm64")
    sys_ = RecordingSyscalls()
    calls: list[tuple[str, tuple[int, ...]]] = []
    sync = _sync.Synchronizer(spec, sys_, recording_routines(spec, 0x9444C004, calls), page_size=4096, probe=SAFE)
    assert sync.features == frozenset({"idc"}) and sync.lines == (64, 64)
    calls.clear()  # drop the CTR_EL0 read
    ranges = [(0x10010, 100), (0x20000, 0), (0x30000, 64)]
    for step in [s.name for s in spec.publish.effective(sync.features) if s.name != "write"]:
        sync.run(step, ranges)
    # IDC=1: no DC CVAU; IC IVAU over each non-empty range with the I-line size.
    assert calls == [
        ("barrier", ()),
        ("invalidate_icache", (0x10010, 0x10074, 64)),
        ("invalidate_icache", (0x30000, 0x30040, 64)),
        ("barrier", ()),
        ("local_cse", ()),
    ]
    assert sys_.calls == [("membarrier", (0,)), ("membarrier", (64,)), ("membarrier", (32,))]
    described = sync.describe()
    assert described["ctr_el0"] == "0x9444c004" and described["remote_cse"] == "membarrier-sync-core"
    # arm64 never falls back to an mprotect IPI: broadcast TLBI sends none (seeds/000).
    without = RecordingSyscalls(mask=0)
    arm = _sync.Synchronizer(spec, without, recording_routines(spec, 0x8444C004, []), page_size=4096, probe=SAFE)
    with pytest.raises(SystemCallError):
        arm.run("remote_cse", ranges)
    assert "mprotect-ipi" not in " ".join(arm.describe()["notes"])  # type: ignore[arg-type]


def test_arm64_builder_cleans_with_dminline() -> None:
    spec = execmem.arch.get("arm64")
    calls: list[tuple[str, tuple[int, ...]]] = []
    ctr = 0x8000_0000 | (2 << 16) | 1  # D-line 16 B, I-line 8 B
    sync = _sync.Synchronizer(spec, RecordingSyscalls(), recording_routines(spec, ctr, calls), page_size=4096, probe=SAFE)
    calls.clear()
    sync.run("clean_dcache", [(0x1000, 32)])
    sync.run("invalidate_icache", [(0x1000, 32)])
    assert calls == [("clean_dcache", (0x1000, 0x1020, 16)), ("invalidate_icache", (0x1000, 0x1020, 8))]


@pytest.mark.parametrize(("has", "used", "how"), [(1, "serialize", "serialize"), (0, "local_cse", "iret to self")])
def test_x86_64_builder_picks_serialize_or_iret_once(has: int, used: str, how: str) -> None:
    spec = execmem.arch.get("x86_64")
    calls: list[tuple[str, tuple[int, ...]]] = []
    routines = recording_routines(spec, 0, calls)
    routines.functions["has_serialize"] = lambda: calls.append(("has_serialize", ())) or has
    for _ in range(2):  # a second backend of the process asks nothing again
        sync = _sync.Synchronizer(spec, RecordingSyscalls(), routines, page_size=4096, probe=SAFE)
        sync.run("local_cse", [])
    assert calls == [("has_serialize", ()), (used, ()), (used, ())]
    assert str(sync.describe()["how"]["local_cse"]).startswith(how)  # type: ignore[index]
    assert routines.probed == {"serialize": bool(has)}


def test_riscv64_builder_uses_fences_and_flush_icache() -> None:
    spec = execmem.arch.get("riscv64")
    sys_ = RecordingSyscalls()
    calls: list[tuple[str, tuple[int, ...]]] = []
    sync = _sync.Synchronizer(spec, sys_, recording_routines(spec, 0, calls), page_size=4096, probe=SAFE)
    for step in [s.name for s in spec.publish.steps if s.name != "write"]:
        sync.run(step, [(0x4000, 16), (0x8000, 8)])
    assert calls == [("barrier", ()), ("local_cse", ())]
    assert sys_.calls == [("riscv_flush_icache", (0x4000, 0x8008, 0))]
    assert sync.describe()["remote_cse"] == "riscv_flush_icache"
