"""Printing and drawing a schedule's per-CPU event trace.

``format_trace`` gives a text table with one column per CPU (a step appears in the
column of the CPU that took it); ``timeline_svg`` draws the same trace as an SVG
picture with one lane per CPU, one box per step, faults in red and stores becoming
visible in blue, so a counterexample can be read at a glance.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence

from execmem.emu._state import Step

_COLORS = {
    "exec": ("#eef3fb", "#4a6fa5"),
    "store": ("#dceefd", "#1f77b4"),
    "fault": ("#fde0dd", "#c0392b"),
    "irq": ("#fff4d6", "#b7950b"),
    "host": ("#eaf7ea", "#2e8b57"),
}


def describe(step: Step) -> str:
    where = f"{step.pc:#x} " if step.pc else ""
    text = f"{where}{step.text}"
    if step.detail:
        text += f"  [{step.detail}]"
    if step.kind == "fault":
        text = "FAULT " + text
    return text


def format_trace(steps: Sequence[Step], cpus: int, *, width: int = 44, names: Sequence[str] | None = None) -> str:
    """One row per step, one column per CPU."""
    labels = list(names) if names else [f"CPU{c}" for c in range(cpus)]
    header = " #   " + " | ".join(f"{label:<{width}}" for label in labels)
    lines = [header, "-" * len(header)]
    for n, step in enumerate(steps, 1):
        wrapped = textwrap.wrap(describe(step), width) or [""]
        for k, part in enumerate(wrapped):
            cells = [f"{part if c == step.cpu else '':<{width}}" for c in range(cpus)]
            prefix = f"{n:>3}  " if k == 0 else "     "
            lines.append((prefix + " | ".join(cells)).rstrip())
    return "\n".join(lines)


def timeline_svg(
    steps: Sequence[Step], cpus: int, *, title: str = "", names: Sequence[str] | None = None, per_row: int = 12
) -> str:
    """An SVG timeline: one lane per CPU, time flowing left to right, wrapped into
    blocks of ``per_row`` steps (each block repeats the lanes)."""
    labels = list(names) if names else [f"CPU{c}" for c in range(cpus)]
    box_w, box_h, gap, lane_h = 150, 46, 8, 62
    left = 16 + 8 * max(len(label) for label in labels)
    top = 44 if title else 16
    block_h = cpus * lane_h + 26
    blocks = max(1, -(-len(steps) // per_row))
    width = left + min(len(steps), per_row) * (box_w + gap) + 16
    height = top + blocks * block_h
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="10">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="10" y="24" font-size="14" font-weight="bold">{html.escape(title)}</text>')
    for b in range(blocks):
        y0 = top + b * block_h
        if b:
            out.append(f'<line x1="8" y1="{y0 - 12}" x2="{width - 8}" y2="{y0 - 12}" stroke="#ddd" stroke-dasharray="4 4"/>')
        for c in range(cpus):
            y = y0 + c * lane_h
            out.append(f'<line x1="{left - 5}" y1="{y + box_h / 2}" x2="{width - 10}" y2="{y + box_h / 2}" stroke="#ccc"/>')
            out.append(f'<text x="8" y="{y + box_h / 2 + 4}" font-size="12" font-weight="bold">{html.escape(labels[c])}</text>')
    for n, step in enumerate(steps):
        b, k = divmod(n, per_row)
        x = left + k * (box_w + gap)
        y = top + b * block_h + step.cpu * lane_h
        fill, stroke = _COLORS.get(step.kind, _COLORS["exec"])
        out.append(f'<g><title>{html.escape(describe(step))}</title>')
        out.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" stroke="{stroke}"/>')
        for i, line in enumerate(textwrap.wrap(describe(step), 24)[:3]):
            out.append(f'<text x="{x + 4}" y="{y + 13 + 12 * i}">{html.escape(line)}</text>')
        out.append(f'<text x="{x + box_w - 4}" y="{y + box_h + 11}" text-anchor="end" fill="#888">{n + 1}</text></g>')
    out.append("</svg>")
    return "\n".join(out)
