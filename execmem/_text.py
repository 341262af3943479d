"""Handles: :class:`JitText` (one allocation) and :class:`JitFunction` (a call into it).

A ``JitText`` is a thin handle; every verb takes its allocator's lock and runs in
``_allocator`` (the handle only validates its own arguments first).  States::

    RESERVED --write*--> (staged privately, trap-filled) --map()------------> LIVE
    RESERVED --map_rw_inplace()--> WRITING --write*--> --finalize()---------> LIVE
    LIVE --update()--> LIVE          any state but FREED --free()--> FREED

An illegal transition raises ``BadStateError`` (``UseAfterFreeError`` after
``free``) and changes nothing.  ``read()`` returns the shadow copy the allocator
keeps outside executable memory (the staged bytes while RESERVED).
"""

from __future__ import annotations

import ctypes
import enum
from typing import TYPE_CHECKING, Any

from execmem import _patch
from execmem._errors import AlignmentError, OutOfBoundsError, UseAfterFreeError
from execmem._names import default_name

if TYPE_CHECKING:
    from execmem._allocator import Allocator
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


_FREED = TextState.FREED
_RESERVED = TextState.RESERVED


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    return value


def check_bytes(data: object) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"data must be bytes-like, not {type(data).__name__}")


class JitText:
    """One piece of executable memory handed out by an :class:`~execmem.Allocator`."""

    __slots__ = (
        "__weakref__",
        "_address",
        "_allocator",
        "_chunk",
        "_freed_from",
        "_inflight",
        "_name",
        "_nchunks",
        "_pack",
        "_pending",
        "_reclaim_pending",
        "_shadow",
        "_size",
        "_staged",
        "_state",
    )

    # Set by free(), and read only after it (not in __init__: bulk allocation is hot).
    _freed_from: TextState
    _reclaim_pending: bool
    #: Set only for a text given a name at allocation (see ``name``).
    _name: str
    #: Staging buffer while RESERVED; afterwards the shadow of what is in memory.  Immutable
    #: ``bytes`` may be shared (the initial traps of every text of one size, the code given
    #: to ``publish``); the first partial ``write`` replaces it with a private bytearray.
    _shadow: bytes | bytearray

    def __init__(self, allocator: Allocator, pack: _Pack, chunk: int, nchunks: int, address: int, size: int, trap: bytes) -> None:
        self._allocator = allocator
        self._pack = pack
        self._chunk = chunk  # first chunk of the allocation (may precede the address: padding)
        self._nchunks = nchunks
        self._address = address
        self._size = size
        self._state = _RESERVED
        self._shadow = trap
        self._staged = False  # whether write() touched the staging buffer
        self._pending: str | None = None  # "publish" while queued in a batch
        self._inflight = 0

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
            t._allocator = allocator
            t._pack = pack
            t._chunk = chunk
            t._nchunks = nchunks
            t._address = base + chunk * gran
            t._size = size
            t._state = _RESERVED
            t._shadow = traps[size]
            t._staged = False
            t._pending = None
            t._inflight = 0
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

    def _range(self, offset: object, length: int) -> int:
        off = check_int("offset", offset)
        if off < 0 or off + length > self._size:
            raise OutOfBoundsError(
                f"[{off:#x}, {off + length:#x}) is outside the text of {self._size:#x} bytes at {self._address:#x}"
            )
        return off

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``: staged while RESERVED, in place while WRITING."""
        payload = check_bytes(data)
        off = self._range(offset, len(payload))
        self._allocator._write(self, off, payload)

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
        payload = check_bytes(data)
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
        new = _patch.retargeted(self._allocator.arch, self.read(), self._address, off, check_int("target", target))
        self.update(off, new)

    def function(self, restype: Any, *argtypes: Any, offset: int = 0) -> JitFunction:
        """A ctypes callable for the code at ``offset`` (LIVE only, native backends only)."""
        off = self._range(offset, 1)
        if off % self._allocator.arch.insn_align:
            raise AlignmentError(f"offset {off:#x} is not instruction-aligned ({self._allocator.arch.insn_align})")
        return self._allocator._function(self, restype, argtypes, off)

    def free(self) -> None:
        """Release the text; its memory is trap-filled and quarantined until an epoch."""
        self._allocator._free(self)

    def read(self) -> bytes:
        """The text's bytes as the allocator knows them (a copy kept outside executable memory)."""
        return self._allocator._read(self)

    def __repr__(self) -> str:
        named = getattr(self, "_name", None)
        label = f"{named!r} " if named else ""
        return f"<JitText {label}{self._state.name} at {self._address:#x}, {self._size} bytes>"


class JitFunction:
    """A ctypes function pointer into a LIVE text that counts calls in flight.

    ``free()`` while calls are in flight marks the text FREED at once (new calls
    raise ``UseAfterFreeError``) and leaves trap refill and quarantine to the last
    call that returns.  The pointer is made with ``CFUNCTYPE(...)(address)``: no
    libffi closure (those need writable+executable trampolines) is ever created.
    """

    __slots__ = ("_cfunc", "_entry", "_text")

    def __init__(self, text: JitText, cfunc: Any, entry: int) -> None:
        self._text = text
        self._cfunc = cfunc
        self._entry = entry

    @property
    def address(self) -> int:
        return self._entry

    @property
    def text(self) -> JitText:
        return self._text

    def __call__(self, *args: Any) -> Any:
        text = self._text
        calls_lock = text._allocator._calls_lock
        with calls_lock:
            if text._state is _FREED:
                raise UseAfterFreeError(f"the text at {text._address:#x} has been freed")
            text._inflight += 1
        try:
            return self._cfunc(*args)
        finally:
            with calls_lock:
                text._inflight -= 1
                # close() frees texts without a deferred reclaim: no _reclaim_pending.
                finish = text._inflight == 0 and text._state is _FREED and getattr(text, "_reclaim_pending", False)
                if finish:
                    text._reclaim_pending = False
            if finish:
                text._allocator._finish_deferred_free(text)

    def __repr__(self) -> str:
        return f"<JitFunction at {self._entry:#x} in {self._text!r}>"


def make_cfunc(restype: Any, argtypes: tuple[Any, ...], address: int) -> Any:
    """``CFUNCTYPE(restype, *argtypes)(address)``: a plain pointer, no closure."""
    prototype = ctypes.CFUNCTYPE(restype, *argtypes)
    return prototype(address)


__all__ = ["JitFunction", "JitText", "TextState", "check_bytes", "check_int", "make_cfunc"]
