"""Call gates (``execmem._gates``): a call through ``function()`` goes through a small
generated gate that counts it in flight, forwards every argument and refuses a freed
text with ``UseAfterFreeError``.  The templates of every architecture are checked on
any host (arm64's also runs, under Unicorn); native calls on the host with its test
programs, and the x86-64 calling convention's corners (stack arguments, SSE and x87
results) on x86-64."""

from __future__ import annotations

import ctypes
import platform
import threading
import time
from collections.abc import Iterator

import programs as P
import pytest

import execmem
from execmem import UseAfterFreeError, _gates
from execmem.arch import get, names
from execmem.native import NativeBackend, _procmaps

x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="the x86-64 calling convention's corners, in x86-64 code"
)
I64 = ctypes.c_int64


@pytest.fixture
def a() -> Iterator[execmem.Allocator]:
    with NativeBackend() as backend, execmem.Allocator(backend=backend, pack_size=1 << 16) as allocator:
        yield allocator


def text(a: execmem.Allocator, source: str) -> execmem.JitText:
    return P.published(a, execmem.asm(source, "x86_64"), size=256)


# --- the templates, on any host ---------------------------------------------------------


@pytest.mark.parametrize("arch", names())
def test_every_gate_template_assembles_and_its_stub_is_patchable(arch: str) -> None:
    spec = get(arch)
    if not spec.call_gate:
        pytest.skip(f"{arch}: no gate template (calls are counted in Python there)")
    assert execmem.asm(spec.call_gate, arch) and execmem.asm(spec.gate_retire, arch)
    record, gate = 0x7E5E_6A7E_0000_0001, 0x7E5E_6A7E_0000_0002
    stub = execmem.asm(spec.gate_stub.format(RECORD=hex(record), GATE=hex(gate)), arch)
    assert len(stub) <= _gates.STUB_BYTES
    for value in (record, gate):
        assert stub.count(value.to_bytes(8, "little")) == 1, f"{arch}: the stub must hold each address once"


def test_the_arm64_gate_runs_under_unicorn() -> None:
    """The arm64 template, executed (Unicorn, any host): eight register and two stack
    arguments and a double reach the text although the GIL call clobbers them, the
    count is 1 during the call and 0 after, the saved state reaches RESTORE, sp and
    callee-saved registers come back; with the flag set it calls RAISE(exception,
    message), returns 0 and leaves the count at 0."""
    import struct

    from unicorn import UC_ARCH_ARM64, UC_MODE_ARM, Uc
    from unicorn import arm64_const as uc

    spec = get("arm64")
    code, data, stack, end = 0x100000, 0x200000, 0x300000, 0x1F0000
    gate, stub, target, save, restore, raise_ = (code + k * 0x1000 for k in range(6))
    record, slot, seen = data, data + 0x40, data + 0x80

    def at(address: int) -> str:
        return "\n".join([f"movz x10, #{address & 0xFFFF}"] + [f"movk x10, #{address >> s & 0xFFFF}, lsl #{s}" for s in (16, 32, 48)])

    programs = {
        gate: spec.call_gate,
        stub: spec.gate_stub.format(RECORD=hex(record), GATE=hex(gate)),
        # x0 + 2 x1 + ... + 128 x7 + 256 [sp] + 512 [sp + 8] + 1024 d7; the count in flight to seen
        target: at(slot) + "\nldr x11, [x10]\n" + at(seen) + "\nstr x11, [x10]\n"
        + "\n".join(f"add x0, x0, x{i}, lsl #{i}" for i in range(1, 8))
        + "\nldr x9, [sp]\nadd x0, x0, x9, lsl #8\nldr x9, [sp, #8]\nadd x0, x0, x9, lsl #9"
        + "\nfcvtzs x9, d7\nadd x0, x0, x9, lsl #10\nret",
        # PyEval_SaveThread's stand-in clobbers every argument register, returns a state
        save: "\n".join([f"mov x{i}, #0" for i in range(1, 9)] + [f"fmov d{i}, xzr" for i in range(8)]) + "\nmov x0, #0x55\nret",
        restore: at(seen + 8) + "\nstr x0, [x10]\nret",
        raise_: at(seen + 16) + "\nstp x0, x1, [x10]\nret",
    }
    emu = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    emu.mem_map(end, 0x1000)
    for base in (code, data, stack):
        emu.mem_map(base, 0x10000)
    for address, source in programs.items():
        emu.mem_write(address, execmem.asm(source, "arm64", address))
    fields = {"SLOT": slot, "TARGET": target, "STACK": 64, "SAVE": save, "RESTORE": restore, "RAISE": raise_,
              "EXC": 0xE1, "MSG": 0xE2}
    emu.mem_write(record, b"".join(fields[name].to_bytes(8, "little") for name in _gates.RECORD_FIELDS))

    def read(address: int) -> int:
        return int.from_bytes(emu.mem_read(address, 8), "little")

    def call(args: list[int], on_stack: list[int]) -> int:
        sp = stack + 0x8000
        emu.mem_write(sp, b"".join(v.to_bytes(8, "little") for v in on_stack) + bytes(64))
        emu.reg_write(uc.UC_ARM64_REG_SP, sp)
        for i, value in enumerate(args):
            emu.reg_write(uc.UC_ARM64_REG_X0 + i, value)
        emu.reg_write(uc.UC_ARM64_REG_D7, struct.unpack("<Q", struct.pack("<d", 3.0))[0])
        kept = {r: 0x1000 + r for r in (19, 20, 21, 22, 29)}
        for r, value in kept.items():
            emu.reg_write(getattr(uc, f"UC_ARM64_REG_X{r}"), value)
        emu.reg_write(uc.UC_ARM64_REG_LR, end)
        emu.emu_start(stub, end)
        assert emu.reg_read(uc.UC_ARM64_REG_SP) == sp
        assert {r: emu.reg_read(getattr(uc, f"UC_ARM64_REG_X{r}")) for r in kept} == kept
        return int(emu.reg_read(uc.UC_ARM64_REG_X0))

    args, on_stack = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3]
    assert call(args, on_stack) == sum(v << i for i, v in enumerate([*args, *on_stack, 3]))
    assert (read(seen), read(seen + 8), read(slot)) == (1, 0x55, 0)  # counted during the call only
    emu.mem_write(slot + 8, (1).to_bytes(8, "little"))  # retired: the text was freed
    assert call(args, on_stack) == 0
    assert (read(seen + 16), read(seen + 24), read(slot)) == (0xE1, 0xE2, 0)


@pytest.mark.parametrize(
    ("argtypes", "expected"),
    [
        ((), 64),
        ((I64,) * 6, 64),
        ((I64,) * 10, 80),
        ((ctypes.c_double, ctypes.c_longdouble), 64),
        ((type("Big", (ctypes.Structure,), {"_fields_": [("b", ctypes.c_char * 100)]}),), 112),
    ],
)
def test_stack_bytes_bound_what_a_prototype_can_pass(argtypes: tuple[type, ...], expected: int) -> None:
    assert _gates.stack_bytes(argtypes) == expected


# --- calls through gates ------------------------------------------------------------------


@x86_only
def test_register_and_stack_arguments_reach_the_text(a: execmem.Allocator) -> None:
    """Ten integers: six in registers, four on the stack (copied by the gate), and the
    SysV alignment of the stack at the text's entry (rsp % 16 == 8, checked by the code)."""
    t = text(a, """
        lea rax, [rsp + 8]
        test rax, 15
        jnz misaligned
        mov rax, rdi
        imul rax, 1
        lea rax, [rax + 2*rsi]
        lea rax, [rax + 4*rdx]
        lea rax, [rax + 8*rcx]
        mov r10, r8
        imul r10, 16
        add rax, r10
        mov r10, r9
        imul r10, 32
        add rax, r10
        mov r10, [rsp + 8]
        imul r10, 64
        add rax, r10
        mov r10, [rsp + 16]
        imul r10, 128
        add rax, r10
        mov r10, [rsp + 24]
        imul r10, 256
        add rax, r10
        mov r10, [rsp + 32]
        imul r10, 512
        add rax, r10
        ret
    misaligned:
        mov rax, -1
        ret
    """)
    fn = t.function(I64, *(I64,) * 10)
    args = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    assert fn(*args) == sum(v << i for i, v in enumerate(args))


@x86_only
def test_floating_point_arguments_and_results(a: execmem.Allocator) -> None:
    """Eight doubles in xmm0-7, two on the stack, an integer in rdi: their sum in xmm0."""
    t = text(a, """
        addsd xmm0, xmm1
        addsd xmm0, xmm2
        addsd xmm0, xmm3
        addsd xmm0, xmm4
        addsd xmm0, xmm5
        addsd xmm0, xmm6
        addsd xmm0, xmm7
        addsd xmm0, qword ptr [rsp + 8]
        addsd xmm0, qword ptr [rsp + 16]
        cvtsi2sd xmm1, rdi
        addsd xmm0, xmm1
        ret
    """)
    fn = t.function(ctypes.c_double, I64, *(ctypes.c_double,) * 10)
    assert fn(100, *(float(i) / 4 for i in range(10))) == 100 + sum(i / 4 for i in range(10))


@x86_only
def test_a_long_double_result_comes_back_through_the_gate_that_keeps_the_gil(a: execmem.Allocator) -> None:
    t = text(a, "fld1\nfld1\nfaddp\nret")  # 2.0 in st0
    assert t.function(ctypes.c_longdouble)() == 2.0


@P.needs_programs
def test_the_gil_is_released_during_a_call(a: execmem.Allocator) -> None:
    """The text spins until another Python thread sets a flag: it could not, were the
    GIL held for the call."""
    t = P.published(a, P.SPIN, size=256)
    fn = t.function(ctypes.c_int, ctypes.c_void_p)
    flag = ctypes.c_uint64(0)
    setter = threading.Thread(target=lambda: (time.sleep(0.05), setattr(flag, "value", 1)))
    setter.start()
    assert fn(ctypes.addressof(flag)) == 7
    setter.join()


@P.needs_programs
def test_a_call_after_free_or_close_raises_and_never_enters_the_text(a: execmem.Allocator) -> None:
    t = P.published(a, P.const(1), size=256)
    fn = t.function(ctypes.c_int)
    assert fn() == 1 and isinstance(fn, execmem.JitFunction) and fn.text is t and fn.address == t.address
    t.free()
    with pytest.raises(UseAfterFreeError, match="has been freed"):
        fn()
    assert t._inflight == 0  # the refused call was counted and uncounted
    u = P.published(a, P.const(2), size=256)
    g = u.function(ctypes.c_int)
    a.close()
    with pytest.raises(UseAfterFreeError):
        g()  # the gate outlives the allocator: it refuses, never jumps into released memory


@P.needs_programs
def test_slots_are_read_write_never_executable_and_gates_read_execute(a: execmem.Allocator) -> None:
    t = P.published(a, P.const(3), size=256)
    fn = t.function(ctypes.c_int)
    assert fn() == 3
    slot = t._slot
    assert slot is not None and fn._gate is not None
    perms = {v.perms for v in _procmaps.read_maps() if v.start <= slot.address < v.end}
    assert perms == {"rw-p"}, perms
    gate = fn._gate.address
    perms = {v.perms for v in _procmaps.read_maps() if v.start <= gate < v.end}
    assert all("w" not in p and "x" in p for p in perms), perms


@P.needs_programs
def test_many_threads_calling_while_the_text_is_freed(a: execmem.Allocator) -> None:
    """Every call returns the text's value or raises UseAfterFreeError; the text is
    reclaimed once the last call has returned (the next verb finds the count at 0)."""
    t = P.published(a, P.busy(5, 100_000), size=256)  # some 50 us a call: the free lands among them
    fn = t.function(ctypes.c_int)
    outcomes: list[object] = []
    lock = threading.Lock()
    start = threading.Barrier(5)

    def caller() -> None:
        start.wait()
        for _ in range(400):
            try:
                r: object = fn()
            except UseAfterFreeError:
                r = "refused"
            with lock:
                outcomes.append(r)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for th in threads:
        th.start()
    start.wait()
    time.sleep(0.01)
    t.free()
    for th in threads:
        th.join(30)
    assert set(outcomes) <= {5, "refused"} and "refused" in outcomes
    assert a.stats()["totals"]["live_bytes"] == 0  # reclaimed: no call in flight any more
