"""Pictures drawn with matplotlib, an optional extra (``pip install 'execmem[plot]'``):
``execmem bench --plot`` and ``execmem stats --png``.

Both commands call :func:`check_png` before any work, so a picture that cannot be
drawn is refused at once and nothing is run or written; without the option neither
imports matplotlib at all.
"""

from __future__ import annotations

from types import ModuleType

from execmem._errors import ExecmemError


def check_png(path: str, option: str) -> None:
    """Refuse ``option``'s ``path`` unless it names a PNG file and matplotlib is
    installed: matplotlib picks the format from the suffix, so ``x.svg`` would
    quietly be SVG (and ``x`` an error after the work)."""
    if not path.lower().endswith(".png"):
        raise ExecmemError(f"{option} {path!r}: the picture is a PNG file; give a name ending in .png")
    pyplot(option)


def pyplot(option: str) -> ModuleType:
    """``matplotlib.pyplot`` drawing off screen (Agg), or a clear error naming ``option``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExecmemError(f"{option} needs matplotlib: pip install 'execmem[plot]'") from None
    return plt


__all__ = ["check_png", "pyplot"]
