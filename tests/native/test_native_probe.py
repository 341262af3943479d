"""The membarrier probe (``execmem.native._probe``) and what ``remote_cse`` does with
its verdicts: a forked child that runs only the architecture's machine code, a real
seccomp filter that kills on membarrier, transient failures retried later, and no
probing at all on the publish path."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import unicorn as U
from programs import QEMU_USER, SLOWDOWN, const, exited, needs_programs, run_in_child
from unicorn import arm64_const as A
from unicorn import x86_const as X

import execmem
from execmem.arch import get, host
from execmem.bench._measure import idle_thread
from execmem.native import NativeBackend, _libc, _probe, _routines, _sync
from execmem.native._probe import MembarrierProbe, ProbeResult, classify

#: The real probe runs where the host architecture has the routine (x86-64, arm64).
on_probing_host = pytest.mark.skipif(
    "probe_membarrier" not in dict(host().host_routines), reason=f"{host().name} has no probe_membarrier routine"
)
SAFE = lambda: ProbeResult(True, "test")  # noqa: E731


def run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)


# --- the routine, run in Unicorn on any host ----------------------------------------------------

#: (rt_sigprocmask, clone, exit_group, membarrier) per architecture (Linux UAPI tables).
NUMBERS = {"x86_64": (14, 56, 231, 324), "arm64": (135, 220, 94, 283)}


def emulate(arch: str, clone_result: int, mask: int, flags: int = 0) -> tuple[list[tuple[int, tuple[int, ...]]], int, bool]:
    """Run ``probe_membarrier(flags)`` with system calls answered by a fake kernel:
    clone returns ``clone_result``, membarrier(QUERY) ``mask``.  Returns the calls
    made, the routine's return value and whether the stack pointer came back unchanged."""
    sigprocmask, clone, exit_group, membarrier = NUMBERS[arch]
    code = _routines.assemble(get(arch))["probe_membarrier"]
    x86 = arch == "x86_64"
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_64) if x86 else U.Uc(U.UC_ARCH_ARM64, U.UC_MODE_ARM)
    base, stack, done = 0x10000, 0x88000, 0xD000
    uc.mem_map(base, 0x1000)
    uc.mem_map(0x80000, 0x10000)
    uc.mem_map(done, 0x1000)
    uc.mem_write(base, code)
    if x86:
        regs = (X.UC_X86_REG_RDI, X.UC_X86_REG_RSI, X.UC_X86_REG_RDX, X.UC_X86_REG_R10, X.UC_X86_REG_R8)
        nr_reg, ret_reg, sp_reg = X.UC_X86_REG_RAX, X.UC_X86_REG_RAX, X.UC_X86_REG_RSP
        uc.mem_write(stack - 8, done.to_bytes(8, "little"))  # the return address of the call
        uc.reg_write(sp_reg, stack - 8)
    else:
        regs = tuple(getattr(A, f"UC_ARM64_REG_X{i}") for i in range(5))
        nr_reg, ret_reg, sp_reg = A.UC_ARM64_REG_X8, A.UC_ARM64_REG_X0, A.UC_ARM64_REG_SP
        uc.reg_write(sp_reg, stack)
        uc.reg_write(A.UC_ARM64_REG_X30, done)
    uc.reg_write(regs[0], flags)
    sp0 = uc.reg_read(sp_reg)
    calls: list[tuple[int, tuple[int, ...]]] = []

    def syscall(uc: U.Uc, *_: Any) -> None:
        nr = uc.reg_read(nr_reg)
        args = tuple(uc.reg_read(r) for r in regs)
        calls.append((nr, args))
        result = 0
        if nr == sigprocmask and args[0] == 0:  # SIG_BLOCK: the set must block everything
            assert uc.mem_read(args[1], 8) == b"\xff" * 8
        elif nr == clone:
            result = clone_result
        elif nr == membarrier and args[0] == 0:
            result = mask
        elif nr == exit_group:
            uc.emu_stop()
        uc.reg_write(ret_reg, result & (1 << 64) - 1)

    if x86:
        uc.hook_add(U.UC_HOOK_INSN, syscall, None, 1, 0, X.UC_X86_INS_SYSCALL)
    else:
        uc.hook_add(U.UC_HOOK_INTR, syscall)
    uc.emu_start(base, done, count=1000)
    returned = uc.reg_read(ret_reg)
    returned = returned - (1 << 64) if returned >> 63 else returned
    return calls, returned, uc.reg_read(sp_reg) == sp0 + (8 if x86 else 0)


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize("flags", [0, signal.SIGCHLD])
def test_probe_routine_parent_side_blocks_signals_around_clone(arch: str, flags: int) -> None:
    sigprocmask, clone, _, _ = NUMBERS[arch]
    calls, returned, balanced = emulate(arch, clone_result=4242, mask=0x7F, flags=flags)
    assert [(nr, args[0]) for nr, args in calls] == [(sigprocmask, 0), (clone, flags), (sigprocmask, 2)]
    # clone(flags): a plain fork (no CLONE_VM), with the exit signal asked for; the old mask restored.
    assert calls[1][1] == (flags, 0, 0, 0, 0)
    assert calls[2][1][1] == calls[0][1][2]  # SIG_SETMASK from where BLOCK saved the old mask
    assert returned == 4242 and balanced
    assert emulate(arch, clone_result=-errno.EAGAIN, mask=0)[1] == -errno.EAGAIN


@pytest.mark.parametrize("arch", ["x86_64", "arm64"])
@pytest.mark.parametrize(
    ("mask", "commands", "status"),
    [
        (0x7F, [0, 64, 32, 16, 8], 0x7F),  # SYNC_CORE and PRIVATE_EXPEDITED: register, run
        (0x18, [0, 16, 8], 0x18),  # no SYNC_CORE
        (0x1, [0], 0x1),  # GLOBAL only: nothing to register
        (-errno.ENOSYS, [0], 0x80 | errno.ENOSYS),  # QUERY failed: 0x80 | errno
    ],
)
def test_probe_routine_child_side(arch: str, mask: int, commands: list[int], status: int) -> None:
    _, _, exit_group, membarrier = NUMBERS[arch]
    calls, _, _ = emulate(arch, clone_result=0, mask=mask)
    child = calls[2:]
    assert [args[0] for nr, args in child if nr == membarrier] == commands
    assert all(args[1] == 0 for nr, args in child if nr == membarrier)  # flags 0
    assert child[-1] == (exit_group, (status, *child[-1][1][1:]))


# --- verdicts ---------------------------------------------------------------------------------


def test_classify_wait_statuses() -> None:
    exited = lambda code: code << 8  # noqa: E731
    assert classify(exited(0x7F)) == ProbeResult(True, "the probe child survived membarrier (QUERY mask 0x7f)")
    assert classify(exited(0x80 | errno.ENOSYS)).safe  # QUERY failed, but nothing killed it
    sigsys = classify(signal.SIGSYS)
    assert not sigsys.safe and not sigsys.transient and "SIGSYS" in sigsys.detail
    for sig in (signal.SIGKILL, signal.SIGSEGV):
        verdict = classify(sig)
        assert not verdict.safe and verdict.transient


@on_probing_host
def test_real_probe_is_safe_here_and_final() -> None:
    verdict = _probe.PROBE()
    assert verdict.safe and not verdict.transient, verdict
    assert verdict.detail.startswith("the probe child survived membarrier")
    assert _probe.PROBE() is verdict and _probe.PROBE.result is verdict  # kept for the process
    assert _probe.PROBE.describe()["final"] is True


@on_probing_host
def test_probe_needs_no_python_executable() -> None:
    """Embedded interpreters: sys.executable is not a Python (or nothing at all)."""
    r = run("""
        import sys
        sys.executable = "/nonexistent/python"
        from execmem.native import _probe
        verdict = _probe.MembarrierProbe(_probe._host_routine).probe_once()
        assert verdict.safe and not verdict.transient, verdict
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


#: A seccomp filter that kills the process on membarrier (x86-64), as some sandbox
#: profiles do: the case the probe exists for.  Only x86-64 has one here: QEMU user
#: mode, where arm64 runs on this project's machines, refuses every filter
#: (prctl(PR_SET_SECCOMP): EINVAL, so that the guest cannot block the host's calls).
on_x86_seccomp = pytest.mark.skipif(
    host().name != "x86_64", reason="the seccomp filter is x86-64's (QEMU user mode refuses seccomp filters)"
)
SECCOMP = textwrap.dedent("""
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    def insn(code, jt, jf, k):
        return struct.pack("<HBBI", code, jt, jf, k)
    prog = b"".join([
        insn(0x20, 0, 0, 4),            # ld [4]: arch
        insn(0x15, 1, 0, 0xC000003E),   # jeq AUDIT_ARCH_X86_64: check the number
        insn(0x06, 0, 0, 0x7FFF0000),   # ret ALLOW (another ABI)
        insn(0x20, 0, 0, 0),            # ld [0]: system call number
        insn(0x15, 0, 1, 324),          # jeq membarrier
        insn(0x06, 0, 0, 0x80000000),   # ret KILL_PROCESS
        insn(0x06, 0, 0, 0x7FFF0000),   # ret ALLOW
    ])
    buf = ctypes.create_string_buffer(prog)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
    assert libc.prctl(38, 1, 0, 0, 0) == 0                           # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
""")


@on_x86_seccomp
def test_a_seccomp_filter_that_kills_on_membarrier_is_detected() -> None:
    # The control: under this filter, a membarrier call kills the process.
    killed = run(SECCOMP + "\nlibc.syscall(324, 0, 0, 0)\nprint('survived')\n")
    assert killed.returncode == -signal.SIGSYS and "survived" not in killed.stdout
    # execmem under the same filter: the probe child dies instead, and publishing into a
    # mapped pack with another thread alive synchronizes without membarrier.
    r = run(SECCOMP + textwrap.dedent("""
        import ctypes, threading
        import execmem
        from execmem.native import NativeBackend
        stop = threading.Event(); threading.Thread(target=stop.wait).start()
        b = NativeBackend("dual")
        with execmem.Allocator(backend=b) as a:
            for value in (1, 2):
                t = a.jit_text_alloc(16)
                t.write(0, bytes([0xB8, value, 0, 0, 0, 0xC3]))
                t.map()
                assert t.function(ctypes.c_int)() == value
            sync = b.stats()["sync"]
        stop.set()
        assert "membarrier" not in b.stats()["syscalls"], b.stats()["syscalls"]
        print(sync["remote_cse"], "|", sync["membarrier_probe"]["verdict"], sync["membarrier_probe"]["final"], "|", sync["remote_cse_why"])
        b.close()
    """))
    assert r.returncode == 0, r.stderr[-3000:]
    mechanism, verdict, why = (part.strip() for part in r.stdout.split("|"))
    assert mechanism == "mprotect-ipi" and verdict == "unsafe True"
    assert "SIGSYS" in why, why


# --- transient failures: retried later, never waited for ----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _settle(probe: MembarrierProbe) -> None:
    """Wait for a probe thread started in the background."""
    done = probe._done
    if done is not None:
        assert done.wait(10)


@on_probing_host
def test_transient_fork_failure_is_retried_after_a_backoff() -> None:
    undisturbed = MembarrierProbe(_probe._host_routine)
    assert undisturbed.probe_once().safe
    clones = undisturbed.syscalls["clone"]  # 1, or 2 where clone(0) is refused (QEMU)
    clock = FakeClock()
    probe = MembarrierProbe(_probe._host_routine, clock=clock)
    with _libc.inject("clone", errno.EAGAIN, times=1):
        first = probe()
    assert not first.safe and first.transient and "EAGAIN" in first.detail, first
    assert probe() is first and probe.runs == 1  # within the backoff: no new probe
    clock.now += _probe.RETRY_FIRST
    assert probe() is first  # a retry starts in the background; the caller does not wait
    _settle(probe)
    final = probe()
    assert final.safe and not final.transient and probe.runs == 2
    assert probe.syscalls["clone"] == 1 + clones


@pytest.mark.parametrize("sigchld_too", [False, True])
def test_clone_refused_without_an_exit_signal_is_retried_with_sigchld(sigchld_too: bool) -> None:
    """QEMU user mode forks only with SIGCHLD as the exit signal (clone(0): EINVAL):
    the probe forks again so, and the verdict is that child's; refused both ways, the
    verdict is final."""
    asked: list[int] = []
    spawn = _spawned("raise SystemExit(0x7f)", [])

    def routine(flags: int) -> int:
        asked.append(flags)
        return -errno.EINVAL if flags == 0 or sigchld_too else spawn(flags)

    probe = MembarrierProbe(lambda: routine)
    verdict = probe.probe_once()
    assert asked == [0, signal.SIGCHLD] and probe.syscalls["clone"] == 2
    if sigchld_too:
        assert not verdict.safe and not verdict.transient and "EINVAL" in verdict.detail, verdict
    else:
        assert verdict == ProbeResult(True, "the probe child survived membarrier (QUERY mask 0x7f)")


def _spawned(script: str, pids: list[int]) -> Callable[[int], int]:
    """A stand-in routine: a child process of ours (reaped through the probe's waitpid)."""

    def spawn(flags: int) -> int:
        pids.append(os.posix_spawn(sys.executable, [sys.executable, "-c", script], os.environ))
        return pids[-1]

    return spawn


@pytest.mark.parametrize(
    ("script", "safe", "transient", "says"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", False, True, "SIGKILL"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSYS)", False, False, "SIGSYS"),
        ("raise SystemExit(0x18)", True, False, "QUERY mask 0x18"),
        ("import time; time.sleep(30)", False, True, "did not finish"),
    ],
)
def test_probe_children_that_die_hang_or_exit(
    script: str, safe: bool, transient: bool, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_probe, "PROBE_TIMEOUT", 1.0 * SLOWDOWN)  # a Python child starts in time
    pids: list[int] = []
    probe = MembarrierProbe(lambda: _spawned(script, pids))
    started = time.monotonic()
    verdict = probe.probe_once()
    assert (verdict.safe, verdict.transient) == (safe, transient) and says in verdict.detail, verdict
    assert time.monotonic() - started < 10 * SLOWDOWN
    with pytest.raises(ChildProcessError):  # reaped (killed first if it hung): no zombie
        os.waitpid(pids[0], os.WNOHANG)


@on_probing_host
def test_waitpid_interrupted_is_retried_and_a_lost_status_is_transient() -> None:
    """EINTR: waitpid again.  ECHILD (another part of the program reaped every child
    with __WALL): the verdict is lost, transient; nothing else is tried on that pid,
    which may already belong to another process.  Run in a child process: the
    injected ECHILD leaves the probe child unreaped there."""
    r = run("""
        import errno
        from execmem.native import _libc, _probe
        probe = _probe.MembarrierProbe(_probe._host_routine)
        with _libc.inject("waitpid", errno.EINTR, times=2):
            verdict = probe.probe_once()
        assert verdict.safe and not verdict.transient, verdict
        with _libc.inject("waitpid", errno.ECHILD, times=1):
            verdict = probe.probe_once()
        assert not verdict.safe and verdict.transient and "ECHILD" in verdict.detail, verdict
        assert "kill" not in probe.syscalls
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_host_without_the_routine_never_uses_membarrier() -> None:
    verdict = MembarrierProbe(lambda: None).probe_once()
    assert not verdict.safe and not verdict.transient


def test_remote_cse_is_provisional_after_a_transient_verdict() -> None:
    """A transient verdict makes the fallback provisional: membarrier is asked about
    again after RECHECK_AFTER and taken as soon as the probe says it is safe."""
    verdicts = [ProbeResult(False, "the probe could not fork: EAGAIN", transient=True)]
    clock = FakeClock()
    remote = _sync.RemoteCse(
        _libc.Syscalls(), _sync.REMOTE_CANDIDATES["x86_64"], page_size=4096, probe=lambda: verdicts[-1], clock=clock
    )
    with idle_thread():
        remote.run([])
        assert remote.mechanism == "mprotect-ipi"
        assert remote.why is not None and "for now" in remote.why and "EAGAIN" in remote.why
        page = remote._current
        clock.now += _sync.RECHECK_AFTER / 2
        remote.run([])
        assert remote.mechanism == "mprotect-ipi"  # not yet
        verdicts.append(ProbeResult(True, "the probe child survived membarrier (QUERY mask 0x7f)"))
        clock.now += _sync.RECHECK_AFTER
        remote.run([])
        assert remote.mechanism == "membarrier-sync-core", remote.notes
        assert getattr(page, "_page", None) == 0  # the fallback's helper page is gone
        assert any("replaced by membarrier-sync-core" in n for n in remote.notes)
        assert dict(remote.runs) == {"mprotect-ipi": 2, "membarrier-sync-core": 1}
    remote.close()


def test_a_final_unsafe_verdict_is_not_asked_again() -> None:
    asked: list[int] = []
    clock = FakeClock()

    def unsafe() -> ProbeResult:
        asked.append(1)
        return ProbeResult(False, "the probe child was killed by SIGSYS at membarrier (a seccomp profile)")

    remote = _sync.RemoteCse(_libc.Syscalls(), _sync.REMOTE_CANDIDATES["x86_64"], page_size=4096, probe=unsafe, clock=clock)
    for _ in range(3):
        remote.run([])
        clock.now += 10 * _sync.RECHECK_AFTER
    assert remote.mechanism == "mprotect-ipi" and len(asked) == 1
    remote.close()


@on_probing_host
def test_backend_creation_does_not_wait_for_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe starts in the background with the first backend; the first
    remote_cse waits for its verdict.  The routine is held until the backend exists
    (or 10 s): a creation that waited for the verdict would find the probe done."""
    real, gate = _probe._host_routine, threading.Event()
    monkeypatch.setattr(_probe, "PROBE_WAIT", 60.0)

    def slow() -> Callable[[int], object] | None:
        gate.wait(10)
        return real()

    probe = MembarrierProbe(slow)
    monkeypatch.setattr(_probe, "PROBE", probe)
    monkeypatch.setattr(_sync, "PROBE", probe)
    import execmem.native._native as native

    monkeypatch.setattr(native, "PROBE", probe)
    b = NativeBackend("dual")
    try:
        assert probe._done is not None and not probe._done.is_set()  # still running
        gate.set()
        b.run_step("remote_cse", [])
        assert S(b)["sync"]["remote_cse"] == "membarrier-sync-core"
        assert S(b)["sync"]["membarrier_probe"]["verdict"] == "safe"
    finally:
        b.close()


def S(backend: NativeBackend) -> dict[str, Any]:
    return dict(backend.stats())


# --- the publish path probes nothing ------------------------------------------------------------


@on_probing_host
@needs_programs
def test_publishing_scans_nothing_and_asks_no_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """One by one, a publish into a mapped pack costs two system calls (pwrite and
    membarrier), with no /proc/self/task scan and no getpid; remote_cse runs even in
    a single-threaded process (the kernel returns at once there)."""
    b = NativeBackend("dual", probe=SAFE)
    a = execmem.Allocator(backend=b, pack_size=1 << 16)
    try:
        warm = a.jit_text_alloc(16)
        warm.write(0, const(1))
        warm.map()
        before = dict(b._sys.tally)

        def refuse(*_: object) -> None:
            raise AssertionError("probed on the publish path")

        monkeypatch.setattr(os, "listdir", refuse)
        monkeypatch.setattr(os, "getpid", refuse)
        monkeypatch.setattr(os, "scandir", refuse)
        for value in range(50):
            t = a.jit_text_alloc(16)
            t.write(0, const(value))
            t.map()
        monkeypatch.undo()
        after = dict(b._sys.tally)
        assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == {
            "pwrite": 50,
            "membarrier": 50 + 2,  # + QUERY and REGISTER the first time
        }
        assert S(b)["sync"]["remote_cse_runs"] == {"membarrier-sync-core": 50}
        assert t.function(ctypes.c_int)() == 49
    finally:
        a.close()
        b.close()


@on_probing_host
def test_remote_cse_runs_in_a_single_threaded_process() -> None:
    r = run("""
        import threading
        from execmem.native import NativeBackend
        from execmem.native._probe import ProbeResult
        b = NativeBackend(probe=lambda: ProbeResult(True, "test"))
        assert threading.active_count() == 1
        b.run_step("remote_cse", [])
        print(b.stats()["sync"]["remote_cse_runs"])
        b.close()
    """)
    assert r.returncode == 0 and r.stdout.strip() == "{'membarrier-sync-core': 1}", r.stderr[-2000:]


@pytest.mark.skipif(
    QEMU_USER,
    reason="QEMU user mode deadlocks in this fork: in 2 of 3 emulated runs the child waited on a lock "
    "in the emulator's own memory (QEMU 10.0.2's .bss), where no signal reaches it",
)
def test_probe_thread_state_resets_in_a_forked_child() -> None:
    """A probe running in the parent's thread does not exist in a child: the child
    runs its own when it needs one (here the routine answers at once in the child).

    The fork waits until the parent's probe is inside its routine, and the child is
    bounded (``run_in_child``): a hang fails the test, never stalls the suite."""
    entered, gate, parent = threading.Event(), threading.Event(), os.getpid()

    def routine() -> None:
        if os.getpid() == parent:
            entered.set()
            gate.wait(5 * SLOWDOWN)

    probe = MembarrierProbe(routine)
    probe.start()
    assert entered.wait(5 * SLOWDOWN)  # the parent's probe runs now

    def child() -> int:
        probe.after_fork_in_child()  # what os.register_at_fork does for PROBE
        verdict = probe()
        return 0 if verdict.detail == "this host has no probe_membarrier routine" else 2

    status = run_in_child(child, timeout=10 * SLOWDOWN)
    gate.set()
    _settle(probe)
    assert exited(status), f"child status {status:#x} (SIGALRM: it hung)"
