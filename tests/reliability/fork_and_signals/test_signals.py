"""Python signal handlers and the allocator: a handler waits for machine code to
return, may re-enter the allocator or the assembler, and an exception it raises at a
random moment (KeyboardInterrupt from a timer) leaves the allocator consistent.

The enumeration of every point where such an exception can surface inside a verb is
``test_interrupts_enumerated.py``; signal handlers inside the native backend's locks
are ``test_locks.py``.  ``pytest -s`` prints a few figures.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import paths
import programs as P
from programs import const

pytestmark = P.needs_programs

ROOT = str(paths.ROOT)


# --- Python signal handlers around JIT code and the allocator ---------------------------------


def _run_script(body: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    script = "import faulthandler\nfaulthandler.dump_traceback_later(12, exit=True)\n" + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_python_signal_handler_runs_after_a_long_jit_call_returns() -> None:
    """A Python handler cannot interrupt machine code: it runs when the call returns
    (then it may use another allocator freely)."""
    r = _run_script(
        f"""
        import ctypes, signal, threading, time, execmem
        from execmem.native import NativeBackend
        a = execmem.Allocator(backend=NativeBackend(), pack_size=1 << 16)
        b = execmem.Allocator(backend=NativeBackend(), pack_size=1 << 16)
        t = a.jit_text_alloc(32); t.write(0, bytes.fromhex({P.SPIN.hex()!r})); t.map()
        fn = t.function(ctypes.c_int, ctypes.c_void_p)
        flag = ctypes.c_uint64(0)
        ran = []
        def handler(signum, frame):
            u = b.jit_text_alloc(16); u.write(0, bytes.fromhex({const(5).hex()!r})); u.map()
            assert u.function(ctypes.c_int)() == 5
            u.free()
            ran.append(time.monotonic())
            signal.setitimer(signal.ITIMER_REAL, 0.02)
        signal.signal(signal.SIGALRM, handler)
        released = []
        threading.Timer(0.3, lambda: (released.append(time.monotonic()), setattr(flag, "value", 1))).start()
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        start = time.monotonic()
        assert fn(ctypes.addressof(flag)) == 7
        returned = time.monotonic()
        time.sleep(0.05)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # a handler pending now must not re-arm the timer
        signal.setitimer(signal.ITIMER_REAL, 0)
        # The timer fired every 20 ms during the 0.3 s call; the handler ran only after
        # the machine code returned (after the flag was set).
        assert ran and ran[0] >= released[0], (ran[:1], released)
        print(f"call {{returned - start:.2f}}s, {{len(ran)}} handler runs, the first "
              f"{{(ran[0] - released[0]) * 1000:.2f}} ms after the code was released")
        """
    )
    assert r.returncode == 0, r.stderr
    print(f"\n[signals] {r.stdout.strip()}")


def test_signal_handler_reentering_the_allocator() -> None:
    r = _run_script(
        """
        import ctypes, signal, time, execmem
        from execmem.native import NativeBackend
        a = execmem.Allocator(backend=NativeBackend(), pack_size=1 << 16)
        from tests.programs import const as code
        w = [a.jit_text_alloc(16) for _ in range(2)]
        for t in w: t.write(0, code(1)); t.map()  # warm: the second publish selects membarrier
        keep, errors, runs = [], [], [0]
        def handler(signum, frame):
            try:
                t = a.jit_text_alloc(16); t.write(0, code(5)); t.map()
                assert t.function(ctypes.c_int)() == 5
                keep.append(t)
                if len(keep) > 3: keep.pop(0).free()
                runs[0] += 1
            except execmem.ExecmemError as e:
                errors.append(e)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0.0005)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0005)
        live, i, end = [], 0, time.monotonic() + 2
        while time.monotonic() < end:
            i += 1
            t = a.jit_text_alloc(16 + i % 50); t.write(0, code(i))
            if i % 3: t.map()
            else:
                with a.batch(): t.map()
            live.append((t, i))
            if len(live) > 20:
                u, v = live.pop(0); assert u.function(ctypes.c_int)() == v; u.free()
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # a handler pending now must not re-arm the timer
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert all(u.function(ctypes.c_int)() == v for u, v in live)
        assert all(t.function(ctypes.c_int)() == 5 for t in keep)
        print("ok", i, runs[0], len(errors))
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]


def test_signal_handler_calling_asm_during_asm() -> None:
    """Was a deadlock (a plain Lock held by the interrupted asm).  The handler's asm
    runs on its own Keystone handle, so the interrupted call's result is untouched."""
    r = _run_script(
        """
        import signal, time, execmem
        execmem.asm("nop", "x86_64")
        runs = [0]
        def handler(signum, frame):
            try:
                assert execmem.asm("nop", "x86_64") == b"\\x90"; runs[0] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0.0003)
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0003)
        end = time.monotonic() + 2
        while time.monotonic() < end:
            assert execmem.asm("mov eax, 1\\nret", "x86_64") == b"\\xb8\\x01\\0\\0\\0\\xc3"
            try:  # a failing call reads Keystone's errno after ks_asm: must stay its own
                execmem.asm("nop\\nbogus", "x86_64")
            except execmem.AssemblyError as e:
                assert "line 2" in str(e) and "mnemonic" in str(e).lower(), e
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # a handler pending now must not re-arm the timer
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert runs[0] > 0
        print("ok", runs[0])
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]




# --- real signals at random points ------------------------------------------------------------


def test_keyboard_interrupts_at_random_points_leave_the_allocator_consistent() -> None:
    """Real signals (not the enumeration of tests/reliability/fork_and_signals/test_interrupts_enumerated.py): a timer
    raises KeyboardInterrupt at random moments in a child running alloc/write/map/update/
    free/batch in a loop; afterwards the allocator audits clean and still works.

    The handler raises only while a verb runs (the test's own assembling of the next
    code is not what is tested), and the timer's range is a multiple of the loop's
    measured time per step, so interrupts land inside verbs whether they take tens of
    microseconds (natively) or milliseconds (under QEMU)."""
    script = textwrap.dedent("""
        import ctypes, random, signal, statistics, sys, threading, time
        sys.path[:0] = [".", "tests"]
        import execmem
        from execmem.native import NativeBackend
        from programs import Switch, const
        from audit import audit_allocator
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        b = NativeBackend("dual"); a = execmem.Allocator(backend=b, pack_size=1 << 16)
        for _ in range(2):  # the membarrier probe (a child process) and mechanism chosen first
            a.jit_text_alloc(16).map()
        armed = [False]  # the handler raises only while a verb may be running
        outside = [0.0]  # seconds spent in code() so far

        def code(make, *args):  # the test's own work: never interrupted, not timed
            armed[0] = False
            started = time.perf_counter()
            made = make(*args)
            outside[0] += time.perf_counter() - started
            armed[0] = True
            return made

        def step(i, rng, live):
            op = rng.random()
            if op < 0.4 or not live:
                t = a.jit_text_alloc(rng.choice([32, 64, 200]), 8); sw = Switch((i, i + 1))
                t.write(0, code(sw.code, t.address)); t.map(); live.append((t, sw))
            elif op < 0.55:
                t, sw = rng.choice(live)
                if t.state.name == "LIVE":
                    t.update(0, code(sw.patch, rng.randrange(2), t.address))
            elif op < 0.65:
                with a.batch():
                    u = a.jit_text_alloc(32, 8); sw = Switch((i, i + 1))
                    u.write(0, code(sw.code, u.address)); u.map()
                    if live: live.pop()[0].free()
                live.append((u, sw))
            else:
                t, _ = live.pop(rng.randrange(len(live)))
                t.free()

        warm = []; rng = random.Random(0); durations = []
        for i in range(100):  # calibration: the same steps, no timer
            started = time.perf_counter(); outside[0] = 0.0; step(i, rng, warm)
            durations.append(time.perf_counter() - started - outside[0])
        for t, _ in warm: t.free()
        per_step = statistics.median(durations)  # in verbs

        def tick(*_):
            if armed[0]:
                armed[0] = False
                raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, tick)
        rng = random.Random(1); live = []; interrupted = done = 0
        for i in range(4000):
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.05, 2.0) * per_step)  # within a step's verbs, mostly
                step(i, rng, live)
                armed[0] = False
                done += 1
            except KeyboardInterrupt:
                interrupted += 1
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        problems = audit_allocator(a)
        assert problems == [], problems[:5]
        t = a.jit_text_alloc(16); t.write(0, const(77)); t.map()
        assert t.function(ctypes.c_int)() == 77
        a.close(); b.close()
        print(f"ok {done} completed, {interrupted} interrupted, {per_step * 1e6:.0f} us in verbs per step")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300 * P.SLOWDOWN)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
    print(f"\n[signals] {r.stdout.strip()}")
    done, interrupted = int(r.stdout.split()[1]), int(r.stdout.split()[3])
    assert done > 100 and interrupted > 100  # both happened, many times
