"""Printing and drawing a schedule's per-CPU event trace.

``format_trace`` gives a text table with one column per CPU (a step appears in the
column of the CPU that took it); ``timeline_svg`` draws the same trace as an SVG
picture with one lane per CPU and one box per step, its whole description wrapped
inside.  Both single out the *culprit* (:func:`culprit`): the first step that used
superseded data - an instruction fetched after a newer write changed its bytes, a
store through a replaced translation - or, without one, the first fault that ended
a CPU.  Faults the kernel or the program handled and retried are drawn as the
harmless events they are, so a counterexample can be read at a glance.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence

from execmem.emu._state import STALE, Step

_COLORS = {
    "exec": ("#eef3fb", "#4a6fa5"),
    "store": ("#dceefd", "#1f77b4"),
    "fault": ("#fde0dd", "#c0392b"),
    "irq": ("#fff4d6", "#b7950b"),
    "host": ("#eaf7ea", "#2e8b57"),
}
#: A fault that did not end its CPU: grey, like any other event.
_HANDLED = ("#f2f2f2", "#999999")
_CULPRIT = ("#ffd0cc", "#a00000")
#: Details of faults after which the CPU went on (``_semantics.Model.retry``/``fault``).
_GOES_ON = ("is retried", "executed again", "enter handler")
_WRAP = 24  # characters per line inside a box (150 px of 10 px monospace)


def fatal(step: Step) -> bool:
    """A fault that ended its CPU (not one handled, or fixed up and retried)."""
    return step.kind == "fault" and not any(mark in step.detail for mark in _GOES_ON)


def culprit(steps: Sequence[Step]) -> int | None:
    """Index of the step that made the outcome what it is: the first that used
    superseded data (:data:`~execmem.emu._state.STALE`), else the first fatal fault."""
    stale = next((n for n, step in enumerate(steps) if STALE in step.detail), None)
    return stale if stale is not None else next((n for n, step in enumerate(steps) if fatal(step)), None)


def describe(step: Step) -> str:
    where = f"{step.pc:#x} " if step.pc else ""
    text = f"{where}{step.text}"
    if step.detail:
        text += f"  [{step.detail}]"
    if step.kind == "fault":
        text = "FAULT " + text
    return text


def format_trace(steps: Sequence[Step], cpus: int, *, width: int = 44, names: Sequence[str] | None = None) -> str:
    """One row per step, one column per CPU; the culprit's number is starred."""
    labels = list(names) if names else [f"CPU{c}" for c in range(cpus)]
    header = " #   " + " | ".join(f"{label:<{width}}" for label in labels)
    lines = [header, "-" * len(header)]
    blamed = culprit(steps)
    for n, step in enumerate(steps, 1):
        wrapped = textwrap.wrap(describe(step), width) or [""]
        for k, part in enumerate(wrapped):
            cells = [f"{part if c == step.cpu else '':<{width}}" for c in range(cpus)]
            prefix = (f"{n:>3}* " if n - 1 == blamed else f"{n:>3}  ") if k == 0 else "     "
            lines.append((prefix + " | ".join(cells)).rstrip())
    if blamed is not None:
        lines.append(f"* the culprit: step {blamed + 1}")
    return "\n".join(lines)


def timeline_svg(
    steps: Sequence[Step],
    cpus: int,
    *,
    title: str = "",
    caption: str = "",
    names: Sequence[str] | None = None,
    per_row: int = 12,
) -> str:
    """An SVG timeline: one lane per CPU, time flowing left to right, wrapped into
    blocks of ``per_row`` steps (each block repeats the lanes).  A box grows to hold
    its whole description; a lane is as tall as its tallest box in the block.
    ``caption`` (why the outcome is what it is) is wrapped under the title."""
    labels = list(names) if names else [f"CPU{c}" for c in range(cpus)]
    texts = [textwrap.wrap(describe(step), _WRAP) or [""] for step in steps]
    blamed = culprit(steps)
    box_w, gap, line_h = 150, 8, 12
    left = 16 + 8 * max(len(label) for label in labels)
    blocks = max(1, -(-len(steps) // per_row))
    width = left + min(len(steps), per_row) * (box_w + gap) + 16
    caption_lines = textwrap.wrap(caption, max(40, (width - 20) // 6))
    top = (44 if title else 16) + 14 * len(caption_lines)
    # Box height per step; lane heights and tops per block.
    heights = [max(46, 10 + line_h * len(lines)) for lines in texts]
    lane_h = [[46] * cpus for _ in range(blocks)]
    for n, step in enumerate(steps):
        b = n // per_row
        lane_h[b][step.cpu] = max(lane_h[b][step.cpu], heights[n])
    lane_y: list[list[int]] = []
    y = top
    for b in range(blocks):
        rows = []
        for c in range(cpus):
            rows.append(y)
            y += lane_h[b][c] + 16
        lane_y.append(rows)
        y += 20  # between blocks
    height = y + 16
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="10">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="10" y="24" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    for i, line in enumerate(caption_lines):
        out.append(f'<text x="10" y="{(40 if title else 12) + 14 * i}" font-size="11">{html.escape(line)}</text>')
    for b in range(blocks):
        if b:
            line_y = lane_y[b][0] - 14
            out.append(f'<line x1="8" y1="{line_y}" x2="{width - 8}" y2="{line_y}" stroke="#ddd" stroke-dasharray="4 4"/>')
        for c in range(cpus):
            mid = lane_y[b][c] + 23
            out.append(f'<line x1="{left - 5}" y1="{mid}" x2="{width - 10}" y2="{mid}" stroke="#ccc"/>')
            out.append(f'<text x="8" y="{mid + 4}" font-size="12" font-weight="bold">{html.escape(labels[c])}</text>')
    for n, step in enumerate(steps):
        b, k = divmod(n, per_row)
        x = left + k * (box_w + gap)
        y = lane_y[b][step.cpu]
        if n == blamed:
            (fill, stroke), stroke_w = _CULPRIT, 3
        elif step.kind == "fault" and not fatal(step):
            (fill, stroke), stroke_w = _HANDLED, 1
        else:
            (fill, stroke), stroke_w = _COLORS.get(step.kind, _COLORS["exec"]), 1
        out.append(f'<g><title>{html.escape(describe(step))}</title>')
        out.append(
            f'<rect x="{x}" y="{y}" width="{box_w}" height="{heights[n]}" rx="4" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{stroke_w}"/>'
        )
        for i, line in enumerate(texts[n]):
            out.append(f'<text x="{x + 4}" y="{y + 13 + line_h * i}">{html.escape(line)}</text>')
        number = f"{n + 1}: the culprit" if n == blamed else f"{n + 1}"
        weight = ' font-weight="bold" fill="#a00000"' if n == blamed else ' fill="#888"'
        out.append(f'<text x="{x + box_w - 4}" y="{y + heights[n] + 11}" text-anchor="end"{weight}>{number}</text></g>')
    out.append("</svg>")
    return "\n".join(out)
