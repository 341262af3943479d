"""``JitText.shrink``: the unused tail of a generous allocation back to the pack.

A JIT that cannot know a function's size before assembling it allocates generously
and gives back what it did not use.  The chunks past the new size go back under the
rules of a free (``_packs``): quarantined until an epoch when the pack is mapped
(another CPU may still hold instructions fetched from them, seeds/000), refilled with
traps in the epoch's batch if they held code.  Nothing is written now: the bytes
between the new size and the end of the text's last chunk keep what they held (trap
filler, or the old code of a LIVE text) until the text is freed, like the tail of
any text's last chunk.  Growing is refused: the chunks after a text may belong to
another one.  A text written in place (WRITING) is refused too: its range is held
writable by ``begin_inplace`` and is released by ``finalize`` as it was begun.

One verb with an undo (``_interrupts``): chunk map, size and shadow as they were.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from execmem import _checks
from execmem._errors import BadStateError, SizeError
from execmem._text import JitText, TextState

if TYPE_CHECKING:
    from execmem._allocator import Allocator


def shrink(allocator: Allocator, text: JitText, size: object) -> None:
    """See :meth:`execmem.JitText.shrink`."""
    new = _checks.positive_size(size)
    with allocator._lock:
        allocator._begin()
        allocator._checked(text, "shrink", TextState.RESERVED, TextState.LIVE, TextState.WRITING)
        if text._state is TextState.WRITING:
            raise BadStateError(
                f"shrink: the text at {text.address:#x} is being written in place; finalize() it first "
                "(or shrink before map_rw_inplace())"
            )
        if new > text._size:
            raise SizeError(f"shrink: {new} bytes is more than the text's {text._size}; a text never grows")
        if new == text._size:
            return
        pack = text._pack
        gran = allocator.granularity
        padding = text._address - (pack.address + text._chunk * gran)
        keep = -(-(padding + new) // gran)
        # In mprotect mode a text in a mapped pack takes whole write units: keep them whole.
        if allocator._unit_chunks > 1 and pack.reservation.mapped:
            units = allocator._unit_chunks
            keep = min(-(-keep // units) * units, text._nchunks)
        undo = partial(_unshrink, text, pack.chunks.snapshot(), text._nchunks, text._size, text._shadow)
        allocator._undo = [undo]
        try:
            if keep < text._nchunks:
                allocator._pool.free_tail(pack, text._chunk, keep, dirty=text._state is TextState.LIVE)
            text._nchunks, text._size, text._shadow = keep, new, text._shadow[:new]
        except BaseException:
            allocator._rollback()
            raise
        allocator._undo = ()


def _unshrink(text: JitText, snapshot: tuple[object, ...], nchunks: int, size: int, shadow: bytes | bytearray) -> None:
    text._pack.chunks.restore(snapshot)
    text._nchunks, text._size, text._shadow = nchunks, size, shadow


__all__ = ["shrink"]
