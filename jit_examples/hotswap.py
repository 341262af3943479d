"""hotswap: replace a function while other threads keep calling it.

    python -m execmem.examples.hotswap --workers 4 --versions 2000

Worker threads call ``dispatch(cell)``, a JIT'd trampoline that loads the current
function pointer from ``cell`` and jumps to it.  The main thread compiles version
k (a function returning k), publishes it, swaps the pointer with one aligned 8-byte
store, waits for a grace period (every worker has finished a call that started
after the swap, as RCU does), then frees version k-1.  execmem refills freed code
with traps and quarantines its address until every thread has been serialized, so
a missing grace period would show up as a trap, not as silently wrong code.

Every call must return the number of a version that was published; the run
reports how many calls each version served.

``--machine`` runs the same protocol on the modeled arm64 machine (two CPUs) and
explores its interleavings.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import execmem
from execmem import _progress

_DISPATCH = {"x86_64": "mov rax, qword ptr [rdi]\njmp rax", "arm64": "ldr x16, [x0]\nbr x16"}
_VERSION = {"x86_64": "mov eax, {k}\nret", "arm64": "mov x0, #{k}\nret"}


def _publish(allocator: execmem.Allocator, source: str, arch: str) -> execmem.JitText:
    size = len(execmem.asm(source, arch, 0))
    t = allocator.jit_text_alloc(size)
    t.write(0, execmem.asm(source, arch, t.address))
    t.map()
    return t


def run(
    workers: int = 4,
    versions: int = 2000,
    *,
    allocator: execmem.Allocator | None = None,
    step: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Swap ``versions`` times under ``workers`` calling threads; return the figures.
    ``step`` is told each swap (a progress line)."""
    arch = execmem.arch.host().name
    a = allocator or execmem.Allocator()
    dispatch_text = _publish(a, _DISPATCH[arch], arch)
    dispatch = dispatch_text.function(ctypes.c_int64, ctypes.c_void_p)
    cell = ctypes.c_uint64(0)
    current = _publish(a, _VERSION[arch].format(k=1), arch)
    cell.value = current.address
    published = {1}
    calls = [0] * workers
    served: list[Counter[int]] = [Counter() for _ in range(workers)]
    bad: list[tuple[int, int]] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        address = ctypes.addressof(cell)
        while not stop.is_set():
            value = dispatch(address)
            served[i][value] += 1
            if value not in published:
                bad.append((i, value))
            calls[i] += 1  # a quiescent state: this call is over

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    try:
        for k in range(2, versions + 1):
            new = _publish(a, _VERSION[arch].format(k=k), arch)
            published.add(k)
            cell.value = new.address  # one aligned 8-byte store: callers see old or new
            before = list(calls)
            # Grace period: each worker completed a call that began after the swap.
            while any(calls[i] <= before[i] + 1 for i in range(workers)) and all(t.is_alive() for t in threads):
                time.sleep(0)
            current.free()  # trap refill + quarantine until the next epoch
            current = new
            if step is not None:
                step(f"version {k} published, version {k - 1} freed")
    finally:
        stop.set()
        for th in threads:
            th.join()
    seconds = time.perf_counter() - started
    total = Counter[int]()
    for c in served:
        total.update(c)
    stats = a.stats()
    current.free()
    dispatch_text.free()
    if allocator is None:
        a.close()
    return {
        "calls": sum(calls),
        "versions": versions,
        "versions_seen": len(total),
        "bad": bad,
        "seconds": seconds,
        "packs": len(stats["packs"]),
    }


def explore_on_machine(
    *, runs: int = 300, seed: int = 0, progress: Callable[[int], None] | None = None
) -> tuple[set[int], int, int]:
    """The protocol on a modeled arm64 machine: CPU1 calls through the cell twice
    while CPU0 publishes version 2, swaps the cell and, after CPU1's quiescent
    state, frees version 1.  The program is too big to enumerate, so the explorer
    runs ``runs`` seeded random schedules.  Returns (results CPU1 saw, schedules
    run, distinct final states); -1 among the results would mean a fault.
    ``progress`` is told the number of schedules run so far."""
    from execmem.emu import Machine, MachineState

    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=0x1000)
    dispatch = _publish(a, _DISPATCH["arm64"], "arm64")
    v1 = _publish(a, _VERSION["arm64"].format(k=1), "arm64")
    cell, quiescent = m.alloc(8), m.alloc(8)
    host = m.host()
    host.store(cell, v1.address, release=True)
    m.checkpoint()  # set-up done: explore only the swap and the calls
    m.load(1, "ldar x0, [x3]\ncbz x0, .-4\nmov x0, x3\nblr x5\nmov x20, x0\nmov x6, #1\nstlr x6, [x4]\n"
              "mov x0, x3\nblr x5\nmov x21, x0\nmov x6, #2\nstlr x6, [x4]")
    m.set_reg(1, "x3", cell)
    m.set_reg(1, "x4", quiescent)
    m.set_reg(1, "x5", dispatch.address)
    v2 = _publish(a, _VERSION["arm64"].format(k=2), "arm64")
    host.store(cell, v2.address, release=True, note="swap to version 2")
    host.await_value(quiescent, 2, note="grace period")
    v1.free()

    def observe(st: MachineState) -> tuple[int, int, bool]:
        return (m.reg(st, 1, "x20"), m.reg(st, 1, "x21"), bool(st.cpus[1].faults))

    result = m.explore(observe, exhaustive_search=False, runs=runs, seed=seed, progress=progress)
    seen = {r for obs in result.finals for r in obs[:2]}  # type: ignore[index]
    if any(obs[2] for obs in result.finals):  # type: ignore[index]
        seen.add(-1)
    return seen, result.schedules, len(result.finals)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m execmem.examples.hotswap", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--versions", type=int, default=2000)
    parser.add_argument("--machine", action="store_true", help="explore the protocol on the modeled arm64 machine")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    args = parser.parse_args(argv)
    if args.quiet:
        _progress.set_quiet(True)
    if args.machine:
        runs = 300
        with _progress.Progress(runs) as progress:
            seen, schedules, finals = explore_on_machine(
                runs=runs, progress=lambda _done: progress.step("random schedules on the modeled machine")
            )
        print(f"modeled arm64, 2 CPUs: {schedules} random schedules, {finals} distinct final states; "
              f"results seen by the caller: {sorted(seen)} (1 and 2 are the published versions)")
        return 0 if seen <= {1, 2} else 1
    with _progress.Progress(args.versions - 1) as progress:
        figures = run(args.workers, args.versions, step=progress.step)
    print(f"{figures['calls']} calls from {args.workers} threads across {figures['versions']} published versions "
          f"({figures['versions_seen']} observed) in {figures['seconds']:.2f}s; "
          f"wrong results: {len(figures['bad'])}; packs in use at the end: {figures['packs']}")  # type: ignore[arg-type]
    return 1 if figures["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
