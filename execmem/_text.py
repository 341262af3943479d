"""Handles: :class:`JitText`, one allocation (calls into it: ``_gates``).

A ``JitText`` is a thin handle; every verb takes its allocator's lock and runs in
``_allocator`` (the handle only validates its own arguments first).  States::

    RESERVED --write*--> (staged privately, trap-filled) --map()------------> LIVE
    RESERVED --map_rw_inplace()--> WRITING --write*--> --finalize()---------> LIVE
    LIVE --update()--> LIVE          any state but FREED --free()--> FREED

An illegal transition raises ``BadStateError`` (``UseAfterFreeError`` after
``free``) and changes nothing.  ``read()`` returns the shadow copy the allocator
keeps outside executable memory (the staged bytes while RESERVED).  A text is a
context manager: ``with allocator.jit_text_alloc(64) as t:`` frees it at the end of the
block (unless it was freed already).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from execmem import _checks, _patch
from execmem._errors import AlignmentError, OutOfBoundsError
from execmem._names import default_name

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._gates import Gate, JitFunction, Slot
    from execmem._packs import Pack as _Pack


class TextState(enum.Enum):
    """Where a :class:`JitText` is in its life."""

    #: Address known, nothing executable; ``write`` goes to a private staging buffer.
    RESERVED = "reserved"
    #: ``map_rw_inplace`` was called: ``write`` goes straight to the final location.
    WRITING = "writing"
    #: Published: executable and synchronized; only ``update`` may change it.
    LIVE = "live"
    #: Freed: every use raises ``UseAfterFreeError``.
    FREED = "freed"


_RESERVED = TextState.RESERVED


class JitText:
    """One piece of executable memory handed out by an :class:`~execmem.Allocator`."""

    __slots__ = (
        "__weakref__",
        "_address",
        "_allocator",
        "_chunk",
        "_freed_from",
        "_gates",
        "_name",
        "_nchunks",
        "_pack",
        "_shadow",
        "_size",
        "_slot",
        "_staged",
        "_state",
    )

    # Set by free(), and read only after it (not in __init__: bulk allocation is hot).
    _freed_from: TextState
    #: Set only for a text given a name at allocation (see ``name``).
    _name: str
    #: Staging buffer while RESERVED; afterwards the shadow of what is in memory.  Immutable
    #: ``bytes`` may be shared (the initial traps of every text of one size, the code given
    #: to ``publish``); the first partial ``write`` replaces it with a private bytearray.
    _shadow: bytes | bytearray
    #: The call-gate slot counting calls in flight (``_gates``), once ``function()`` was called.
    _slot: Slot | None
    #: Call gates made for this text, by (offset, stack bytes, holds the GIL).
    _gates: dict[tuple[int, int, bool], Gate] | None

    def __init__(self, allocator: Allocator, pack: _Pack, chunk: int, nchunks: int, address: int, size: int, trap: bytes) -> None:
        self._state = _RESERVED
        self._allocator = allocator
        self._pack = pack
        self._chunk = chunk  # first chunk of the allocation (may precede the address: padding)
        self._nchunks = nchunks
        self._address = address
        self._size = size
        self._shadow = trap
        self._staged = False  # whether write() touched the staging buffer
        self._slot = None
        self._gates = None

    @classmethod
    def _run(
        cls,
        allocator: Allocator,
        pack: _Pack,
        chunks: list[int],
        counts: list[int],
        sizes: list[int],
        traps: dict[int, bytes],
    ) -> list[JitText]:
        """``JitText(...)`` for each text of a run (``jit_text_alloc_many``), the same
        fields as ``__init__`` set without a call per text (the hot path: the objects
        are made in one comprehension, then filled)."""
        gran = allocator.granularity
        base = pack.address
        new = object.__new__
        out = [new(cls) for _ in sizes]
        for t, size, chunk, nchunks in zip(out, sizes, chunks, counts, strict=True):
            t._state = _RESERVED
            t._allocator = allocator
            t._pack = pack
            t._chunk = chunk
            t._nchunks = nchunks
            t._address = base + chunk * gran
            t._size = size
            t._shadow = traps[size]
            t._staged = False
            t._slot = None
            t._gates = None
        return out

    @property
    def address(self) -> int:
        """The executable address (fixed at allocation, executable once LIVE)."""
        return self._address

    @property
    def size(self) -> int:
        """The size asked for (the footprint may be rounded up to chunks or pages)."""
        return self._size

    @property
    def name(self) -> str:
        """What profilers and debuggers call this text: the name given at allocation,
        else ``jit_<address in hex>`` (``_names``)."""
        # Set only when a name is given: the slot stays empty otherwise (hot allocation).
        return getattr(self, "_name", None) or default_name(self._address)

    @property
    def state(self) -> TextState:
        return self._state

    @property
    def allocator(self) -> Allocator:
        return self._allocator

    @property
    def _inflight(self) -> int:
        """Calls through ``function()`` running now (read from the call gates' counter)."""
        return 0 if self._slot is None else self._slot.inflight()

    def _range(self, offset: object, length: int) -> int:
        off = _checks.integer("offset", offset)
        if off < 0 or off + length > self._size:
            raise OutOfBoundsError(
                f"[{off:#x}, {off + length:#x}) is outside the text of {self._size:#x} bytes at {self._address:#x}"
            )
        return off

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``: staged while RESERVED, in place while WRITING."""
        payload = data if type(data) is bytes else _checks.data(data)
        if type(offset) is int and offset >= 0 and offset + len(payload) <= self._size:
            self._allocator._write(self, offset, payload)  # checked inline: the hot path
        else:
            self._allocator._write(self, self._range(offset, len(payload)), payload)

    def map(self) -> None:
        """Publish the staged code: write it, synchronize, make it executable (LIVE)."""
        self._allocator._publish_one(self, inplace=False)

    def map_rw_inplace(self) -> None:
        """Switch to writing directly at the final location (RESERVED -> WRITING)."""
        self._allocator._map_rw_inplace(self)

    def finalize(self) -> None:
        """End in-place writing and synchronize (WRITING -> LIVE)."""
        self._allocator._publish_one(self, inplace=True)

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Live-patch one whole instruction inside one atomic word (LIVE only).

        Anything the architecture does not allow while other threads may run the
        code raises ``UnsafePatchError`` naming the safe alternative.
        """
        payload = _checks.data(data)
        off = self._range(offset, len(payload))
        self._allocator._update(self, off, payload)

    def retarget(self, offset: int, target: int) -> None:
        """Point the direct jump or call at ``offset`` to ``target`` (LIVE only).

        The branch keeps its length (x86-64 ``jmp``/``call rel32``, arm64 ``B``/``BL``)
        and is rewritten by the same atomic patch as ``update``, so a 5-byte ``jmp``
        must lie inside one aligned 8-byte word (``.balign 8`` before it, and
        ``{disp32} jmp`` for the long form).  A target out of reach, or anything
        else at ``offset``, raises ``UnsafePatchError``.
        """
        off = self._range(offset, 1)
        new = _patch.retargeted(self._allocator.arch, self.read(), self._address, off, _checks.integer("target", target))
        self.update(off, new)

    def function(self, restype: Any, *argtypes: Any, offset: int = 0) -> JitFunction:
        """A ctypes callable for the code at ``offset`` (LIVE only, native backends only).

        The call goes through a call gate (``_gates``): machine code that counts it in
        flight, so that ``free()`` defers reclaiming the text while it runs, and raises
        ``UseAfterFreeError`` for a call made after ``free()``."""
        off = self._range(offset, 1)
        if off % self._allocator.arch.insn_align:
            raise AlignmentError(f"offset {off:#x} is not instruction-aligned ({self._allocator.arch.insn_align})")
        return self._allocator._function(self, restype, argtypes, off)

    def shrink(self, size: int) -> None:
        """Keep the first ``size`` bytes and give the chunks after them back, under the
        rules of ``free`` (RESERVED or LIVE; growing is refused: ``SizeError``)."""
        from execmem._shrink import shrink

        shrink(self._allocator, self, size)

    def free(self) -> None:
        """Release the text; its memory is trap-filled and quarantined until an epoch."""
        self._allocator._free(self)

    def read(self) -> bytes:
        """The text's bytes as the allocator knows them (a copy kept outside executable memory)."""
        return self._allocator._read(self)

    def __enter__(self) -> JitText:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._state is not TextState.FREED:
            self.free()

    def __repr__(self) -> str:
        named = getattr(self, "_name", None)
        label = f"{named!r} " if named else ""
        return f"<JitText {label}{self._state.name} at {self._address:#x}, {self._size} bytes>"


__all__ = ["JitText", "TextState"]
