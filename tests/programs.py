"""Small test programs for the host architecture, so that native tests run on every
host Keystone can assemble for (x86-64, arm64) instead of hard-coding x86 bytes.

Each program has one source per architecture and the same meaning everywhere
(System V / AAPCS64 calling conventions: arguments in rdi, rsi / x0, x1; result in
rax / x0).  Programs are assembled with ``execmem.asm`` for the host at the address
they will run at, so PC-relative branches are right.

Tests that need them are marked ``@needs_programs`` (or use ``pytestmark``): on a
host Keystone cannot assemble for (riscv64), they skip with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

import execmem
import execmem.arch
from execmem._backend import Backend
from execmem.bench._publish import encoder
from execmem.native._procmaps import read_maps

HOST = execmem.arch.host()

#: How many times slower than native this interpreter may run: QEMU user mode is
#: some ten times slower (.ci/arm64.sh sets ``EXECMEM_TEST_SLOWDOWN``).  Time bounds
#: that catch hangs or blow-ups, not speed targets, are multiplied by it.
SLOWDOWN = float(os.environ.get("EXECMEM_TEST_SLOWDOWN", "1"))

#: Script text for the fork tests: ``hold_all(locks)`` returns once another thread
#: holds each lock, with the event that lets them go and the threads.
HOLD_LOCKS = """
import threading

def hold_all(locks):
    holding, release = threading.Barrier(len(locks) + 1), threading.Event()
    def hold(lock):
        with lock:
            holding.wait(10)
            release.wait(30)
    threads = [threading.Thread(target=hold, args=(lock,), daemon=True) for lock in locks]
    for th in threads:
        th.start()
    holding.wait(10)
    return release, threads
"""

#: Set by .ci/arm64.sh: this interpreter runs under QEMU user mode.
QEMU_USER = os.environ.get("EXECMEM_TEST_QEMU_USER") == "1"


@contextlib.contextmanager
def near_libc() -> Iterator[None]:
    """Placement within a direct branch's reach of libc, or a skip under QEMU user mode:
    there QEMU's own mappings, which the guest's /proc/self/maps does not show, hold
    the addresses around the guest's libc (measured on arm64, 128 MiB reach: the
    nearest free 2 MiB slot was 70 MiB below libc in a small process, none in pytest's)."""
    try:
        yield
    except execmem.OutOfMemoryError as exc:
        if QEMU_USER:
            pytest.skip(f"QEMU user mode holds the addresses near libc: {exc}")
        raise

_SOURCES: dict[str, dict[str, str]] = {
    "x86_64": {
        "ret": "ret",
        "add": "lea rax, [rdi + rsi]; ret",
        # 1 + 2 + ... + n
        "sum": "mov rcx, rdi; xor eax, eax; l: add rax, rcx; dec rcx; jnz l; ret",
        "fib": "xor eax, eax; mov ecx, 1; test rdi, rdi; jz done; "
        "again: lea rdx, [rax + rcx]; mov rax, rcx; mov rcx, rdx; dec rdi; jnz again; done: ret",
        # Returns value after a busy loop of ``loops`` iterations (a call that lasts).
        "busy": "mov eax, {value}; mov ecx, {loops}; l: dec ecx; jnz l; ret",
        # Spins until the 8 bytes at the first argument are non-zero, then returns 7.
        "spin": "spin: pause; cmp qword ptr [rdi], 0; je spin; mov eax, 7; ret",
        # Calls the function at the absolute address ``target`` (two arguments passed
        # through) and returns its result plus one.
        "call_plus_one": "mov rax, {target}; push rbp; call rax; pop rbp; add rax, 1; ret",
        # Calls the function whose address is stored at the first argument.
        "call_pointer": "mov rax, [rdi]; jmp rax",
        "patch_const": "mov eax, {value}",
    },
    "arm64": {
        "ret": "ret",
        "add": "add x0, x0, x1; ret",
        "sum": "mov x1, x0; mov x0, #0; l: add x0, x0, x1; subs x1, x1, #1; b.ne l; ret",
        "fib": "mov x1, #0; mov x2, #1; cbz x0, done; "
        "again: add x3, x1, x2; mov x1, x2; mov x2, x3; subs x0, x0, #1; b.ne again; "
        "done: mov x0, x1; ret",
        "busy": "movz w0, #{lo}; movk w0, #{hi}, lsl #16; "
        "movz w1, #{loops_lo}; movk w1, #{loops_hi}, lsl #16; l: subs w1, w1, #1; b.ne l; ret",
        "spin": "spin: yield; ldr x1, [x0]; cbz x1, spin; mov x0, #7; ret",
        "call_plus_one": "stp x29, x30, [sp, #-16]!; mov x29, sp; "
        "movz x16, #{t0}; movk x16, #{t1}, lsl #16; movk x16, #{t2}, lsl #32; movk x16, #{t3}, lsl #48; "
        "blr x16; add x0, x0, #1; ldp x29, x30, [sp], #16; ret",
        "call_pointer": "ldr x16, [x0]; br x16",
        "branch": "b {target}",
    },
}

#: Why programs are missing on this host ("" when they exist).
MISSING = (
    ""
    if HOST.name in _SOURCES and HOST.engines.keystone is not None
    else f"no test programs for {HOST.name}: Keystone 0.9.2 has no {HOST.name} assembler"
)
needs_programs = pytest.mark.skipif(bool(MISSING), reason=MISSING or "-")


def _halves(value: int) -> dict[str, int]:
    value &= 0xFFFFFFFF
    return {"value": value, "lo": value & 0xFFFF, "hi": value >> 16}


@functools.lru_cache(maxsize=4096)  # Keystone takes a millisecond or two under QEMU
def assemble(name: str, address: int = 0, **fields: int) -> bytes:
    """Program ``name`` for the host, placed at ``address``, with ``fields`` filled in."""
    source = _SOURCES[HOST.name][name].format(**fields)
    return execmem.asm(source, HOST.name, address)


def const(value: int) -> bytes:
    """``int f(void)`` returning ``value`` (taken modulo 2**32), position-independent:
    the benchmark's encoder of ``mov eax, imm32; ret`` / ``movz; movk; ret``, checked
    against Keystone once."""
    return _return_value(value & 0xFFFFFFFF)


def busy(value: int, loops: int) -> bytes:
    """``int f(void)`` returning ``value`` after ``loops`` iterations of a busy loop."""
    loop_fields = {f"loops_{k}": v for k, v in _halves(loops).items() if k != "value"}
    return assemble("busy", 0, loops=loops, **_halves(value), **loop_fields)


def call_plus_one(target: int, address: int = 0) -> bytes:
    """``int64 f(a, b)`` returning ``target(a, b) + 1``, calling it by absolute address."""
    words = {f"t{k}": (target >> (16 * k)) & 0xFFFF for k in range(4)}
    return assemble("call_plus_one", address, target=target, **words)


def synchronize(backend: Backend, address: int, size: int) -> None:
    """Make code written at ``[address, address + size)`` behind the recipe's back (by
    ``backend.write`` after it ran, by another process) visible to this process's
    instruction fetch: the maintenance steps of the host's publish recipe (arm64: DC
    CVAU, DSB, IC IVAU, DSB, ISB; x86-64: CPUID)."""
    for step in backend.arch.publish.effective(frozenset(backend.cache_features)):
        if step.name not in ("write", "remote_cse"):
            backend.run_step(step.name, [(address, size)])


def mappings_over(address: int, size: int) -> list[tuple[int, int, str]]:
    """(start, end, perms) of the mappings over the range, adjacent VMAs with the same
    protections and file joined: QEMU user mode write-protects host pages that hold
    translated code to catch self-modifying code, which splits the kernel's VMA
    where the program sees one mapping (rwx and mprotect modes)."""
    out: list[tuple[int, int, str]] = []
    last_path = None
    for v in read_maps():
        if not v.overlaps(address, size):
            continue
        if out and out[-1][1] == v.start and out[-1][2] == v.perms and last_path == v.path:
            out[-1] = (out[-1][0], v.end, v.perms)
        else:
            out.append((v.start, v.end, v.perms))
        last_path = v.path
    return out


def traps(size: int) -> bytes:
    """What unused executable memory holds: the host's trap filler."""
    return HOST.trap_bytes(size)


@contextlib.contextmanager
def native_allocator(mode: str = "dual", pack_size: int = 1 << 16) -> Iterator[execmem.Allocator]:
    """An allocator on a native backend of its own (small packs), both closed at the end."""
    from execmem.native import NativeBackend

    backend = NativeBackend(mode)
    a = execmem.Allocator(backend=backend, pack_size=pack_size)
    try:
        yield a
    finally:
        a.close()
        backend.close()


def published(a: execmem.Allocator, code: bytes = b"", *, size: int = 64,
              build: Callable[[int], bytes] | None = None) -> execmem.JitText:
    """A LIVE text of ``a`` holding ``code``, or ``build(address)`` for code that
    depends on where it runs."""
    t = a.jit_text_alloc(size)
    t.write(0, build(t.address) if build else code)
    t.map()
    return t


def live(a: execmem.Allocator, value: int, size: int = 16) -> execmem.JitText:
    """A LIVE text of ``a`` returning ``value``."""
    return published(a, const(value), size=size)


def run_in_child(child: Callable[[], int], timeout: float = 20.0) -> int:
    """Run ``child()`` in a forked child (its return value is the exit code; an
    exception is exit code 99); SIGALRM kills a child that hangs, and SIGKILL from
    here one that cannot take a signal (under QEMU user mode a child hung inside the
    emulator itself, where no guest signal arrives).  Returns the wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return to pytest
        code = 99
        try:
            import faulthandler

            faulthandler.disable()
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(timeout))
            code = child()
        except BaseException:
            code = 99
        finally:
            os._exit(code)
    deadline = time.monotonic() + 2 * timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def report_from_child(child: Callable[[], dict[str, object]]) -> tuple[dict[str, object], int]:
    """Run ``child()`` in a forked child; returns the JSON report it returned (``{}``
    if it raised) and its wait status."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which must never return to pytest
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(child()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return (json.loads(data) if data else {}), status


def exited(status: int, code: int = 0) -> bool:
    """Whether the wait ``status`` is a normal exit with ``code``."""
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == code


if not MISSING:
    _return_value = encoder(HOST)
    RET = assemble("ret")
    ADD = assemble("add")  # int64 f(int64 a, int64 b): a + b
    SUM = assemble("sum")  # int64 f(int64 n): 1 + ... + n, for n >= 1
    FIB = assemble("fib")  # int64 f(int64 n): the n-th Fibonacci number
    SPIN = assemble("spin")  # int f(uint64 *flag): spins while *flag == 0, returns 7
    CALL_POINTER = assemble("call_pointer")  # f(void **p): tail-calls *p
    CONST_SIZE = len(const(0))
else:  # pragma: no cover - only on hosts without an assembler
    RET = ADD = SUM = FIB = SPIN = CALL_POINTER = b""
    CONST_SIZE = 0

INT64 = ctypes.c_int64
ADD_T = ctypes.CFUNCTYPE(INT64, INT64, INT64)
UNARY_T = ctypes.CFUNCTYPE(INT64, INT64)
CONST_T = ctypes.CFUNCTYPE(ctypes.c_int)


@dataclass(frozen=True)
class Switch:
    """``int f(void)`` returning one of ``values``, switched among them by one live
    patch at offset 0 in a shape the host allows while other threads run it
    (``ArchSpec.patch_rule``): on x86-64 a new ``mov eax, imm32`` (one whole
    instruction in one aligned word), on arm64 a ``B`` retargeted to another
    ``return value`` block (B is on the CMODX list; a MOV is not).  With
    ``spin_loops`` each version is ``busy(value, spin_loops)``, a call that lasts."""

    values: tuple[int, ...]
    spin_loops: int = 0

    def _block(self, value: int) -> bytes:
        return busy(value, self.spin_loops) if self.spin_loops else const(value)

    def code(self, address: int) -> bytes:
        """The function, returning ``values[0]``; place it 8-byte aligned."""
        if HOST.name == "arm64":
            blocks = b"".join(self._block(v) for v in self.values)
            return assemble("branch", address, target=address + 4) + blocks
        return self._block(self.values[0])

    def patch(self, index: int, address: int) -> bytes:
        """The bytes ``update(0, ...)`` stores to make the function return ``values[index]``."""
        if HOST.name == "arm64":
            target = address + 4 + sum(len(self._block(v)) for v in self.values[:index])
            return assemble("branch", address, target=target)
        return assemble("patch_const", address, **_halves(self.values[index]))

    def image(self, index: int, address: int) -> bytes:
        """The function's bytes after ``patch(index, address)`` was stored."""
        code = bytearray(self.code(address))
        new = self.patch(index, address)
        code[: len(new)] = new
        return bytes(code)

    def word(self, index: int, address: int) -> bytes:
        """``patch`` widened to the aligned word that holds it, with the code's other
        bytes around it: what one single-copy-atomic store writes (``atomic_store``)."""
        unit = HOST.patch_rule.word
        return (self.image(index, address) + traps(unit))[:unit]


__all__ = [
    "ADD",
    "ADD_T",
    "CALL_POINTER",
    "CONST_SIZE",
    "CONST_T",
    "FIB",
    "HOLD_LOCKS",
    "HOST",
    "MISSING",
    "QEMU_USER",
    "RET",
    "SLOWDOWN",
    "SPIN",
    "SUM",
    "UNARY_T",
    "Switch",
    "assemble",
    "busy",
    "call_plus_one",
    "const",
    "exited",
    "live",
    "mappings_over",
    "native_allocator",
    "near_libc",
    "needs_programs",
    "published",
    "report_from_child",
    "run_in_child",
    "synchronize",
    "traps",
]
