"""Eight threads hammer ONE native allocator while a sampler watches ``/proc/self/maps``.

Each worker runs a fixed number of seeded random operations: allocate (16 bytes to
12 KiB), write, ``map``, ``map_rw_inplace`` + ``write`` + ``finalize``,
``execmem.publish([...])``, ``with allocator.batch():``, live ``update`` of the
instruction at offset 0 that selects the returned value (``programs.Switch``: x86-64
``mov eax, imm32``, arm64 a ``B``; dual mode only: mprotect mode refuses live patches),
``free`` (published or not), and calls, to its own texts and to other threads' texts
found in a shared registry.  The owner may free a text while another thread is
calling it (some texts spin a few microseconds to widen that window): the call must
still return, and the allocator must defer the refill to the last call.

Every call must return a value that was published for that text (an owner calling its
own text right after an update must see exactly the new value); trap filler, a
reused address or torn code would crash or return something else.  Meanwhile a
sampler thread rereads ``/proc/self/maps`` in a loop (and a child process rereads
``/proc/<pid>/maps``, free of the GIL) and records every writable and executable VMA
over a range the backend owns (or ever owned) or named execmem.

At the end: no W+X observation, no wrong result, no exception in any thread, the
allocator's invariants (``audit_allocator`` from the fault-injection tests) hold with
texts live and after freeing them, and after ``close`` nothing execmem stays mapped.

In mprotect mode a write makes its page briefly non-executable, so texts that share
a page with a text another thread runs must not be written or freed (the documented
limit of that mode, see ``execmem._allocator``): there every allocation is page
aligned.  ``pytest -s`` prints one summary line per run.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import programs as P
import pytest
from audit import audit_allocator, gate_ranges

import execmem
from execmem import JitFunction, JitText, TextState, UnsafePatchError, UseAfterFreeError
from execmem.native import NativeBackend, _procmaps

pytestmark = P.needs_programs

PAGE = 4096
SPIN_LOOPS = 30_000  # iterations of the spinning variant (some 10 microseconds)
VERSIONS = 6  # values a text's live updates cycle through (each a unique serial)


@dataclass
class Entry:
    text: JitText
    fn: JitFunction
    switch: P.Switch
    index: int = 0  # of the value in switch.values the text returns
    #: Every value ever published for the text; a value is added before its store.
    values: set[int] = field(default_factory=set)

    @property
    def current(self) -> int:
        return self.switch.values[self.index]

    def next_patch(self) -> tuple[int, bytes]:
        """The next version: its index and the bytes ``update(0, ...)`` stores for it
        (its value is in ``values`` from now on)."""
        index = (self.index + 1) % len(self.switch.values)
        self.values.add(self.switch.values[index])
        return index, self.switch.patch(index, self.text.address)


@dataclass
class Shared:
    allocator: execmem.Allocator
    align: int
    patchable: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    registry: dict[int, Entry] = field(default_factory=dict)  # serial -> entry
    wrong: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def size_for(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.75:
        return rng.randint(16, 256)
    return rng.randint(257, 4096) if r < 0.92 else rng.randint(4097, 12288)


class Worker:
    def __init__(self, shared: Shared, k: int, ops: int, seed: int) -> None:
        self.s = shared
        self.k = k
        self.ops = ops
        self.rng = random.Random(seed * 1000 + k)
        self.mine: list[int] = []  # serials of this thread's LIVE texts
        self.serial = k << 24
        self.counts: Counter[str] = Counter()  # per thread: += on a shared Counter can lose counts

    def next_value(self) -> int:
        self.serial += 1
        return self.serial

    def fresh(self, n: int) -> list[tuple[JitText, P.Switch]]:
        out = []
        for _ in range(n):
            size = size_for(self.rng)
            spin = self.rng.random() < 0.3
            switch = P.Switch(tuple(self.next_value() for _ in range(VERSIONS)), SPIN_LOOPS if spin else 0)
            t = self.s.allocator.jit_text_alloc(max(size, len(switch.code(0))), self.s.align)
            t.write(0, switch.code(t.address))
            out.append((t, switch))
        return out

    def register(self, made: list[tuple[JitText, P.Switch]]) -> None:
        for t, switch in made:
            assert t.state is TextState.LIVE
            entry = Entry(t, t.function(ctypes.c_int), switch, values={switch.values[0]})
            with self.s.lock:
                self.s.registry[entry.current] = entry
            self.mine.append(entry.current)
            self.check(entry, own=True)

    def check(self, entry: Entry, *, own: bool) -> None:
        got = entry.fn()
        self.counts["calls_checked"] += 1
        if (got != entry.current) if own else (got not in entry.values):
            self.s.wrong.append(f"thread {self.k}: {entry.text!r} returned {got}, published {sorted(entry.values)}")

    def pick_own(self) -> Entry:
        with self.s.lock:
            return self.s.registry[self.mine[self.rng.randrange(len(self.mine))]]

    def step(self) -> None:
        rng, s, c = self.rng, self.s, self.counts
        r = rng.random()
        if r < 0.15 and self.mine:
            self.check(self.pick_own(), own=True)
        elif r < 0.35:
            # A few entries picked at once: their owners may free them before or
            # while they are called.
            with s.lock:
                serials = list(s.registry)
                picked = [s.registry[rng.choice(serials)] for _ in range(3)] if serials else []
            for entry in picked:
                try:
                    self.check(entry, own=False)
                    c["foreign_calls"] += 1
                except UseAfterFreeError:
                    c["calls_after_free_refused"] += 1
        elif r < 0.45 and self.mine and s.patchable:
            entry = self.pick_own()
            index, patch_bytes = entry.next_patch()
            entry.text.update(0, patch_bytes)
            entry.index = index
            c["updates"] += 1
            self.check(entry, own=True)
        elif r < 0.48:
            self.fresh(1)[0][0].free()
            c["unpublished_frees"] += 1
        elif r < 0.75 and len(self.mine) < 40:
            kind = rng.random()
            made = self.fresh(1 if kind < 0.5 else rng.randint(2, 6))
            if kind < 0.35:
                made[0][0].map()
            elif kind < 0.5:
                t = made[0][0]
                t.map_rw_inplace()
                t.write(0, t.read()[:16])
                t.finalize()
                c["inplace"] += 1
            elif kind < 0.75:
                execmem.publish([t for t, _ in made])
                c["publish_lists"] += 1
            else:
                patch = self.pick_own() if self.mine and s.patchable and rng.random() < 0.5 else None
                with s.allocator.batch():
                    for t, _ in made:
                        t.map()
                    if patch is not None:
                        index, patch_bytes = patch.next_patch()
                        patch.text.update(0, patch_bytes)
                if patch is not None:
                    patch.index = index
                    c["updates"] += 1
                    self.check(patch, own=True)
                c["batch_blocks"] += 1
            c["published"] += len(made)
            self.register(made)
        elif self.mine:
            serial = self.mine.pop(rng.randrange(len(self.mine)))
            with s.lock:
                entry = s.registry.pop(serial)
            entry.text.free()  # other threads may be calling it right now
            c["frees"] += 1

    def __call__(self) -> None:
        try:
            for _ in range(self.ops):
                self.step()
                self.counts["ops"] += 1
        except BaseException:
            self.s.errors.append(f"thread {self.k}:\n{traceback.format_exc()}")


class Sampler(threading.Thread):
    """Rereads ``/proc/self/maps`` until stopped; records W+X VMAs that are execmem's."""

    def __init__(self, backend: NativeBackend) -> None:
        super().__init__(name="maps-sampler", daemon=True)
        self.backend = backend
        self.stop = threading.Event()
        self.first = threading.Event()  # set after the first sample
        self.samples = 0
        self.touched: set[tuple[int, int]] = set()
        self.wx: list[str] = []
        self.wx_elsewhere: list[str] = []  # W+X in the process but not execmem's (reported)

    def run(self) -> None:
        while not self.stop.is_set():
            self.touched.update(self.backend.owned_ranges())
            vmas = _procmaps.read_maps()
            ranges = sorted(self.touched)
            for v in _procmaps.wx_violations(None, vmas):
                ours = "execmem" in v.path or any(v.overlaps(a, n) for a, n in ranges)
                (self.wx if ours else self.wx_elsewhere).append(f"sample {self.samples}: {v}")
            self.samples += 1
            self.first.set()
            time.sleep(0)


#: A second sampler in a child process: it reads the test process's maps without
#: waiting for the GIL, so it samples while the workers are inside system calls.
CHILD_SAMPLER = """
import json, select, sys
path, samples, wx = f"/proc/{sys.argv[1]}/maps", 0, []
while not select.select([sys.stdin], [], [], 0)[0]:
    with open(path) as f:
        text = f.read()
    samples += 1
    wx += [line for line in text.splitlines() if line.split()[1][1:3] == "wx"]
    if samples == 1:
        print("ready", flush=True)
print(json.dumps({"samples": samples, "wx": wx}))
"""


class ChildSampler:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_SAMPLER, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.samples = 0
        self.wx: list[_procmaps.Vma] = []
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"

    def finish(self) -> None:
        out, _ = self.proc.communicate("", timeout=30)  # EOF on stdin stops it
        assert self.proc.returncode == 0, out
        report = json.loads(out)
        self.samples = report["samples"]
        self.wx = _procmaps.parse_maps("\n".join(report["wx"]))


def execmem_vmas(ranges: set[tuple[int, int]]) -> set[_procmaps.Vma]:
    """VMAs named execmem or over a range it owned (bar anonymous read+write memory,
    which Python's allocators may have reused after the release)."""
    out = set()
    for v in _procmaps.read_maps():
        named = "execmem" in v.path
        if named or (any(v.overlaps(a, n) for a, n in ranges) and (v.perms, v.path) != ("rw-p", "")):
            out.add(v)
    return out


def run_concurrency(mode: str, threads: int, ops: int, seed: int) -> None:
    before = execmem_vmas(set())
    backend = NativeBackend(mode)
    a = execmem.Allocator(backend=backend)
    s = Shared(a, align=16 if mode == "dual" else PAGE, patchable=backend.concurrent_patch_safe)
    assert s.patchable == (mode == "dual")
    sampler = Sampler(backend)
    bodies = [Worker(s, k, ops, seed) for k in range(threads)]
    workers = [threading.Thread(target=body, name=f"worker-{k}") for k, body in enumerate(bodies)]
    child = ChildSampler()
    started = time.perf_counter()
    sampler.start()
    sampler.first.wait()
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sampler.stop.set()
        sampler.join()
        child.finish()
    elapsed = time.perf_counter() - started
    touched = sorted(sampler.touched | set(backend.owned_ranges()))
    child_wx = [v for v in child.wx if "execmem" in v.path or any(v.overlaps(p, n) for p, n in touched)]
    assert not s.errors, "\n".join(s.errors)
    assert not s.wrong, s.wrong[:10]
    assert not sampler.wx, sampler.wx[:10]
    assert not child_wx, child_wx[:10]
    assert sampler.samples >= 2 and child.samples >= 2, (sampler.samples, child.samples)
    c: Counter[str] = sum((body.counts for body in bodies), Counter())
    assert c["ops"] == threads * ops
    problems = audit_allocator(a)
    assert not problems, problems
    if not s.patchable:
        entry = next(iter(s.registry.values()))
        with pytest.raises(UnsafePatchError):
            entry.text.update(0, entry.switch.patch(1, entry.text.address))
    for entry in s.registry.values():
        assert entry.fn() == entry.current
        entry.text.free()
    events = dict(a.stats()["events"])  # type: ignore[call-overload]
    for name in ("deferred_free_errors", "release_errors", "trim_errors"):
        assert events.get(name, 0) == 0, events
    problems = audit_allocator(a)
    assert not problems, problems
    a.close()
    gates = gate_ranges()  # the process's call gates: not this allocator's
    left = {v for v in execmem_vmas(sampler.touched | set(backend.owned_ranges())) - before
            if not any(v.overlaps(a, n) for a, n in gates)}
    assert not left, left
    print(
        f"\nconcurrency {mode}: {threads} threads x {ops} ops = {c['ops']} ops in {elapsed:.2f} s; "
        f"calls checked {c['calls_checked']} (foreign {c['foreign_calls']}, refused after free "
        f"{c['calls_after_free_refused']}); published {c['published']}, updates {c['updates']}, "
        f"frees {c['frees'] + c['unpublished_frees']} (deferred behind a call {events.get('frees_deferred', 0)}); "
        f"maps samples {sampler.samples} (thread) + {child.samples} (child process); "
        f"W+X seen {len(sampler.wx) + len(child_wx)} (elsewhere in the process "
        f"{len(sampler.wx_elsewhere) + len(child.wx) - len(child_wx)}); wrong results {len(s.wrong)}"
    )


def _ops(native: int) -> int:
    """Operations per thread: a tenth under emulation (QEMU runs some ten times slower,
    ``P.SLOWDOWN``), so the emulated run covers the same flows within CI's time."""
    return max(100, int(native / P.SLOWDOWN))


@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_eight_threads_one_allocator(mode: str) -> None:
    run_concurrency(mode, threads=8, ops=_ops(1500), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_eight_threads_one_allocator_longer(mode: str) -> None:
    run_concurrency(mode, threads=8, ops=_ops(5000), seed=2)
