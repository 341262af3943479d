"""One progress line on stderr for commands that can run for more than a few seconds.

``[done/total] what``, rewritten in place, only when stderr is a terminal and the
user did not pass ``--quiet`` (the CLI calls :func:`set_quiet`): piped or captured
output never carries control characters.  Every long command (``litmus``,
``verify``, ``bench``, ``example hotswap``, the soak runner) reports through this one
class, so they look and behave alike.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

#: What a long-running function is handed to report a step (``Progress.step``).
Step = Callable[[str], None]

#: Redraw at most this often: a loop of thousands of quick steps (hotswap's
#: versions) must not spend its time writing to the terminal.
_INTERVAL = 0.1

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress line of this process (``execmem --quiet``)."""
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """Whether progress lines are shown: stderr is a terminal and not ``--quiet``."""
    return not _quiet and sys.stderr.isatty()


class Progress:
    """``[done/total] what`` on stderr, overwriting one line (see the module docstring)."""

    def __init__(self, total: int, *, enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.enabled = globals()["enabled"]() if enabled is None else enabled
        self._drawn = float("-inf")

    def step(self, what: str) -> None:
        """Count one step done and show ``what`` (the step just finished or started)."""
        self.done += 1
        self._draw(f"[{self.done}/{self.total}] {what}", last=self.done >= self.total)

    def note(self, what: str) -> None:
        """Show ``what`` without counting a step (a phase that has no total)."""
        self._draw(what, last=False)

    def _draw(self, line: str, *, last: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if last or now - self._drawn >= _INTERVAL:
            self._drawn = now
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["Progress", "Step", "enabled", "set_quiet"]
