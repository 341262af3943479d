"""The native backend's locks against Python signal handlers and fork (``_locks``).

A handler runs in the main thread between two bytecodes of whatever it interrupted;
if that was inside the backend, re-entering an ``OwnedLock`` must be a clear
``BadStateError`` (nothing half-done, nothing leaked), re-entering a ``SetupLock``
(accounting, one-time setup) must simply work.  A fork while another thread holds
any of these locks must leave a child that can close the parent's backend and use a
new one.  Everything that could deadlock runs in a child process with a timeout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import paths
import pytest
from programs import ADD, HOLD_LOCKS, const, needs_programs

from execmem._errors import BadStateError
from execmem._locks import REENTERED, OwnedLock, SetupLock

ROOT = str(paths.ROOT)



def run_script(body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``body`` in a fresh interpreter; faulthandler dumps and exits if it hangs."""
    script = "import faulthandler\nfaulthandler.dump_traceback_later(20, exit=True)\n" + textwrap.dedent(body)
    try:
        return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"deadlocked: {exc}")


# --- the lock types --------------------------------------------------------------------------


def test_owned_lock_refuses_reentry_and_others_wait() -> None:
    lock = OwnedLock("a test lock")
    with lock:
        assert lock.held_here()
        with pytest.raises(BadStateError, match="re-entered from the thread that is inside it") as info, lock:
            pass
        assert "a test lock" in str(info.value) and REENTERED in str(info.value)
        # Another thread is not refused: it waits for the lock.
        got: list[bool] = []
        th = threading.Thread(target=lambda: got.append(lock._lock.acquire(timeout=0.05)))
        th.start()
        th.join()
        assert got == [False]
    assert not lock.held_here()
    with lock:  # usable again after the refusal
        pass


def test_setup_lock_is_reentrant() -> None:
    lock = SetupLock("setup")
    with lock, lock:
        pass


# --- signal handlers ---------------------------------------------------------------------------

_SIGNAL_PRELUDE = f"""
import ctypes, errno, os, signal, threading, time
import execmem
from execmem.native import NativeBackend, _libc, _sync
SAFE = lambda: _sync.ProbeResult(True, "test")
ADD = bytes.fromhex({ADD.hex()!r})  # add(a, b) for this host
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()  # remote_cse is real with 2 threads

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def interrupt_inside(lock, work):
    \"\"\"Run ``work`` from a signal handler while this thread holds ``lock``.\"\"\"
    out = []
    def handler(signum, frame):
        try:
            out.append(work())
        except execmem.ExecmemError as exc:
            out.append(exc)
    signal.signal(signal.SIGUSR1, handler)
    with lock:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs here, with the lock held
    assert out, "the handler did not run inside the lock"
    return out[0]

def use(b, pending=None):
    \"\"\"A whole life on ``b``: returns 42 if the code ran.  A reservation whose
    later step was refused stays in ``pending`` (the caller releases it later).\"\"\"
    r = b.reserve(4096, 16)
    if pending is not None:
        pending.append(r)
    b.write(r, 0, ADD)
    b.map(r)
    b.run_step("local_cse", [])
    b.run_step("remote_cse", [(r.address, 5)])
    v = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(r.address)(40, 2)
    b.release(r)
    if pending is not None:
        pending.remove(r)
    return v
"""


@needs_programs
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_signal_handler_reentering_a_held_backend_is_refused_cleanly(mode: str) -> None:
    r = run_script(
        _SIGNAL_PRELUDE
        + textwrap.dedent(f"""
        b = NativeBackend({mode!r}, probe=SAFE)
        other = NativeBackend({mode!r}, probe=SAFE)
        assert use(b) == 42 and use(other) == 42
        warm = b.reserve(4096, 16)
        b.write(warm, 0, ADD); b.map(warm)
        before_fds, before_ranges = fds(), b.owned_ranges()
        # Inside the region table: reserve/release/close/stats of b are refused...
        for call in (lambda: b.reserve(4096, 16), lambda: b.release(warm), b.close, b.stats):
            got = interrupt_inside(b._lock, call)
            assert isinstance(got, execmem.BadStateError), got
            assert "re-entered" in str(got) and "signal handler" in str(got), got
        # ...while another backend works from the same handler.
        assert interrupt_inside(b._lock, lambda: use(other)) == 42
        # Inside the backing's selection (dual) / a region's protections (mprotect).
        if {mode!r} == "dual":
            got = interrupt_inside(b._mapper.backing._lock, lambda: b.reserve(1 << 16, 16))
            assert isinstance(got, execmem.BadStateError), got
        else:
            region = warm.token
            got = interrupt_inside(region.lock, lambda: b.write(warm, 64, ADD))
            assert isinstance(got, execmem.BadStateError), got
        # Inside the remote_cse selection: a handler synchronizing through b is refused.
        remote = b._synchronizer().remote
        remote._current = None
        got = interrupt_inside(remote._lock, lambda: b.run_step("remote_cse", [(warm.address, 5)]))
        assert isinstance(got, execmem.BadStateError), got
        # Nothing was left behind by the refused calls, and b still works.
        assert fds() == before_fds, (before_fds, fds())
        assert b.owned_ranges() == before_ranges
        assert use(b) == 42
        b.close(); other.close()
        assert b.stats()["reservations"] == 0
        print("ok")
        """)
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@needs_programs
def test_signal_handler_inside_setup_locks_proceeds() -> None:
    """Accounting (_libc) and one-time setup (probe, routines) are re-entrant: a handler
    that needs them while the interrupted code holds them completes its own call."""
    r = run_script(
        _SIGNAL_PRELUDE
        + textwrap.dedent("""
        from execmem.native import _routines
        b = NativeBackend("dual", probe=SAFE)
        assert interrupt_inside(_libc._lock, lambda: use(b)) == 42
        from execmem.native import _probe
        assert interrupt_inside(_probe.PROBE._lock, _probe.PROBE).safe
        # The routines page built inside a build in progress: the first one wins.
        _routines._routines = None
        def nested():
            return _routines.host_routines()
        inner = interrupt_inside(_routines._routines_lock, nested)
        assert _routines.host_routines() is inner
        assert use(b) == 42
        b.close()
        print("ok")
        """)
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@needs_programs
def test_signal_storm_on_one_backend_never_deadlocks() -> None:
    """A timer handler hammers the backend the main thread is using: each handler call
    either completes or is refused with BadStateError; no deadlock, no leak."""
    r = run_script(
        _SIGNAL_PRELUDE
        + textwrap.dedent("""
        b = NativeBackend("dual", probe=SAFE)
        base_fds = fds()
        done, refused, pending = [0], [0], []
        def handler(signum, frame):
            try:
                assert use(b, pending) == 42
                done[0] += 1
            except execmem.BadStateError:
                refused[0] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0.0003)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0003)
        end = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < end:
            try:
                n += 1
                assert use(b, pending) == 42
                b.stats()
            except execmem.BadStateError:
                pass
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # a handler pending now must not re-arm the timer
        signal.setitimer(signal.ITIMER_REAL, 0)
        time.sleep(0.01)
        for r in list(pending):  # refused part way (e.g. release while stats() held the lock)
            b.release(r)
        assert b.stats()["reservations"] == 0, b.stats()["reservations"]
        b.close()
        assert fds() == base_fds
        print("ok", n, done[0], refused[0], "left part way:", len(pending))
        """)
    )
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    print(f"\n[signal storm] {r.stdout.strip()}")


# --- fork ---------------------------------------------------------------------------------------


@needs_programs
def test_fork_while_other_threads_hold_every_native_lock() -> None:
    r = run_script(
        _SIGNAL_PRELUDE
        + HOLD_LOCKS
        + textwrap.dedent("""
        from execmem.native import _probe, _routines
        b = NativeBackend("dual", probe=SAFE)
        assert use(b) == 42
        keep = b.reserve(4096, 16); b.write(keep, 0, ADD); b.map(keep)
        # b._gate too: fork gives up on it after _fork.GATE_WAIT (the child copies).
        locks = [
            b._lock, b._mapper.backing._lock, b._synchronizer().remote._lock,
            _libc._lock, _probe.PROBE._lock, _routines._routines_lock, b._gate,
        ]
        release, threads = hold_all(locks)  # every lock is held by another thread now
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a deadlocked child dies of SIGALRM
            code = 1
            try:
                try:
                    b.reserve(4096, 16)
                except execmem.ForkedProcessError:
                    pass
                b.stats()
                fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(keep.address)
                assert fn(1, 2) == 3  # the inherited read+execute view still runs
                b.close()
                c = NativeBackend("dual", probe=SAFE)  # a new backend of the child's own
                assert use(c) == 42
                c.close()
                code = 0
            except BaseException:
                import traceback; traceback.print_exc()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        release.set()
        for th in threads: th.join(10)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
        b.close()
        print("ok")
        """)
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@needs_programs
def test_fork_while_other_threads_hold_the_allocators_locks() -> None:
    """The allocator's, the default allocator's and the call gates' locks (issue 10,
    item 4): a child forked while other threads hold them is refused by the parent's
    allocator (never deadlocks) and gets allocators and call gates of its own."""
    r = run_script(
        _SIGNAL_PRELUDE
        + HOLD_LOCKS
        + textwrap.dedent("""
        from execmem import _default, _gates
        RET7 = bytes.fromhex("{ret7}")  # return 7
        a = execmem.default_allocator()
        t = a.jit_text_alloc(16); t.write(0, RET7); t.map()
        fn = t.function(ctypes.c_int)
        assert fn() == 7
        locks = [a._lock, _default._default_lock, _gates.gate_pool().lock, _gates._pools_lock]
        release, threads = hold_all(locks)  # every lock is held by another thread now
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a deadlocked child dies of SIGALRM
            code = 1
            try:
                try:
                    a.jit_text_alloc(16)
                except execmem.ForkedProcessError:
                    pass
                assert fn() == 7  # the inherited callable and its gate still run
                u = execmem.jit_text_alloc(16)  # the child's own default allocator
                assert u.allocator is not a
                u.write(0, RET7); u.map()
                assert u.function(ctypes.c_int)() == 7  # the child's own call gates
                code = 0
            except BaseException:
                import traceback; traceback.print_exc()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        release.set()
        for th in threads: th.join(10)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
        print("ok")
        """).replace("{ret7}", const(7).hex())
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
