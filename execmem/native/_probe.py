"""Is membarrier safe to call in this process?  Asked once, of a forked child, off the
allocator's lock.

Why ask: some seccomp profiles kill a process the first time it calls membarrier
(SIGSYS, with no errno to fall back on), so this process calls it only after a child,
which inherits the same seccomp filter, has survived the same calls.

How: the architecture's ``probe_membarrier`` routine (``ArchSpec.host_routines``) forks
a child that runs nothing but that machine code: ``membarrier(QUERY)``, then register
and run ``PRIVATE_EXPEDITED_SYNC_CORE`` and ``PRIVATE_EXPEDITED`` where offered, then
``exit_group``.  No interpreter, no libc and no path are involved, so the probe works
in an embedded interpreter (where ``sys.executable`` is not a Python) and nothing the
fork may have left locked in the child is ever touched.  Measured on this project's
2-CPU virtual machine (``docs/reliability.md``): about 1 ms for a 20 MiB process, 27 ms
at 0.5 GiB (the fork copies page tables); the previous probe, a Python child
(``sys.executable -I -S -c ...``), took 18-25 ms whatever the size.  A tiny static
program spawned from a memfd was faster at 0.5 GiB (1.3 ms) but needs an executable
memfd or temp file (``vm.memfd_noexec``, noexec mounts) and is started by a vfork
child that shares this address space until its ``execve``: a sandbox that kills on
``execve`` would dump core there, and kernels before 5.16 kill every process sharing
the address space with a dumping one.  A plain fork has its own address space from
the start, so its death can never take this process along.  The child has no exit
signal, so it never reaches the program's SIGCHLD handler or a ``waitpid(-1)``; where
clone refuses that with EINVAL it is forked again with SIGCHLD, as ``fork`` does (QEMU
user mode forks only so: linux-user/syscall.c ``do_fork``, "We can't support custom
termination signals"; the program may then reap it first, a lost status below).

When: in a background thread, started when the first native backend that may use
membarrier is created (:meth:`MembarrierProbe.start`), so the verdict is usually
there before the first publish needs it; a caller that needs it sooner waits at most
:data:`PROBE_WAIT` seconds.  Verdicts:

* the child exited: **safe** (its exit status carries the QUERY mask, or the errno
  QUERY failed with; this process queries again for itself);
* the child was killed by SIGSYS: **unsafe**, for the life of the process (seccomp);
* the fork was refused with EAGAIN, ENOMEM or EINTR (``RLIMIT_NPROC``, memory), the
  child was killed by another signal (the OOM killer, a stray SIGKILL), did not finish
  within :data:`PROBE_TIMEOUT` (stopped, traced) or its status was lost (ECHILD):
  **transient** - unsafe for now, and probed again on a later request, no sooner
  than a backoff of 1 s doubling up to 60 s; a retry never makes the caller wait;
* any other refusal of the fork (EPERM, ENOSYS: a sandbox without fork): **unsafe**
  for good, since nothing can tell.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from execmem._errors import ExecmemError
from execmem._locks import SetupLock
from execmem.native import _libc

#: Seconds the child may take before it is killed and the verdict is transient.
PROBE_TIMEOUT = 2.0
#: Seconds a caller waits for the first verdict of the process (the child is killed
#: after PROBE_TIMEOUT, so the thread always answers within this).
PROBE_WAIT = PROBE_TIMEOUT + 1.0
#: Backoff between probes after a transient verdict: first, then doubling up to max.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
#: ``waitpid`` flag ``__WALL``: the probe child has no exit signal (so it never
#: reaches the program's SIGCHLD handler or a ``waitpid(-1)``), which plain waitpid skips.
WALL = 0x40000000
#: Fork refusals that say "not now" rather than "never here".
TRANSIENT_FORK_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EINTR})


@dataclass(frozen=True)
class ProbeResult:
    """Whether this process may call membarrier without being killed, and why.
    ``transient``: unsafe for now only; asking again later may say otherwise."""

    safe: bool
    detail: str
    transient: bool = False


def classify(status: int) -> ProbeResult:
    """The verdict for the wait status of a probe child (pure)."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGSYS:
            return ProbeResult(False, "the probe child was killed by SIGSYS at membarrier (a seccomp profile)")
        return ProbeResult(False, f"the probe child was killed by {name}", transient=True)
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code & 0x80:
            err = code & 0x7F
            return ProbeResult(True, f"the probe child survived; its membarrier(QUERY) failed: {errno.errorcode.get(err, err)}")
        return ProbeResult(True, f"the probe child survived membarrier (QUERY mask {code:#x})")
    return ProbeResult(False, f"the probe child ended with wait status {status:#x}", transient=True)


class MembarrierProbe:
    """The probe of this process (:data:`PROBE`); see the module docstring.

    ``routine`` returns the ``probe_membarrier`` routine (None where the host has
    none); ``clock`` and ``sleep`` are seams for tests.
    """

    def __init__(
        self,
        routine: Callable[[], Callable[[int], object] | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._routine = routine
        self._clock, self._sleep = clock, sleep
        self._sys = _libc.Syscalls()
        # A SetupLock: re-entrant (a signal handler asking while the main thread
        # starts a probe gets the same answer), reset in a forked child.
        self._lock = SetupLock("the membarrier probe")
        #: The final verdict, once there is one.
        self.result: ProbeResult | None = None
        #: The latest transient verdict (while there is no final one).
        self.last: ProbeResult | None = None
        self.runs = 0
        self._done: threading.Event | None = None
        self._retry_at = 0.0
        self._backoff = RETRY_FIRST

    @property
    def syscalls(self) -> dict[str, int]:
        return dict(self._sys.tally)

    def start(self) -> threading.Event | None:
        """Start a probe in a background thread unless there is a final verdict, one
        is running (its event is returned) or the backoff has not elapsed (None)."""
        with self._lock:
            if self.result is not None:
                return None
            if self._done is not None and not self._done.is_set():
                return self._done
            if self._clock() < self._retry_at:
                return None
            done = threading.Event()
            thread = threading.Thread(target=self._run, args=(done,), name="execmem-membarrier-probe", daemon=True)
            thread.start()  # may raise (RuntimeError: can't start new thread): nothing changed
            self._done = done
            return done

    def __call__(self) -> ProbeResult:
        """The verdict: final, else the latest transient one (a retry is started in the
        background when due, never waited for), else the first one, waited for at most
        :data:`PROBE_WAIT` seconds."""
        if self.result is not None:
            return self.result
        try:
            done = self.start()
        except RuntimeError as exc:  # no thread can be started now: ask again later
            return ProbeResult(False, f"the probe thread could not start: {exc}", transient=True)
        if done is not None and self.last is None:
            done.wait(PROBE_WAIT)
        verdict = self.result or self.last
        return verdict or ProbeResult(False, f"the membarrier probe did not answer within {PROBE_WAIT:g} s", transient=True)

    def describe(self) -> dict[str, object]:
        verdict = self.result or self.last
        return {
            "verdict": None if verdict is None else ("safe" if verdict.safe else "unsafe"),
            "final": self.result is not None,
            "detail": None if verdict is None else verdict.detail,
            "runs": self.runs,
        }

    def _run(self, done: threading.Event) -> None:
        try:
            verdict = self.probe_once()
        except Exception as exc:  # the thread must always leave a verdict behind
            verdict = ProbeResult(False, f"the probe failed: {exc}", transient=True)
        # No lock: only this thread writes these (one probe runs at a time), each with
        # one assignment, and a caller may hold the lock while it waits for ``done``
        # (a signal handler asking inside ``start``).
        self.runs += 1
        if verdict.transient:
            self._retry_at = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, RETRY_MAX)
            self.last = verdict
        else:
            self.result = verdict
        done.set()

    def probe_once(self) -> ProbeResult:
        """Fork the probe child, wait for it (killed after :data:`PROBE_TIMEOUT`), classify."""
        routine = self._routine()
        if routine is None:
            return ProbeResult(False, "this host has no probe_membarrier routine")
        try:
            try:
                pid = self._sys.fork_probe(routine, 0)
            except ExecmemError as exc:
                if _libc.errno_of(exc) != errno.EINVAL:
                    raise
                pid = self._sys.fork_probe(routine, signal.SIGCHLD)  # see the module docstring
        except ExecmemError as exc:
            return ProbeResult(False, f"the probe could not fork: {exc}", transient=_libc.errno_of(exc) in TRANSIENT_FORK_ERRNOS)
        deadline = self._clock() + PROBE_TIMEOUT
        delay = 20e-6
        while True:
            try:
                got, status = self._sys.waitpid(pid, os.WNOHANG | WALL)
            except ExecmemError as exc:
                if _libc.errno_of(exc) == errno.EINTR:
                    continue
                return ProbeResult(False, f"the probe child's status was lost: {exc}", transient=True)
            if got:
                return classify(status)
            if self._clock() > deadline:
                self._kill(pid)
                return ProbeResult(
                    False, f"the probe child did not finish within {PROBE_TIMEOUT:g} s (stopped or traced?) and was killed",
                    transient=True,
                )
            self._sleep(delay)
            delay = min(delay * 2, 0.01)

    def _kill(self, pid: int) -> None:
        """SIGKILL and reap (best effort: it may have just exited)."""
        try:
            self._sys.kill(pid, signal.SIGKILL)
            self._sys.waitpid(pid, WALL)
        except ExecmemError:
            pass

    def after_fork_in_child(self) -> None:
        """A probe running in the parent's thread does not exist here: start afresh."""
        if self.result is None:
            self._done = None
            self._retry_at = 0.0


def _host_routine() -> Callable[[int], object] | None:
    from execmem.native._routines import host_routines

    return host_routines().get("probe_membarrier")


#: The probe of this process.
PROBE = MembarrierProbe(_host_routine)
os.register_at_fork(after_in_child=PROBE.after_fork_in_child)

__all__ = ["PROBE", "PROBE_TIMEOUT", "PROBE_WAIT", "WALL", "MembarrierProbe", "ProbeResult", "classify"]
