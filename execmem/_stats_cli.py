"""``execmem stats [--png FILE] [--workload demo|random] [--seed S] [--texts N|all]``:
pack occupancy and the texts by name.

Runs a workload on a native allocator and shows its packs chunk by chunk, from
``Allocator.occupancy()`` (chunk states) and ``Allocator.stats()`` (totals): as a
compact text map and, with ``--png``, as a picture (matplotlib).  Free and
quarantined chunks must hold the architecture's trap instruction; on native packs
that are mapped the map reads them back and marks any chunk that does not (``!``).
Then the texts, in address order, with their names (:func:`text_table`).

:func:`render_occupancy` does the same for any allocator::

    from execmem._stats_cli import render_occupancy
    print(render_occupancy(allocator, "packs.png"))
"""

from __future__ import annotations

import argparse
import ctypes
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, cast

import execmem
from execmem import _lookup
from execmem._errors import ExecmemError
from execmem._plot import check_png, pyplot

LIVE, FREE, QUARANTINED, NOT_TRAP = "live", "free", "quarantined", "not-trap"

#: Text map characters; a character stands for one or more chunks and shows the
#: state of most of them (ties: live, then quarantined).
LEGEND = (
    ("#", "live (allocated to a text)"),
    (".", "free (trap-filled)"),
    ("q", "quarantined (freed; its VA is reused after the next epoch and its trap refill)"),
    ("!", "a free or quarantined chunk that does NOT hold trap bytes, refill not pending (a bug)"),
)
#: Picture colours (RGB) per chunk state; a cell of several chunks blends them.
COLOURS = {
    LIVE: (0.18, 0.55, 0.34),
    FREE: (0.90, 0.90, 0.90),
    QUARANTINED: (0.96, 0.60, 0.13),
    NOT_TRAP: (0.85, 0.10, 0.10),
}
CELLS_PER_LINE = 64
LINES = 12  # at most, per pack
GRID_WIDTH = 256  # chunks per picture line


def _reader(allocator: execmem.Allocator) -> Callable[[int, int], bytes] | None:
    """How to read a mapped pack's bytes back, or None when this backend cannot."""
    from execmem._memory_backend import MemoryBackend
    from execmem.native import NativeBackend

    backend = allocator.backend
    if isinstance(backend, NativeBackend):
        # Mapped packs are readable at their executable address (R-X, or RW for a
        # moment in mprotect mode; both readable).
        return lambda address, size: ctypes.string_at(address, size)
    if isinstance(backend, MemoryBackend):
        return backend.read
    return None  # the modeled machine: memory is per-state, nothing single to read


def chunk_states(allocator: execmem.Allocator) -> list[tuple[dict[str, Any], list[str]]]:
    """Per pack (as ``occupancy()`` describes it): the state of every chunk, with free
    and quarantined chunks of mapped packs checked for trap bytes where readable."""
    read = _reader(allocator)
    trap = allocator.arch.trap_fill
    out = []
    for pack in allocator.occupancy():
        states: list[str] = []
        for state, length in cast(Sequence[tuple[str, int]], pack["runs"]):
            states.extend([state] * length)
        gran = cast(int, pack["granularity"])
        if read is not None and pack["mapped"] and not pack["retired"]:
            image = read(cast(int, pack["address"]), len(states) * gran)
            pattern = trap * (gran // len(trap))
            unfilled = cast(int, pack["unfilled"])  # freed chunks whose refill is pending
            for i, state in enumerate(states):
                if state != LIVE and not unfilled >> i & 1 and image[i * gran : (i + 1) * gran] != pattern:
                    states[i] = NOT_TRAP
        out.append((pack, states))
    return out


_CHAR = {LIVE: "#", FREE: ".", QUARANTINED: "q"}


def _cell(states: Sequence[str]) -> str:
    if NOT_TRAP in states:
        return "!"
    best = max((LIVE, QUARANTINED, FREE), key=states.count)  # max keeps the first of ties
    return _CHAR[best]


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n % 1024 else f"{n // 1024:,} KiB"


def _extent(size: int, capacity: int) -> str:
    """``size``, and what it may grow to in place when that is more."""
    return _kib(size) + (f" (grows in place up to {_kib(capacity)})" if capacity > size else "")


def _flags(pack: dict[str, Any]) -> str:
    flags = ["mapped" if pack["mapped"] else "not mapped"]
    if pack["dedicated"]:
        flags.append("dedicated")
    if pack["retired"]:
        flags.append("retired, waiting for an epoch")
    return ", ".join(flags)


def text_map(allocator: execmem.Allocator, packs: list[tuple[dict[str, Any], list[str]]] | None = None) -> str:
    """The compact text map (see :func:`render_occupancy`)."""
    packs = chunk_states(allocator) if packs is None else packs
    stats = allocator.stats()
    described = {cast(int, p["address"]): p for p in cast(list[dict[str, Any]], stats["packs"])}
    gran = allocator.granularity
    totals = cast(dict[str, int], stats["totals"])
    lines = [
        f"{stats['arch']} {stats['mode']}: {totals['packs']} pack(s), {_extent(totals['reserved_bytes'], totals['capacity_bytes'])}, "
        f"chunks of {gran} B",
        "each character shows the state of most of its chunks:",
        *(f"  {c}  {what}" for c, what in LEGEND),
    ]
    for pack, states in packs:
        address = cast(int, pack["address"])
        # Cells sized so that the used part of the pack fits in at most LINES lines.
        extent = max((i + 1 for i, s in enumerate(states) if s != FREE), default=0)
        per_cell = 1
        while extent > per_cell * CELLS_PER_LINE * LINES:
            per_cell *= 2
        lines.append(
            f"pack {address:#x}  {_extent(len(states) * gran, cast(int, pack['capacity']))}  ({_flags(pack)}); "
            f"one character = {per_cell} chunk(s), {_kib(per_cell * gran)}"
        )
        cells = [_cell(states[i : i + per_cell]) for i in range(0, -(-extent // per_cell) * per_cell, per_cell)]
        rows = ["".join(cells[i : i + CELLS_PER_LINE]) for i in range(0, len(cells), CELLS_PER_LINE)]
        i = 0
        while i < len(rows):
            lines.append(f"  +{i * CELLS_PER_LINE * per_cell * gran:#08x} {rows[i]}")
            same = i + 1
            while same < len(rows) and rows[same] == rows[i]:
                same += 1
            if same - i > 2:  # runs of identical lines are shown once
                lines.append(f"  ... {same - i - 1} more line(s) like this one")
                i = same
            else:
                i += 1
        rest = (len(states) - len(cells) * per_cell) * gran
        if rest > 0:
            lines.append(f"  +{len(cells) * per_cell * gran:#08x} ... {_kib(rest)} free to the end")
        d = described.get(address)
        if d is not None:
            size = cast(int, d["size"]) or 1
            parts = [
                f"{name} {_kib(cast(int, d[key]))} ({100 * cast(int, d[key]) / size:.1f}%)"
                for name, key in (("live", "live_bytes"), ("free", "free_bytes"), ("quarantined", "quarantined_bytes"))
            ]
            bad = states.count(NOT_TRAP)
            check = f"; {bad} chunk(s) NOT trap-filled" if bad else ""
            lines.append("  " + ", ".join(parts) + check)
    texts = stats["texts"]
    epochs = stats["epochs"]
    lines.append(
        "texts: " + ", ".join(f"{k} {v}" for k, v in texts.items())
        + f"; epochs completed {epochs['completed']} (forced {epochs['forced']})"
    )
    return "\n".join(lines)


def text_table(allocator: execmem.Allocator, limit: int | None = None) -> str:
    """The allocator's texts (any state but FREED) in address order: address, size,
    state and name, at most ``limit`` of them (``None``: all)."""
    texts = _lookup.texts_of(allocator)
    shown = texts if limit is None else texts[:limit]
    lines = [f"texts by name ({len(texts)}, in address order):"]
    if texts:
        lines.append(f"  {'address':<18} {'size':>7}  {'state':<8}  name")
    lines += [f"  {t.address:#018x} {t.size:>7}  {t.state.name:<8}  {t.name}" for t in shown]
    if len(shown) < len(texts):
        lines.append(f"  ... {len(texts) - len(shown)} more (--texts all lists them)")
    return "\n".join(lines)


def picture(allocator: execmem.Allocator, path: str, packs: list[tuple[dict[str, Any], list[str]]] | None = None) -> None:
    """A PNG: one panel row per pack, one pixel per chunk, ``GRID_WIDTH`` chunks a line."""
    plt = pyplot("--png")
    from matplotlib.patches import Patch
    packs = chunk_states(allocator) if packs is None else packs
    if not packs:
        raise ExecmemError("the allocator has no packs to draw")
    gran = allocator.granularity
    heights = [max(1, math.ceil(len(states) / GRID_WIDTH)) for _, states in packs]
    fig, axes = plt.subplots(
        len(packs), 1, figsize=(9, 1.2 + sum(0.9 + h / 40 for h in heights)), squeeze=False,
        gridspec_kw={"height_ratios": heights}, constrained_layout=True,
    )
    for ax, (pack, states), height in zip(axes[:, 0], packs, heights, strict=True):
        blank = (1.0, 1.0, 1.0)
        grid = [[COLOURS[states[r * GRID_WIDTH + c]] if r * GRID_WIDTH + c < len(states) else blank
                 for c in range(GRID_WIDTH)] for r in range(height)]
        line_kib = GRID_WIDTH * gran / 1024
        ax.imshow(grid, aspect="auto", interpolation="nearest", extent=(0, line_kib, height * line_kib, 0))
        counts = ", ".join(f"{name} {100 * states.count(key) / len(states):.1f}%" for key, name in
                           ((LIVE, "live"), (FREE, "free"), (QUARANTINED, "quarantined")))
        title = f"pack {cast(int, pack['address']):#x}, {_kib(len(states) * gran)} ({_flags(pack)}): {counts}"
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("line start (KiB)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel(f"offset within the line (KiB); one pixel per chunk, {GRID_WIDTH} chunks a line", fontsize=8)
    names = {LIVE: "live", FREE: "free (traps)", QUARANTINED: "quarantined", NOT_TRAP: "not trap-filled!"}
    fig.legend(
        handles=[Patch(color=COLOURS[k], label=v) for k, v in names.items()],
        loc="outside upper right", ncol=4, fontsize=8, frameon=False,
    )
    stats = allocator.stats()
    fig.suptitle(f"execmem packs: {stats['arch']} {stats['mode']}, chunk {gran} B", fontsize=10, x=0.02, ha="left")
    try:
        fig.savefig(path, dpi=100, format="png")
    except OSError as exc:
        raise ExecmemError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def render_occupancy(allocator: execmem.Allocator, path: str | None = None) -> str:
    """The occupancy of ``allocator``'s packs as a text map (returned); with ``path``,
    also as a PNG picture written there (needs matplotlib)."""
    if not isinstance(allocator, execmem.Allocator):
        raise TypeError(f"expected an execmem.Allocator, not {type(allocator).__name__}")
    if path is not None:
        check_png(path, "--png")
    packs = chunk_states(allocator)
    if path is not None:
        picture(allocator, path, packs)
    return text_map(allocator, packs)


# -- workloads ------------------------------------------------------------------------------


def _publish_some(allocator: execmem.Allocator, sizes: Sequence[int], code: bytes, prefix: str) -> list[execmem.JitText]:
    texts = []
    for k, size in enumerate(sizes):
        text = allocator.jit_text_alloc(size, name=f"{prefix}{k}")
        text.write(0, code[:size])
        texts.append(text)
    execmem.publish(texts)
    return texts


def _free_some(rng: random.Random, live: list[execmem.JitText], fraction: float) -> None:
    for text in rng.sample(live, int(len(live) * fraction)):
        live.remove(text)
        text.free()


def workload(allocator: execmem.Allocator, name: str, seed: int) -> None:
    """``demo``: a few hundred functions published in batches, random subsets freed
    (the last ones still quarantined), and one large text in a dedicated pack.
    ``random``: seeded batches of allocations of 16..4096 bytes and random frees."""
    rng = random.Random(seed)
    ret = execmem.asm("ret", arch=allocator.arch.name)
    code = ret + allocator.arch.trap_bytes(1 << 21)[len(ret) :]

    def sizes(n: int, top: int) -> list[int]:  # log-uniform: many small, a few large
        return [int(math.exp(rng.uniform(math.log(16), math.log(top)))) for _ in range(n)]

    if name == "demo":
        live = _publish_some(allocator, sizes(400, 2048), code, "first_")
        _free_some(rng, live, 0.35)  # quarantined until the next epoch...
        live += _publish_some(allocator, sizes(200, 2048), code, "second_")  # ...which this publish completes
        _publish_some(allocator, [1280 * 1024], code, "big")  # more than half a pack: a dedicated one
        _free_some(rng, live, 0.2)  # quarantined: no epoch since
    elif name == "random":
        live = []
        for round_ in range(12):
            live += _publish_some(allocator, sizes(rng.randint(50, 300), 4096), code, f"round{round_}_")
            _free_some(rng, live, rng.uniform(0.1, 0.6))
    else:
        raise ExecmemError(f"unknown workload {name!r}; choose demo or random")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--png", metavar="FILE", help="also draw the packs into this PNG (matplotlib)")
    parser.add_argument("--workload", choices=("demo", "random"), default="demo", help="what to run first (default: demo)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload (default: 1)")
    parser.add_argument("--mode", choices=("dual", "mprotect", "rwx"), default="dual", help="native mapping mode")
    parser.add_argument(
        "--texts", type=_count, default=20, metavar="N|all", help="list at most N texts by name (default: 20)"
    )


def _count(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of texts or 'all', not {value!r}")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from execmem.native import NativeBackend

    if args.png:
        check_png(args.png, "--png")  # before the workload: a refused picture changes nothing
    with NativeBackend(args.mode) as backend, execmem.Allocator(backend=backend) as allocator:
        workload(allocator, args.workload, args.seed)
        print(f"execmem stats: workload {args.workload}, seed {args.seed}")
        print(render_occupancy(allocator, args.png))
        if args.texts != 0:
            print(text_table(allocator, args.texts))
        if args.png:
            print(f"picture: {args.png}")
    return 0


__all__ = ["LEGEND", "chunk_states", "configure", "render_occupancy", "run", "text_map", "text_table", "workload"]
