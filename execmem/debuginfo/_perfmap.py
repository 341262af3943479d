"""The perf map: ``/tmp/perf-<pid>.map``, one ``START SIZE name`` line per text.

``perf report`` (and ``perf top``) read this file for addresses that no mapped file
explains (perf's ``Documentation/jit-interface.txt``): ``START`` and ``SIZE`` in hex
without ``0x``, then the name to the end of the line.  perf looks only in ``/tmp``.

The format can only grow: a freed text's line stays, and when its address is reused
both lines are there and perf cannot tell which was first.  A long-running JIT that
recycles addresses is better served by jitdump (``_jitdump``), whose records carry
times.  Other writers in the process (CPython's ``-X perf``, for one) may append to
the same file: each batch of lines is one ``write`` on an ``O_APPEND`` descriptor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from execmem.debuginfo._files import open_owned, write_all

if TYPE_CHECKING:
    from execmem._text import JitText


def perf_map_path(pid: int) -> str:
    return f"/tmp/perf-{pid}.map"


class PerfMapSink:
    """Appends a line per published text to this process's perf map."""

    what = "perf_map"

    def __init__(self) -> None:
        self.path = perf_map_path(os.getpid())
        self._fd = open_owned(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.lines = 0

    def published(self, texts: Sequence[JitText]) -> None:
        lines = "".join(f"{t._address:x} {t._size:x} {t.name}\n" for t in texts)
        write_all(self._fd, lines.encode(), self.path)
        self.lines += len(texts)

    def patched(self, texts: Sequence[JitText]) -> None:
        """Nothing to add: a live patch keeps the text's range and name."""

    def freed(self, text: JitText) -> None:
        """Nothing to remove: the format has no way to (see the module docstring)."""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "lines": self.lines}


__all__ = ["PerfMapSink", "perf_map_path"]
