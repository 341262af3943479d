"""One progress line on stderr for commands that can run for more than a few seconds.

``[done/total] what``, rewritten in place, only when stderr is a terminal and the
user did not pass ``--quiet`` (the CLI calls :func:`set_quiet`): piped or captured
output never carries control characters.
"""

from __future__ import annotations

import sys

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

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"\r\033[K[{self.done}/{self.total}] {what}", end="", file=sys.stderr, flush=True)

    def note(self, what: str) -> None:
        """Show ``what`` without counting a step (a phase that has no total)."""
        if self.enabled:
            print(f"\r\033[K{what}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["Progress", "enabled", "set_quiet"]
