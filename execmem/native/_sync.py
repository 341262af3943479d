"""Cache maintenance and cross-thread serialization on the host CPU.

The recipes (``ArchSpec.publish`` etc.) name *what* must happen; this module is the
only place that knows *how* on each host, in the manner of wasmtime's
``jit-icache-coherence``: one builder function per architecture, chosen once from
:data:`HOSTS` by ``spec.name`` and bound into a :class:`Synchronizer`, so nothing
else ever branches on an architecture.

* **x86-64** - instruction fetch is coherent with stores, so ``clean_dcache``,
  ``barrier`` and ``invalidate_icache`` are no-ops; ``local_cse`` is SERIALIZE where
  the CPU has it, else an IRET to the next instruction (both serializing, SDM Vol. 3
  9.1.3; CPUID, also serializing, is a VM exit under a hypervisor and only asks once
  which one); ``remote_cse`` is ``membarrier(PRIVATE_EXPEDITED_SYNC_CORE)``.
* **arm64** - line sizes and IDC/DIC come from CTR_EL0 (read by a routine, decoded by
  the pure :func:`decode_ctr_el0`); ``DC CVAU``/``IC IVAU`` loops, ``DSB ISH`` and
  ``ISB`` are routines; ``remote_cse`` is membarrier SYNC_CORE.
* **riscv64** - ``fence rw,rw`` and ``fence.i`` routines; ``remote_cse`` is the
  ``riscv_flush_icache`` system call with flags 0 (every thread of the process).

``remote_cse`` mechanisms are tried in the host's order (:data:`REMOTE_CANDIDATES`,
:class:`RemoteCse`) and the one in use is reported with why.  Because some seccomp
profiles kill a process with SIGSYS the first time it calls membarrier, membarrier is
first exercised by a forked child (``_probe``); only if the child survives does this
process touch it.  ``remote_cse`` always runs, even in a process with one thread: the
kernel returns at once when no other thread shares the address space (``mm_users``
is 1), for the price of the system call (1 us here through ctypes), where telling from
user space took a ``/proc/self/task`` scan per publish (openat, two getdents64, close:
6 us here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from execmem._backend import Range
from execmem._errors import ExecmemError, SystemCallError, UnsupportedError
from execmem._locks import OwnedLock
from execmem.arch import ArchSpec
from execmem.native import _libc
from execmem.native._probe import PROBE, ProbeResult
from execmem.native._routines import HostRoutines

# --- CTR_EL0 (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheType:
    """Decoded arm64 CTR_EL0 (Arm ARM D19.2 "CTR_EL0, Cache Type Register")."""

    raw: int
    #: Smallest instruction / data cache line in bytes (4 << IminLine / DminLine).
    icache_line: int
    dcache_line: int
    #: L1 instruction cache policy: 0 VPIPT, 1 AIVIVT, 2 VIPT, 3 PIPT.
    l1ip: int
    #: IDC=1: data cache clean to PoU not required for instruction-to-data coherence.
    idc: bool
    #: DIC=1: instruction cache invalidation to PoU not required.
    dic: bool

    @property
    def features(self) -> frozenset[str]:
        return frozenset(name for name, on in (("idc", self.idc), ("dic", self.dic)) if on)


def decode_ctr_el0(value: int) -> CacheType:
    """Decode a CTR_EL0 value: IminLine [3:0], L1Ip [15:14], DminLine [19:16], IDC [28], DIC [29]."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"CTR_EL0 value out of range: {value:#x}")
    return CacheType(
        raw=value,
        icache_line=4 << (value & 0xF),
        dcache_line=4 << ((value >> 16) & 0xF),
        l1ip=(value >> 14) & 0x3,
        idc=bool(value >> 28 & 1),
        dic=bool(value >> 29 & 1),
    )


# --- remote context synchronization -----------------------------------------------------


class _Unavailable(Exception):
    """A mechanism cannot be used here (reason in the message)."""


#: errnos after which a mechanism is abandoned for the next one.
_FALLBACK_ERRNOS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES})


class _Membarrier:
    """A membarrier command that needs its registration first (EPERM otherwise)."""

    def __init__(self, name: str, command: int, register: int | None, sys_: _libc.Syscalls, notes: list[str]) -> None:
        self.name, self.command, self.register = name, command, register
        self._sys, self._notes = sys_, notes
        # The hot path (every publish into a mapped pack): one bound call.
        self._command = functools.partial(sys_.membarrier, command)

    def prepare(self, mask: int) -> None:
        if not mask & self.command:
            raise _Unavailable(f"{self.name}: not offered by membarrier(QUERY) = {mask:#x}")
        if self.register is not None:
            self._sys.membarrier(self.register)

    def run(self, ranges: Sequence[Range]) -> None:
        try:
            self._command()
        except ExecmemError as exc:
            if _libc.errno_of(exc) != errno.EPERM or self.register is None:
                raise
            # Not registered (e.g. in a forked child, or registration lost): register
            # and retry once, as wasmtime's pipeline_flush_mt does.
            self._notes.append(f"{self.name}: EPERM, registered and retried")
            self._sys.membarrier(self.register)
            self._sys.membarrier(self.command)

    def close(self) -> None:
        pass


class _MprotectIpi:
    """Downgrading a present, dirty PTE makes the kernel shoot down the TLB of every CPU
    running this process with an IPI; on x86 the IPI returns with IRET, which is
    serializing.  Best effort: kernels using broadcast invalidation (AMD INVLPGB) send
    no IPI, and threads not running at the time are not interrupted."""

    name = "mprotect-ipi"

    def __init__(self, sys_: _libc.Syscalls, page_size: int) -> None:
        self._sys, self._size = sys_, page_size
        self._page = 0
        self._writable = False

    def prepare(self, mask: int) -> None:
        self._page = self._sys.mmap(
            0, self._size, _libc.PROT_READ | _libc.PROT_WRITE, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS
        )
        self._writable = True

    def run(self, ranges: Sequence[Range]) -> None:
        rw = _libc.PROT_READ | _libc.PROT_WRITE
        if not self._writable:  # an earlier run could not make the page writable again
            self._sys.mprotect(self._page, self._size, rw)
            self._writable = True
        ctypes.memset(self._page, 1, 1)  # present and dirty: the downgrade needs a flush
        # Not writable from before the downgrade: an exception (KeyboardInterrupt) just
        # after it must not leave the next run writing to a read-only page.
        self._writable = False
        self._sys.mprotect(self._page, self._size, _libc.PROT_READ)
        self._sys.mprotect(self._page, self._size, rw)
        self._writable = True

    def close(self) -> None:
        if self._page:
            self._sys.munmap(self._page, self._size)
            self._page = 0  # kept when munmap fails, so that a second close retries


class _RiscvFlushIcache:
    name = "riscv_flush_icache"

    def __init__(self, sys_: _libc.Syscalls) -> None:
        self._sys = sys_

    def prepare(self, mask: int) -> None:
        pass

    def run(self, ranges: Sequence[Range]) -> None:
        start = min((s for s, _ in ranges), default=0)
        end = max((s + n for s, n in ranges), default=0)
        self._sys.riscv_flush_icache(start, end, 0)  # flags 0: every thread of the process

    def close(self) -> None:
        pass


_Mechanism = _Membarrier | _MprotectIpi | _RiscvFlushIcache


#: Seconds after a transient probe verdict before membarrier is asked about again.
RECHECK_AFTER = 1.0


class RemoteCse:
    """``remote_cse`` with fallbacks; selects lazily (on first use) and reports.

    ``candidates`` is the architecture's order of preference, from
    ``membarrier-sync-core``, ``membarrier-private-expedited``, ``mprotect-ipi``,
    ``membarrier-global`` and ``riscv_flush_icache``.  ``why`` says why the mechanism
    in use was chosen.  A fallback taken because the membarrier probe failed for a
    transient reason (``ProbeResult.transient``) is provisional: from
    :data:`RECHECK_AFTER` seconds on, each run asks the probe again (which never
    waits for a retry in progress) and switches to membarrier once it is safe.
    """

    def __init__(
        self,
        sys_: _libc.Syscalls,
        candidates: Sequence[str],
        *,
        page_size: int,
        probe: Callable[[], ProbeResult] = PROBE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sys = sys_
        self._candidates = tuple(candidates)
        self._page_size = page_size
        self._probe = probe
        self._clock = clock
        # Per backend.  An OwnedLock: the selection makes system calls (membarrier
        # registration, the mprotect-IPI page) and moves self._index/_current in
        # several steps, so a signal handler synchronizing through the same backend
        # meanwhile gets BadStateError rather than a deadlock or a half-made choice.
        self._lock = OwnedLock("the remote_cse mechanism of a native backend")
        self._current: _Mechanism | None = None
        self._index = 0
        #: When a provisional choice (see the class docstring) is reconsidered.
        self._recheck_at: float | None = None
        self.notes: list[str] = []
        self.why: str | None = None
        self.runs: Counter[str] = Counter()

    @property
    def mechanism(self) -> str | None:
        """The mechanism in use, or None before the first ``remote_cse``."""
        return self._current.name if self._current is not None else None

    def _make(self, name: str) -> _Mechanism:
        s, n = self._sys, self.notes
        table: dict[str, Callable[[], _Mechanism]] = {
            "membarrier-sync-core": lambda: _Membarrier(
                name,
                _libc.MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                _libc.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                s,
                n,
            ),
            "membarrier-private-expedited": lambda: _Membarrier(
                name, _libc.MEMBARRIER_CMD_PRIVATE_EXPEDITED, _libc.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, s, n
            ),
            "membarrier-global": lambda: _Membarrier(name, _libc.MEMBARRIER_CMD_GLOBAL, None, s, n),
            "mprotect-ipi": lambda: _MprotectIpi(s, self._page_size),
            "riscv_flush_icache": lambda: _RiscvFlushIcache(s),
        }
        return table[name]()

    def _note(self, note: str) -> None:
        self.notes.append(note)
        del self.notes[:-32]

    def _select(self) -> _Mechanism:
        """The next usable candidate from ``self._index`` on (lock held)."""
        mask: int | None = None
        verdict = ""
        passed: list[str] = []
        while self._index < len(self._candidates):
            name = self._candidates[self._index]
            mechanism = self._make(name)
            # The index moves on only once a candidate is judged: an exception that
            # stops the judging (KeyboardInterrupt in the probe) leaves it to retry.
            try:
                if isinstance(mechanism, _Membarrier):
                    if mask is None:
                        mask, verdict = self._query()
                        if mask < 0:
                            raise _Unavailable(f"{name}: {verdict}")
                    if mask < 0:
                        raise _Unavailable(f"{name}: likewise")
                mechanism.prepare(mask or 0)
            except _Unavailable as exc:
                self._index += 1
                passed.append(str(exc))
                continue
            except ExecmemError as exc:
                if _libc.errno_of(exc) not in _FALLBACK_ERRNOS:
                    raise
                self._index += 1
                passed.append(f"{name}: {exc}")
                continue
            self._index += 1
            for note in passed:
                self._note(note)
            self._current = mechanism
            first = "the first choice" if not passed else "after " + "; ".join(passed)
            self.why = f"{first}; {verdict}" if isinstance(mechanism, _Membarrier) else first
            return mechanism
        for note in passed:
            self._note(note)
        message = "no way to make other threads take a context synchronization event: " + "; ".join(self.notes)
        # Start over next time: a mechanism abandoned for a transient failure gets
        # another chance instead of leaving the process unable to publish for good.
        self._index = 0
        raise SystemCallError(errno.ENOSYS, message)

    def _query(self) -> tuple[int, str]:
        """membarrier(QUERY) once the probe says the call will not kill us, and why
        (mask -1: unusable, and the reason)."""
        verdict = self._probe()
        if not verdict.safe:
            if verdict.transient:
                self._recheck_at = self._clock() + RECHECK_AFTER
                return -1, f"membarrier not used for now: {verdict.detail}"
            return -1, f"membarrier not used: {verdict.detail}"
        try:
            mask = self._sys.membarrier(_libc.MEMBARRIER_CMD_QUERY)
        except ExecmemError as exc:
            return -1, f"membarrier(QUERY): {exc}"
        return mask, f"{verdict.detail}; QUERY here: {mask:#x}"

    def _recheck(self) -> None:
        """Reconsider a provisional choice (lock held): keep it unless the probe is now
        safe and a better mechanism can be prepared."""
        if self._recheck_at is None or self._clock() < self._recheck_at:
            return
        self._recheck_at = None
        verdict = self._probe()
        if not verdict.safe:
            if verdict.transient:
                self._recheck_at = self._clock() + RECHECK_AFTER
            return
        previous, index = self._current, self._index
        self._index = 0
        try:
            chosen = self._select()
        except ExecmemError as exc:
            self._note(f"membarrier still unusable: {exc}")
            self._current, self._index = previous, index
            return
        if previous is not None and chosen is not previous:
            self._note(f"{previous.name} replaced by {chosen.name}: {verdict.detail}")
            with contextlib.suppress(ExecmemError):  # best effort: only a helper page
                previous.close()

    def run(self, ranges: Sequence[Range]) -> None:
        mechanism = self._current  # one atomic read: no lock once a mechanism is chosen
        if mechanism is None or self._recheck_at is not None:
            with self._lock:
                self._recheck()
                mechanism = self._current if self._current is not None else self._select()
        while True:
            try:
                mechanism.run(ranges)
            except ExecmemError as exc:
                if _libc.errno_of(exc) not in _FALLBACK_ERRNOS:
                    raise
                with self._lock:
                    if self._current is mechanism:
                        self._note(f"{mechanism.name} failed ({exc}); falling back")
                        mechanism.close()
                        self._current = None
                        mechanism = self._select()
                    elif self._current is not None:
                        mechanism = self._current  # another thread already fell back
                    else:
                        mechanism = self._select()
                continue
            runs = self.runs
            runs[mechanism.name] = runs.get(mechanism.name, 0) + 1
            return

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.close()


# --- per-host builders ------------------------------------------------------------------


def _noop(ranges: Sequence[Range]) -> None:
    pass


def _plain(fn: Callable[..., object]) -> Callable[[Sequence[Range]], None]:
    def step(ranges: Sequence[Range]) -> None:
        fn()

    return step


def _per_line(fn: Callable[..., object], line: int) -> Callable[[Sequence[Range]], None]:
    def step(ranges: Sequence[Range]) -> None:
        for start, size in ranges:
            if size > 0:
                fn(start, start + size, line)

    return step


@dataclass
class HostSync:
    """What one host does for each step (filled by a builder from :data:`HOSTS`)."""

    steps: dict[str, Callable[[Sequence[Range]], None]]
    how: dict[str, str]
    remote: RemoteCse
    features: frozenset[str] = frozenset()
    lines: tuple[int, int] = (64, 64)
    cache_type: CacheType | None = None
    extra: dict[str, object] = field(default_factory=dict)


Builder = Callable[[ArchSpec, _libc.Syscalls, HostRoutines, int, Callable[[], ProbeResult]], HostSync]

_COHERENT = "no-op: instruction fetch is coherent with data stores"

#: ``remote_cse`` mechanisms per host, in order of preference.  x86-64:
#: PRIVATE_EXPEDITED's IPIs return with IRET (serializing on x86); the mprotect-induced
#: shootdown IPI likewise; GLOBAL waits for every CPU to pass through the scheduler.
#: arm64: an IPI returns with ERET, a context-synchronization event; broadcast TLBI
#: sends no IPI, so mprotect is no fallback there (seeds/000).
REMOTE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "x86_64": ("membarrier-sync-core", "membarrier-private-expedited", "mprotect-ipi", "membarrier-global"),
    "arm64": ("membarrier-sync-core", "membarrier-private-expedited", "membarrier-global"),
    "riscv64": ("riscv_flush_icache",),
}


def uses_membarrier(spec: ArchSpec) -> bool:
    """Whether this host may call membarrier (and so needs the probe)."""
    return any(name.startswith("membarrier") for name in REMOTE_CANDIDATES.get(spec.name, ()))


def _x86_local_cse(routines: HostRoutines) -> tuple[Callable[..., object], str]:
    """SERIALIZE where the CPU has it, else IRET to self: what Linux ``sync_core()``
    does since "x86/sync_core: Use SERIALIZE in sync_core()" (v5.10), and for the same
    reason: CPUID, serializing too, is a VM exit under a hypervisor (5.5 us against
    39 ns for the IRET on this project's virtual machine).  CPUID runs once per
    process, to tell (the answer is kept with the routines)."""
    has = routines.probed.get("serialize")
    if has is None:
        test, serialize = routines.get("has_serialize"), routines.get("serialize")
        has = routines.probed["serialize"] = bool(test is not None and serialize is not None and test())
    if has:
        return routines["serialize"], "serialize (CPUID.(EAX=7,ECX=0):EDX[14] = 1, asked once)"
    return routines["local_cse"], "iret to self (no SERIALIZE: CPUID.(EAX=7,ECX=0):EDX[14] = 0, asked once)"


def _x86_64(
    spec: ArchSpec, sys_: _libc.Syscalls, routines: HostRoutines, page: int, probe: Callable[[], ProbeResult]
) -> HostSync:
    local_cse, how = _x86_local_cse(routines)
    return HostSync(
        steps={
            "clean_dcache": _noop,
            "barrier": _noop,
            "invalidate_icache": _noop,
            "local_cse": _plain(local_cse),
        },
        how={
            "clean_dcache": _COHERENT,
            "barrier": _COHERENT,
            "invalidate_icache": _COHERENT,
            "local_cse": how,
        },
        remote=RemoteCse(sys_, REMOTE_CANDIDATES[spec.name], page_size=page, probe=probe),
        lines=spec.cache_lines,
    )


def _arm64(
    spec: ArchSpec, sys_: _libc.Syscalls, routines: HostRoutines, page: int, probe: Callable[[], ProbeResult]
) -> HostSync:
    cache = decode_ctr_el0(int(routines["read_cache_type"]()))  # type: ignore[call-overload]
    return HostSync(
        steps={
            "clean_dcache": _per_line(routines["clean_dcache"], cache.dcache_line),
            "barrier": _plain(routines["barrier"]),
            "invalidate_icache": _per_line(routines["invalidate_icache"], cache.icache_line),
            "local_cse": _plain(routines["local_cse"]),
        },
        how={
            "clean_dcache": f"dc cvau every {cache.dcache_line} B",
            "barrier": "dsb ish",
            "invalidate_icache": f"ic ivau every {cache.icache_line} B",
            "local_cse": "isb",
        },
        remote=RemoteCse(sys_, REMOTE_CANDIDATES[spec.name], page_size=page, probe=probe),
        features=cache.features,
        lines=(cache.dcache_line, cache.icache_line),
        cache_type=cache,
    )


def _riscv64(
    spec: ArchSpec, sys_: _libc.Syscalls, routines: HostRoutines, page: int, probe: Callable[[], ProbeResult]
) -> HostSync:
    return HostSync(
        steps={
            "clean_dcache": _noop,
            "barrier": _plain(routines["barrier"]),
            "invalidate_icache": _noop,
            "local_cse": _plain(routines["local_cse"]),
        },
        how={
            "clean_dcache": "no-op (Zifencei has no cache maintenance by address)",
            "barrier": "fence rw,rw",
            "invalidate_icache": "no-op (fence.i covers it)",
            "local_cse": "fence.i",
        },
        remote=RemoteCse(sys_, REMOTE_CANDIDATES[spec.name], page_size=page, probe=probe),
        lines=spec.cache_lines,
    )


#: One builder per host architecture, keyed by ``ArchSpec.name``.
HOSTS: dict[str, Builder] = {"x86_64": _x86_64, "arm64": _arm64, "riscv64": _riscv64}


class Synchronizer:
    """Runs recipe steps on the host; see the module docstring."""

    def __init__(
        self,
        spec: ArchSpec,
        sys_: _libc.Syscalls,
        routines: HostRoutines,
        *,
        page_size: int,
        probe: Callable[[], ProbeResult] = PROBE,
    ) -> None:
        try:
            builder = HOSTS[spec.name]
        except KeyError:
            raise UnsupportedError(f"no native synchronization for {spec.name}") from None
        self._host = builder(spec, sys_, routines, page_size, probe)
        self.features = self._host.features
        self.lines = self._host.lines
        #: Every step by name, ``remote_cse`` included: one lookup per step run.
        self.actions = {**self._host.steps, "remote_cse": self._host.remote.run}

    @property
    def remote(self) -> RemoteCse:
        return self._host.remote

    def action(self, step: str) -> Callable[[Sequence[Range]], None]:
        """What runs ``step`` here (``UnsupportedError`` for a name that is no host step)."""
        try:
            return self.actions[step]
        except KeyError:
            raise UnsupportedError(f"run_step cannot execute {step!r} (write/map/atomic_store have their own verbs)") from None

    def run(self, step: str, ranges: Sequence[Range]) -> None:
        self.action(step)(ranges)

    def describe(self) -> dict[str, object]:
        remote = self._host.remote
        how: dict[str, object] = dict(self._host.how)
        how["remote_cse"] = remote.mechanism or "not selected yet (chosen on first use)"
        described: dict[str, object] = {
            "how": how,
            "remote_cse": remote.mechanism,
            "remote_cse_why": remote.why,
            "remote_cse_runs": dict(remote.runs),
            "notes": list(remote.notes),
            "cache_lines": {"data": self.lines[0], "instruction": self.lines[1]},
            "cache_features": sorted(self.features),
        }
        if self._host.cache_type is not None:
            described["ctr_el0"] = f"{self._host.cache_type.raw:#x}"
        return described

    def close(self) -> None:
        self._host.remote.close()


__all__ = [
    "HOSTS",
    "REMOTE_CANDIDATES",
    "CacheType",
    "ProbeResult",
    "RemoteCse",
    "Synchronizer",
    "decode_ctr_el0",
    "uses_membarrier",
]
