"""Which fork of the process this is: a counter that every forked child increments.

An object made in a parent compares the counter it saw with the current one to know
that it now lives in a forked child (where execmem refuses to use it), for the price
of a global lookup; ``os.getpid()`` is a system call on Linux (glibc stopped caching
it in 2.25), which the hot paths made several times per publish."""

from __future__ import annotations

import os

#: Incremented in every forked child (``os.register_at_fork``).
generation = 0


def _after_fork_in_child() -> None:
    global generation
    generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["generation"]
