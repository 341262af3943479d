"""``Allocator.batch()``: publishes, patches and frees deferred to one synchronization.

A batch belongs to the thread that opened it and lives only in that thread's state:
nothing is recorded on the texts until the block ends, so a block that does not end
normally leaves nothing behind.  An asynchronous exception can even stop
``__exit__`` before its first line (CPython checks for pending exceptions when a
Python function starts), so a batch also knows the ``with`` statement that opened it,
its frame and the offsets of its body (``_interrupts.with_body``): a verb that finds
that frame gone from the stack, or no longer inside the body, drops the batch as
cancelled (the block did raise) instead of queueing into it; the next batch of the
thread replaces it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from execmem._interrupts import with_body

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._text import JitText


@dataclass(eq=False)
class Batch:
    """What one thread's batch holds until its block ends."""

    #: The frame of the ``with`` statement and its body's offsets (None: not a ``with``).
    frame: FrameType | None
    body: tuple[int, int] | None
    texts: list[JitText] = field(default_factory=list)
    queued: set[JitText] = field(default_factory=set)
    patches: list[tuple[JitText, int, bytes]] = field(default_factory=list)
    overlay: dict[JitText, bytearray] = field(default_factory=dict)
    frees: list[JitText] = field(default_factory=list)
    freeing: set[JitText] = field(default_factory=set)
    depth: int = 0

    def open(self) -> bool:
        """Whether the block that opened the batch is still running (see the module
        docstring): its frame is on this thread's stack, inside the body."""
        if self.frame is None or self.body is None:
            return True
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame is not self.frame:
            frame = frame.f_back
        return frame is not None and self.body[0] <= frame.f_lasti < self.body[1]

    def publish(self, texts: list[JitText]) -> None:
        self.texts += texts
        self.queued.update(texts)

    def free(self, text: JitText) -> None:
        if text in self.queued:
            self.queued.discard(text)
            self.texts.remove(text)
        self.patches = [p for p in self.patches if p[0] is not text]
        self.overlay.pop(text, None)
        self.frees.append(text)
        self.freeing.add(text)


class BatchBlock:
    """The context manager ``Allocator.batch()`` returns."""

    def __init__(self, allocator: Allocator) -> None:
        self._allocator = allocator
        self._outermost = False

    def __enter__(self) -> Allocator:
        a = self._allocator
        with a._lock:
            a._begin()
        current = a._batch()
        if current is not None:  # nested: joins the outermost
            current.depth += 1
            return a
        frame = sys._getframe(1)
        a._local.batch = Batch(frame, with_body(frame))
        self._outermost = True
        return a

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        a = self._allocator
        batch: Batch | None = getattr(a._local, "batch", None)  # (its frame is at the exit now)
        if not self._outermost:
            if batch is not None:
                batch.depth -= 1
            return
        a._local.batch = None
        if exc_type is None and batch is not None:
            a._finish_batch(batch)


__all__ = ["Batch", "BatchBlock"]
