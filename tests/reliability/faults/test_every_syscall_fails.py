"""Fault injection, enumerated: every system call of every public flow fails in turn.

For each flow (allocation into a new pack, a dedicated reservation, publishing into a
mapped pack with and without a warm membarrier, in-place writing, live patching,
freeing, retirement and release of packs, batches, close, a fresh allocator's whole
life, a free that waits for a call in flight, stats) the harness first runs the flow
once and counts its system calls by name (through the one door, ``_libc``), then
reruns it from scratch once per (call name, errno, k) with the k-th call of that name
failing, for every k below the count.  It does not sample: the number of injection
points is the sum of the counts times the errnos tried.  Each point must end in an
``ExecmemError`` naming the call, or in a documented fallback whose result is checked
(membarrier -> the next mechanism, a refused hint ignored, memfd -> /dev/shm -> the
temp dir, hugetlb -> ordinary pages, no seal on old kernels, the view mapped from the
read+write descriptor when ``/proc/self/fd`` cannot be reopened).

Around every point:

* W^X at every moment: a tracer wrapped around the libc entry points sees every
  ``mmap``/``mprotect`` execmem makes, refuses a writable+executable protection and
  re-reads ``/proc/self/maps`` after each one that succeeded;
* no leak: the tracer's own ledger of what execmem mapped/opened and unmapped/closed
  is empty after ``close``, nothing named execmem or overlapping those ranges stays in
  ``/proc/self/maps`` (bar anonymous read+write memory Python may reuse), and
  ``/proc/self/fd`` is as before; before ``close`` everything mapped is owned by the
  backend (no untracked mapping);
* every other live text (three in the flow's allocator, three in a bystander
  allocator that lives for the whole module) is byte-for-byte intact and returns its
  value when called, and the allocator's invariants hold (see :func:`audit_allocator`);
* the allocator is usable afterwards: a new text is allocated, published and called.

The base conditions multiply the flows: memfd missing, memfd missing and ``/dev/shm``
mounted noexec, membarrier missing, and a membarrier probe that reports the call
would kill the process (seccomp).  The number of injection points is printed (``-s``)
and checked against a floor.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import programs as P
import pytest
from audit import audit_allocator, gate_ranges, open_fds

import execmem
from execmem import JitFunction, JitText, TextState, _gates
from execmem._errors import ExecmemError
from execmem.bench._measure import idle_thread
from execmem.native import NativeBackend, _fork, _libc, _probe, _procmaps, _sync
from execmem.native._routines import host_routines

pytestmark = P.needs_programs

#: The default pack size: the large-page paths (hugetlb, MADV_HUGEPAGE) are taken.
LARGE = 2 << 20
#: Most flows use small packs: the calls are the same, the points run faster.
SMALL = 1 << 16
PAGE = 4096
SAFE = lambda: _sync.ProbeResult(True, "test")  # noqa: E731
UNSAFE = lambda: _sync.ProbeResult(False, "probe child killed by SIGSYS (seccomp?)")  # noqa: E731
W, X = _libc.PROT_WRITE, _libc.PROT_EXEC
#: Tries of a point whose reach depends on where the kernel placed a mapping.
ADDRESS_RETRIES = 6

#: errnos tried at every point, per call: the hard failure and the ones that select a
#: fallback (EINVAL/ENOSYS/EPERM/EACCES are what old kernels, seccomp and noexec give).
ERRNOS: dict[str, tuple[int, ...]] = {
    "mmap": (errno.ENOMEM, errno.EPERM),
    "munmap": (errno.ENOMEM,),  # every munmap failure takes the same path
    "mprotect": (errno.ENOMEM, errno.EACCES),
    "madvise": (errno.EINVAL, errno.ENOMEM, errno.EFAULT),
    "memfd_create": (errno.EINVAL, errno.ENOSYS, errno.EMFILE),
    "ftruncate": (errno.ENOSPC, errno.EPERM),
    "fallocate": (errno.ENOSPC, errno.EOPNOTSUPP),
    "open": (errno.EACCES, errno.EMFILE),
    "unlink": (errno.EACCES,),
    "close": (errno.EIO,),
    "fcntl": (errno.EINVAL, errno.EPERM),  # EINVAL: F_SEAL_FUTURE_WRITE unknown (< 5.1)
    "membarrier": (errno.EPERM, errno.EINVAL, errno.ENOSYS),
    "pwrite": (errno.ENOSPC, errno.EIO),
    "mremap": (errno.ENOMEM, errno.EINVAL),
    "clone": (errno.EAGAIN, errno.ENOMEM, errno.EPERM),  # transient, transient, final
    # The probe polls its child: how many waitpids depends on timing, so it has no fixed
    # k-th call to fail here; its failures are tested in test_native_probe.py.
    "waitpid": (),
}


def _exec_with_fd(args: tuple[object, ...]) -> bool:
    prot, fd = args[2], args[4]
    return isinstance(prot, int) and isinstance(fd, int) and bool(prot & X) and fd >= 0


# --- the tracer: a ledger of what execmem maps and opens, and a W^X check per call -------


class Tracer:
    """Wraps ``_libc``'s entry points (the one door) for the duration of a ``with``."""

    def __init__(self, *, audit_maps: bool = True, allow_wx: bool = False) -> None:
        self.pages: set[int] = set()  # pages execmem has mapped and not unmapped
        self.touched: list[tuple[int, int]] = []  # every range execmem mapped
        self.fds: set[int] = set()
        self.violations: list[str] = []
        self.audit_maps = audit_maps
        self.allow_wx = allow_wx
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    def _range(self, addr: int, length: int) -> range:
        return range(addr // PAGE, -(-(addr + length) // PAGE))

    def _wx(self, what: str, addr: int, length: int, prot: int) -> None:
        if prot & W and prot & X and not self.allow_wx:
            self.violations.append(f"{what}({addr:#x}, {length:#x}) asked for W+X")
        # The protection of a mapping is set whole by one call, so the argument check
        # above is exact; the kernel's view is re-read after each executable one.
        if self.audit_maps and prot & X:
            bad = _procmaps.wx_violations([(addr, length)])
            if bad and not self.allow_wx:
                self.violations.append(f"after {what}({addr:#x}, {length:#x}): W+X in maps: {bad}")

    def __enter__(self) -> Tracer:
        real = {name: getattr(_libc, name) for name in ("_mmap", "_munmap", "_mprotect", "_close", "_open")}
        real["_memfd_create"] = _libc._memfd_create
        self._saved = real

        def mmap(addr: Any, length: int, prot: int, flags: int, fd: int, off: int) -> Any:
            result = real["_mmap"](addr, length, prot, flags, fd, off)
            if result is not None and result != _libc.MAP_FAILED:
                with self._lock:
                    self.pages.update(self._range(result, length))
                    self.touched.append((result, length))
                self._wx("mmap", result, length, prot)
            return result

        def munmap(addr: int, length: int) -> int:
            result = real["_munmap"](addr, length)
            if result == 0:
                with self._lock:
                    self.pages.difference_update(self._range(addr, length))
            return int(result)

        def mprotect(addr: int, length: int, prot: int) -> int:
            result = real["_mprotect"](addr, length, prot)
            if result == 0:
                self._wx("mprotect", addr, length, prot)
            return int(result)

        def opener(name: str) -> Callable[..., int]:
            def call(*args: Any) -> int:
                fd = int(real[name](*args))
                if fd >= 0:
                    with self._lock:
                        self.fds.add(fd)
                return fd

            return call

        def close(fd: int) -> int:
            with self._lock:
                self.fds.discard(fd)  # Linux releases the fd whatever close returns
            return int(real["_close"](fd))

        _libc._mmap, _libc._munmap, _libc._mprotect, _libc._close = mmap, munmap, mprotect, close
        _libc._open = opener("_open")
        if real["_memfd_create"] is not None:
            _libc._memfd_create = opener("_memfd_create")
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(_libc, name, fn)


# --- kernel views -------------------------------------------------------------------------


def backend_pages(b: NativeBackend) -> set[int]:
    """Pages of every range ``b`` owns, with its mprotect-IPI helper page."""
    ranges = list(b.owned_ranges())
    current = b._sync.remote._current if b._sync is not None else None
    if getattr(current, "_page", 0):
        ranges.append((current._page, PAGE))  # type: ignore[union-attr]
    return {page for start, size in ranges for page in range(start // PAGE, -(-(start + size) // PAGE))}


def gate_pages() -> set[int]:
    """Pages of the process's call gates (never released: not any point's)."""
    gates = _gates.allocator_of_gates()
    return set() if gates is None else backend_pages(gates.backend)  # type: ignore[arg-type]


def execmem_vmas(touched: list[tuple[int, int]], ignore: list[tuple[int, int]]) -> list[_procmaps.Vma]:
    """VMAs that could be execmem's: named after it, or inside a range it mapped and not
    anonymous read+write memory (which Python's allocators may have reused)."""
    out = []
    for v in _procmaps.read_maps():
        if any(v.overlaps(s, n) for s, n in ignore):
            continue
        ours = "execmem" in v.path or any(v.overlaps(s, n) for s, n in touched)
        if ours and not (v.perms == "rw-p" and v.path == ""):
            out.append(v)
    return out


# --- live functions that must survive everything --------------------------------------------


@dataclass
class Keeper:
    text: JitText
    fn: JitFunction
    switch: P.Switch  # its versions: live updates cycle through them
    index: int = 0

    @property
    def value(self) -> int:
        return self.switch.values[self.index]

    @property
    def code(self) -> bytes:
        return self.switch.image(self.index, self.text.address)

    def next_patch(self) -> tuple[int, bytes]:
        """The index of the next version and the bytes ``update(0, ...)`` stores for it."""
        index = (self.index + 1) % len(self.switch.values)
        return index, self.switch.patch(index, self.text.address)

    def check(self) -> str:
        if self.text.state is not TextState.LIVE:
            return f"{self.text!r} is no longer LIVE"
        if ctypes.string_at(self.text.address, len(self.code)) != self.code:
            return f"{self.text!r}: bytes changed"
        got = self.fn()
        return "" if got == self.value else f"{self.text!r} returned {got}, expected {self.value}"


def publish_keepers(a: execmem.Allocator, values: list[int], *, one_batch: bool = True) -> list[Keeper]:
    switches = [P.Switch(tuple(v + (j << 20) for j in range(4))) for v in values]
    texts = []
    for switch in switches:
        t = a.jit_text_alloc(max(16, len(switch.code(0))))
        t.write(0, switch.code(t.address))
        texts.append(t)
    if one_batch:
        a.publish(texts)
    else:
        for t in texts:
            t.map()
    return [Keeper(t, t.function(ctypes.c_int), switch) for t, switch in zip(texts, switches, strict=True)]


@pytest.fixture(scope="module", autouse=True)
def _warm_and_threaded() -> Iterator[None]:
    """A second thread (so that membarrier has someone to serialize), the helper
    page and lazy imports in place before anything is counted."""
    host_routines()
    execmem.asm("ret")
    with execmem.Allocator() as a:  # the process's call gates exist from now on
        t = a.jit_text_alloc(16)
        t.write(0, P.const(1))
        t.map()
        assert t.function(ctypes.c_int)() == 1
    with idle_thread():
        yield


@pytest.fixture(scope="module")
def bystander() -> Iterator[tuple[execmem.Allocator, list[Keeper]]]:
    """An allocator that lives across every injection point; its functions are called
    after each one."""
    backend = NativeBackend("dual", probe=SAFE)
    a = execmem.Allocator(backend=backend, pack_size=1 << 16)
    keepers = publish_keepers(a, [9001, 9002])
    keepers += publish_keepers(a, [9003], one_batch=False)  # a mapped-pack publish
    yield a, keepers
    a.close()
    backend.close()


# --- the environments and flows -------------------------------------------------------------


@dataclass
class Base:
    """Conditions that hold for a whole point (setup, flow, checks, teardown)."""

    name: str
    probe: Callable[[], _sync.ProbeResult] = SAFE
    faults: tuple[tuple[str, int, Callable[[tuple[object, ...]], bool] | None, int | None], ...] = ()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for name, err, when, times in self.faults:
                stack.enter_context(_libc.inject(name, err, when=when, times=times))
            yield


BASES = {
    "normal": Base("normal"),
    "no-memfd": Base("no-memfd", faults=(("memfd_create", errno.ENOSYS, None, None),)),
    "no-memfd-noexec-shm": Base(
        "no-memfd-noexec-shm",
        faults=(("memfd_create", errno.ENOSYS, None, None), ("mmap", errno.EPERM, _exec_with_fd, 1)),
    ),
    "no-membarrier": Base("no-membarrier", faults=(("membarrier", errno.ENOSYS, None, None),)),
    "seccomp-probe": Base("seccomp-probe", probe=UNSAFE),
}


@dataclass
class Env:
    mode: str
    base: Base
    warm_sync: bool = True
    keep_empty: int = 1
    pack: int = SMALL
    huge_pages: bool = True
    backend: NativeBackend = field(init=False)
    a: execmem.Allocator = field(init=False)
    keepers: list[Keeper] = field(init=False)
    #: Backends a flow made of its own (closed again at the end, as a user would after
    #: an error: ``close`` retries what a refused call kept from being released).
    others: list[NativeBackend] = field(default_factory=list)
    #: remote_cse choosers a flow made of its own (closed with the backends).
    remotes: list[_sync.RemoteCse] = field(default_factory=list)
    closed: bool = False
    next_value: int = 100

    def __post_init__(self) -> None:
        self.backend = NativeBackend(self.mode, probe=self.base.probe, huge_pages=self.huge_pages)
        self.a = execmem.Allocator(backend=self.backend, pack_size=self.pack, keep_empty=self.keep_empty)
        # Two neighbours published together into a fresh pack; the third lands in the
        # mapped pack (one remote_cse: the membarrier mechanism is selected) unless
        # the flow wants the selection itself.
        self.keepers = publish_keepers(self.a, [11, 12])
        self.keepers += publish_keepers(self.a, [13], one_batch=not self.warm_sync)

    def value(self) -> int:
        self.next_value += 1
        return self.next_value

    def text(self, size: int = 16, *, value: int | None = None) -> tuple[JitText, int]:
        v = self.value() if value is None else value
        t = self.a.jit_text_alloc(size)
        t.write(0, P.const(v))
        return t, v

    def backends(self) -> list[NativeBackend]:
        return [self.backend, *self.others]

    def owned_pages(self) -> set[int]:
        """Pages of every range the backends own (and the process's call gates)."""
        pages = gate_pages()
        for b in self.backends():
            pages |= backend_pages(b)
        for remote in self.remotes:  # their mprotect-IPI helper pages
            page = getattr(remote._current, "_page", 0)
            if page:
                pages.add(page // PAGE)
        return pages

    def close(self) -> None:
        """Close everything; a second ``close`` retries what the first could not release."""
        self.closed = True
        with contextlib.suppress(ExecmemError):
            self.a.close()
        for remote in self.remotes:
            remote.close()
        for b in self.backends():
            try:
                b.close()
            except ExecmemError:
                b.close()


#: A flow acts on an Env and returns a check of its outcome when it succeeded.
Flow = Callable[[Env], Callable[[], None]]


def _calls(t: JitText, v: int) -> Callable[[], None]:
    def check() -> None:
        assert t.state is TextState.LIVE
        assert t.function(ctypes.c_int)() == v

    return check


def flow_new_pack(env: Env) -> Callable[[], None]:
    """Fill the first pack, allocate into a new one (reserve), publish fresh (map)."""
    env.a.jit_text_alloc(env.pack // 2)
    t, v = env.text(env.pack // 2)
    t.map()
    return _calls(t, v)


def flow_dedicated(env: Env) -> Callable[[], None]:
    """A text larger than half a pack gets its own reservation; freed, it is retired."""
    t, v = env.text(env.pack // 2 + 64)
    t.map()
    assert t.function(ctypes.c_int)() == v
    t.free()
    return lambda: None


def flow_publish_mapped(env: Env) -> Callable[[], None]:
    """write + map into the mapped pack: local serialization and one remote_cse."""
    t, v = env.text()
    runs = _remote_runs(env)
    t.map()

    def check() -> None:
        _calls(t, v)()
        assert _remote_runs(env) == runs + 1, "publish into a mapped pack must synchronize other threads"

    return check


def _remote_runs(env: Env) -> int:
    sync = env.backend.stats()["sync"]
    assert isinstance(sync, dict)
    runs = sync.get("remote_cse_runs") or {}
    assert isinstance(runs, dict)
    return sum(runs.values())


def flow_inplace_mapped(env: Env) -> Callable[[], None]:
    t = env.a.jit_text_alloc(16)
    v = env.value()
    t.map_rw_inplace()
    t.write(0, P.const(v))
    t.finalize()
    return _calls(t, v)


def flow_inplace_fresh(env: Env) -> Callable[[], None]:
    env.a.jit_text_alloc(env.pack // 2)
    t = env.a.jit_text_alloc(env.pack // 2)
    v = env.value()
    t.map_rw_inplace()
    t.write(0, P.const(v))
    t.finalize()
    return _calls(t, v)


def flow_update(env: Env) -> Callable[[], None]:
    k = env.keepers[0]
    index, patch = k.next_patch()
    k.text.update(0, patch)  # one whole patchable instruction in one word
    k.index = index
    return lambda: None


def flow_free_neighbour(env: Env) -> Callable[[], None]:
    k = env.keepers.pop(1)
    k.text.free()

    def check() -> None:
        # The refill comes with the next epoch (the audit checks the chunks are not
        # handed out before it).
        pending = k.text._pack.chunks.dirty >> k.text._chunk & 1
        assert ctypes.string_at(k.text.address, 16) == P.traps(16) or pending
        with pytest.raises(execmem.UseAfterFreeError):
            k.fn()

    return check


def flow_retire_reuse(env: Env) -> Callable[[], None]:
    """keep_empty=0: a second pack empties and is unmapped (retired); the next request
    forces an epoch and adopts it as a fresh pack (map again)."""
    t1, _ = env.text(env.pack // 2)
    t2, _ = env.text(env.pack // 2)
    env.a.publish([t1, t2])
    t1.free()
    t2.free()
    env.text(env.pack // 2)
    t4, v = env.text(env.pack // 2)
    t4.map()
    return _calls(t4, v)


def flow_retire_release(env: Env) -> Callable[[], None]:
    """keep_empty=0: a retired pack matures at one epoch and is released at the next."""
    t1, _ = env.text(env.pack // 2)
    t2, _ = env.text(env.pack // 2)
    env.a.publish([t1, t2])
    t1.free()
    t2.free()
    u, _ = env.text()
    u.map()  # epoch 1: the retired pack matures
    w, v = env.text()
    w.map()  # epoch 2: not reused, released

    def check() -> None:
        _calls(w, v)()
        st: dict[str, Any] = env.a.stats()
        # A refused unmap/release leaves the empty pack for the next trim (counted).
        housekeeping = st["events"].get("trim_errors", 0) + st["events"].get("release_errors", 0)
        assert st["totals"]["packs"] == 1 or housekeeping, (st["events"], st["packs"])

    return check


def flow_batch(env: Env) -> Callable[[], None]:
    """One batch: a patch, a text into the mapped pack, two into a new pack, one in place."""
    k = env.keepers[0]
    patch = env.backend.mode == "dual-mapping"
    with env.a.batch():
        if patch:
            index, patch_bytes = k.next_patch()
            k.text.update(0, patch_bytes)
        t1, v1 = env.text()
        t1.map()
        env.a.jit_text_alloc(env.pack // 2)
        t2, v2 = env.text(env.pack // 2)
        t3 = env.a.jit_text_alloc(16)
        v3 = env.value()
        t3.map_rw_inplace()
        t3.write(0, P.const(v3))
        execmem.publish([t2, t3])
    if patch:
        k.index = index

    def check() -> None:
        for t, v in ((t1, v1), (t2, v2), (t3, v3)):
            _calls(t, v)()

    return check


def flow_many(env: Env) -> Callable[[], None]:
    """jit_text_alloc_many over the mapped pack, a new pack and a dedicated reservation,
    then one publish(texts, codes): coalesced writes, both recipes, one remote_cse."""
    sizes = [16] * 20 + [env.pack // 2 - 64, env.pack // 2 + 64] + [16] * 4
    texts = env.a.jit_text_alloc_many(sizes)
    values = [env.value() for _ in texts]
    env.a.publish(texts, [P.const(v) for v in values])

    def check() -> None:
        for t, v in zip(texts, values, strict=True):
            _calls(t, v)()

    return check


def flow_grow(env: Env) -> Callable[[], None]:
    """A text past the mapped part of the pack: the pack grows in place (trap-filled
    file or pages, then the view extended), then the text is published there."""
    res = env.keepers[0].text._pack.reservation
    assert res.size < res.capacity
    t, v = env.text(res.size)
    t.map()
    assert t._pack.reservation is res and res.size > t.address - res.address

    def check() -> None:
        _calls(t, v)()
        assert len(P.mappings_over(res.address, res.size)) == 1

    return check


def flow_close(env: Env) -> Callable[[], None]:
    """Allocator then backend.  After an error the harness closes again (``Env.close``),
    as a user would: the second close releases what a refused call kept."""
    env.closed = True
    env.keepers = []
    try:
        env.a.close()
    finally:
        env.backend.close()
    return lambda: None


def flow_fresh_allocator(env: Env) -> Callable[[], None]:
    """A whole life from nothing: backend, first reservation (backing chosen and
    probed), publish, a second publish (membarrier selected), free, close."""
    backend = NativeBackend(env.mode, probe=env.base.probe)
    env.others.append(backend)
    try:
        with execmem.Allocator(backend=backend, pack_size=LARGE) as a:
            ks = publish_keepers(a, [21])
            ks += publish_keepers(a, [22])
            for k in ks:
                assert not k.check()
            ks[0].text.free()
    finally:
        backend.close()
    return lambda: None


def flow_deferred_free(env: Env) -> Callable[[], None]:
    """A text freed while another thread runs it: reclaimed when the call returns."""
    t = env.a.jit_text_alloc(32)
    t.write(0, P.SPIN)  # spins until the 8 bytes at its argument are non-zero, then returns 7
    t.map()
    fn = t.function(ctypes.c_int, ctypes.c_void_p)
    flag = ctypes.c_uint64(0)
    results: list[int] = []
    caller = threading.Thread(target=lambda: results.append(fn(ctypes.addressof(flag))))
    caller.start()
    try:
        deadline = time.monotonic() + 5
        while t._inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.0005)
        t.free()
    finally:
        flag.value = 1
        caller.join(10)
    assert results == [7]
    return lambda: None


def flow_stats(env: Env) -> Callable[[], None]:
    env.a.stats()
    env.a.occupancy()
    env.backend.stats()
    return lambda: None


#: Calls that, in the fork flow, only the forked child makes: their injected faults
#: fire there, and the child reports its counts back to the parent's counters.
CHILD_CALLS = ("mremap", "close")


def _still_open(fds: set[int]) -> list[int]:
    out = []
    for fd in sorted(fds):
        with contextlib.suppress(OSError):
            os.fstat(fd)
            out.append(fd)
    return out


def flow_fork(env: Env) -> Callable[[], None]:
    """``os.fork()`` with texts live: the parent copies each view (mmap, mprotect) and
    unmaps the copy after the fork; the child moves the copies over its views (mremap),
    closes the parent's descriptors and calls what it inherited.  (The bystander
    allocator sits this flow out: its copies would not be this point's.)"""
    others = [b for b in list(_fork._backends) if b not in env.backends()]
    for b in others:
        _fork._backends.discard(b)
    parents = {fd for r in env.backend._fork_regions() for fd in (r.fd, r.rw_fd) if fd >= 0}
    try:
        report, status = P.report_from_child(lambda: {
            "values": [k.fn() for k in env.keepers],
            "fork": env.backend.stats()["fork"],
            "wx": len(_procmaps.wx_violations(env.backend.owned_ranges())),
            "fds": _still_open(parents),
            "faults": [(f.name, f.seen, f.fired) for f in _libc._faults],
        })
    finally:
        for b in others:
            _fork.register(b)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status:#x}"
    for fault, (name, seen, fired) in zip(list(_libc._faults), report["faults"], strict=True):
        if name in CHILD_CALLS:  # the parent made none of these during the flow
            fault.seen += seen
            fault.fired += fired
    views = len(_fork.shared_views(env.backend))

    def check() -> None:
        assert report["values"] == [k.value for k in env.keepers], report
        fork = report["fork"]
        assert fork["views"] == views and fork["moved"] + len(fork["left_shared"]) == views, fork
        assert report["wx"] == 0 and report["fds"] == [], report

    return check


def flow_probe(env: Env) -> Callable[[], None]:
    """The membarrier probe from scratch (a probe of its own, not the process's): fork
    the machine-code child, wait for it, then choose a remote_cse with the verdict."""
    verdict = _probe.MembarrierProbe(_probe._host_routine).probe_once()
    remote = _sync.RemoteCse(env.backend._sys, _sync.REMOTE_CANDIDATES[env.backend.arch.name], page_size=PAGE,
                             probe=lambda: verdict)
    env.remotes.append(remote)
    remote.run([])

    def check() -> None:
        if verdict.safe:  # membarrier, unless a membarrier call was refused
            assert remote.mechanism in _sync.REMOTE_CANDIDATES[env.backend.arch.name], remote.notes
        else:
            assert remote.mechanism == "mprotect-ipi", remote.notes

    return check


@dataclass(frozen=True)
class FlowSpec:
    name: str
    run: Flow
    warm_sync: bool = True
    keep_empty: int = 1
    pack: int = SMALL
    modes: tuple[str, ...] = ("dual", "mprotect")
    #: False where the flow needs ordinary pages (a hugetlb pack never grows).
    huge_pages: bool = True


FLOWS = [
    FlowSpec("new-pack", flow_new_pack),
    FlowSpec("new-pack-large", flow_new_pack, pack=LARGE),
    FlowSpec("grow", flow_grow, pack=LARGE, huge_pages=False),
    FlowSpec("dedicated", flow_dedicated, pack=LARGE),
    FlowSpec("publish-mapped-cold", flow_publish_mapped, warm_sync=False),
    FlowSpec("publish-mapped-warm", flow_publish_mapped),
    FlowSpec("inplace-mapped", flow_inplace_mapped),
    FlowSpec("inplace-fresh", flow_inplace_fresh),
    FlowSpec("update", flow_update, modes=("dual",)),  # mprotect mode refuses live patches
    FlowSpec("free-neighbour", flow_free_neighbour),
    FlowSpec("retire-reuse", flow_retire_reuse, keep_empty=0),
    FlowSpec("retire-release", flow_retire_release, keep_empty=0),
    FlowSpec("batch", flow_batch),
    FlowSpec("many", flow_many),
    FlowSpec("close", flow_close),
    FlowSpec("fresh-allocator", flow_fresh_allocator),
    FlowSpec("deferred-free", flow_deferred_free),
    FlowSpec("stats", flow_stats),
    FlowSpec("fork", flow_fork),
    FlowSpec("probe", flow_probe, modes=("dual",)),  # the backend's mode plays no part
]


# --- one injection point --------------------------------------------------------------------


@dataclass
class Outcome:
    calls: Counter[str]
    fired: int = 0
    error: ExecmemError | None = None


def usable(a: execmem.Allocator, value: int) -> None:
    t = a.jit_text_alloc(16)
    t.write(0, P.const(value))
    t.map()
    assert t.function(ctypes.c_int)() == value
    t.free()


def run_point(
    spec: FlowSpec,
    mode: str,
    base: Base,
    bystander: tuple[execmem.Allocator, list[Keeper]],
    fault: tuple[str, int, int] | None,
) -> Outcome:
    where = f"{spec.name}/{mode}/{base.name} fault={fault}"
    by_alloc, by_keepers = bystander
    assert isinstance(by_alloc.backend, NativeBackend)
    # What is already mapped is not this point's: the bystander's packs, and whatever
    # earlier tests in the process left to their (unclosed) allocators.
    ignore = by_alloc.backend.owned_ranges() + gate_ranges() + [
        (v.start, v.end - v.start) for v in _procmaps.read_maps() if "execmem" in v.path
    ]
    gc.collect()  # callables of earlier points give their stubs back
    _gates.prepare(16)  # so that no point's flow publishes stubs of its own
    fds_before = open_fds()
    tracer = Tracer(allow_wx=False)
    # stats() reads /proc/self/smaps for its large-page report (5 ms a time); the
    # points do not look at that report, so it is skipped here.
    no_smaps = pytest.MonkeyPatch.context()
    with no_smaps as mp, tracer, base.active():
        mp.setattr(_procmaps, "smaps_totals", lambda ranges, pid="self": {"vmas": 0})
        env = Env(mode, base, warm_sync=spec.warm_sync, keep_empty=spec.keep_empty, pack=spec.pack,
                  huge_pages=spec.huge_pages)
        try:
            outcome = Outcome(Counter())
            check: Callable[[], None] | None = None
            with contextlib.ExitStack() as stack:
                injected = stack.enter_context(_libc.inject(fault[0], fault[1], after=fault[2], times=1)) if fault else None
                # Counters that never fire, behind the base conditions' faults: they see
                # exactly the calls an injected fault could fail.
                counters = {n: stack.enter_context(_libc.inject(n, 0, after=1 << 60)) for n in ERRNOS}
                try:
                    check = spec.run(env)
                except ExecmemError as exc:
                    outcome.error = exc
            outcome.calls = Counter({n: c.seen for n, c in counters.items() if c.seen})
            outcome.fired = injected.fired if injected is not None else 0
            if outcome.error is not None:
                assert fault is not None and outcome.fired, f"{where}: error without a fault: {outcome.error!r}"
                message = str(outcome.error)
                assert fault[0] in message or "[injected]" in message, f"{where}: unclear error {message!r}"
            else:
                assert check is not None
                check()
            # W^X at every moment, as seen at each call and now.
            assert tracer.violations == [], (where, tracer.violations)
            for b in env.backends():
                assert _procmaps.wx_violations(b.owned_ranges()) == [], where
            # Nothing is mapped that a backend does not know about (and will release).
            owned = env.owned_pages()
            assert tracer.pages <= owned, f"{where}: untracked mappings at pages {sorted(tracer.pages - owned)[:4]}"
            for k in env.keepers + by_keepers:
                problem = k.check()
                assert not problem, f"{where}: {problem}"
            if not env.closed:
                problems = audit_allocator(env.a)
                assert problems == [], (where, problems)
                usable(env.a, 77)
            else:
                with NativeBackend(mode, probe=base.probe) as b, execmem.Allocator(backend=b, pack_size=1 << 16) as a2:
                    usable(a2, 78)
        finally:
            env.close()
    where_after = f"{where} (after close)"
    left = tracer.pages - gate_pages()  # the call gates grow and stay for the process
    assert left == set(), f"{where_after}: still mapped by execmem: {len(left)} pages"
    assert tracer.fds == set(), f"{where_after}: fds still open: {tracer.fds}"
    assert execmem_vmas(tracer.touched, ignore) == [], where_after
    assert open_fds() == fds_before, where_after
    return outcome


@dataclass
class Tally:
    points: int = 0
    errors: int = 0
    fallbacks: int = 0
    by_call: Counter[str] = field(default_factory=Counter)


TALLY = Tally()


def enumerate_points(spec: FlowSpec, mode: str, base: Base, bystander: Any) -> Tally:
    """Count the flow's calls, then fail each (name, errno, k) in turn."""
    tally = Tally()
    counts = run_point(spec, mode, base, bystander, None).calls
    for name in sorted(counts):
        for err in ERRNOS.get(name, (errno.EINVAL,)):
            k = 0
            while True:
                # The trims of an over-sized reservation depend on where the kernel put
                # it (0, 1 or 2 munmaps): a point that this run did not reach is tried
                # again, and the enumeration goes on while points are reached.
                for _attempt in range(ADDRESS_RETRIES if name == "munmap" else 1):
                    out = run_point(spec, mode, base, bystander, (name, err, k))
                    if out.fired:
                        break
                if not out.fired:
                    assert k >= counts[name] or name == "munmap", (
                        f"{spec.name}/{mode}/{base.name}: {name} #{k} never reached ({counts})"
                    )
                    break
                k += 1
                tally.points += 1
                tally.by_call[name] += 1
                if out.error is None:
                    tally.fallbacks += 1
                else:
                    tally.errors += 1
    TALLY.points += tally.points
    TALLY.errors += tally.errors
    TALLY.fallbacks += tally.fallbacks
    TALLY.by_call.update(tally.by_call)
    print(f"\n{spec.name}/{mode}/{base.name}: calls {dict(counts)}; {tally.points} points, "
          f"{tally.errors} errors, {tally.fallbacks} fallbacks")
    return tally


def _cases() -> list[Any]:
    cases = []
    for spec in FLOWS:
        for mode in spec.modes:
            cases.append(pytest.param(spec, mode, BASES["normal"], id=f"{spec.name}-{mode}"))
    return cases


@pytest.mark.parametrize(("spec", "mode", "base"), _cases())
def test_every_injection_point(spec: FlowSpec, mode: str, base: Base, bystander: Any) -> None:
    enumerate_points(spec, mode, base, bystander)


#: Flows whose calls change under the base conditions: reservations (backing) and the
#: remote_cse mechanism.
_BASE_FLOWS = ("new-pack-large", "publish-mapped-cold", "fresh-allocator", "retire-release", "close")


def _membarrier_only() -> bool:
    """True where remote_cse has no mechanism but membarrier: on arm64 an mprotect
    shootdown is a broadcast TLBI that interrupts no one, so without membarrier a
    multi-threaded publish is a clear error (test_backend_fallbacks), not a fallback."""
    with NativeBackend(probe=SAFE) as b:
        return all(c.startswith("membarrier") for c in b._synchronizer().remote._candidates)


_NO_MEMBARRIER = ("no-membarrier", "seccomp-probe")
_NO_FALLBACK = pytest.mark.skip(reason=f"{P.HOST.name} has no remote_cse without membarrier")


def _base_cases() -> list[Any]:
    cases = []
    only = _membarrier_only()
    for spec in FLOWS:
        if spec.name not in _BASE_FLOWS:
            continue
        for name, base in BASES.items():
            if name == "normal":
                continue
            for mode in spec.modes:
                if mode == "mprotect" and "memfd" in name:
                    continue  # no shared-memory backing in mprotect mode
                marks = [_NO_FALLBACK] if only and name in _NO_MEMBARRIER else []
                cases.append(pytest.param(spec, mode, base, id=f"{spec.name}-{mode}-{name}", marks=marks))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "mode", "base"), _base_cases())
def test_every_injection_point_under_base_conditions(spec: FlowSpec, mode: str, base: Base, bystander: Any) -> None:
    enumerate_points(spec, mode, base, bystander)


def test_base_conditions_take_the_documented_fallbacks(bystander: Any) -> None:
    """Each base condition leads where the documentation says."""
    expected = {
        "normal": ("memfd", "membarrier-sync-core"),
        "no-memfd": ("shm", "membarrier-sync-core"),
        "no-memfd-noexec-shm": ("tmpfile", "membarrier-sync-core"),
        "no-membarrier": ("memfd", "mprotect-ipi"),
        "seccomp-probe": ("memfd", "mprotect-ipi"),
    }
    for name, base in BASES.items():
        if name in _NO_MEMBARRIER and _membarrier_only():
            with base.active(), pytest.raises(ExecmemError, match="no way to make other threads"):
                Env("dual", base, warm_sync=True)
            continue
        with base.active():
            env = Env("dual", base, warm_sync=True)
            try:
                st: dict[str, Any] = dict(env.backend.stats())
                assert (st["backing"], st["sync"]["remote_cse"]) == expected[name], (name, st["backing_detail"], st["sync"])
                for k in env.keepers:
                    assert not k.check()
            finally:
                env.close()


def test_stats_work_while_every_call_fails(bystander: Any) -> None:
    """stats()/occupancy() make no system call: they answer even when every call fails."""
    env = Env("dual", BASES["normal"])
    try:
        with contextlib.ExitStack() as stack:
            faults = [stack.enter_context(_libc.inject(name, errno.EIO)) for name in ERRNOS]
            st: dict[str, Any] = env.a.stats()
            env.a.occupancy()
            assert st["texts"]["LIVE"] == 3
            for k in env.keepers:
                assert not k.check()  # calling needs no system call either
        assert sum(f.fired for f in faults) == 0
    finally:
        env.close()


def test_report_injection_points() -> None:
    """Runs last in this module: the total, printed for docs/reliability.md."""
    if TALLY.points == 0:
        pytest.skip("run with the whole module to see the total")
    print(f"\ninjection points: {TALLY.points} ({TALLY.errors} clear errors, {TALLY.fallbacks} fallbacks); "
          f"by call: {dict(sorted(TALLY.by_call.items()))}")
    assert TALLY.points >= 300
