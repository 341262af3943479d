"""The allocator core: handles, states, publishing and patching.

Everything that touches memory goes through a :class:`~execmem._backend.Backend`;
everything that depends on the architecture is asked of its ``ArchSpec`` (the
backend's: a verification mutation is a backend handed a mutated spec).  Packs,
placement, refill, quarantine epochs and retirement are in ``_packs``; recipe
execution and the live-patch rule in ``_recipes``; running a batch's recipes over
texts and patch words in ``_publishing``; freeing in ``_freeing``; ``batch()`` in
``_batch``; the handles in ``_text``; call gates in ``_gates``; what profilers and
debuggers are told after each commit in ``debuginfo``; the module-level API in
``_default``.  Every verb completes or leaves no trace when an exception (a failed
system call, ``KeyboardInterrupt``) interrupts it: see ``_interrupts`` for how.  (This
module is long because each verb keeps its undo beside it.)

Publishing
    Texts in a reservation not yet mapped run the architecture's ``publish_fresh``
    recipe (write, cache maintenance, ``map``: nothing can have been fetched from an
    unmapped address, so no remote context synchronization is needed); texts in a
    mapped reservation run ``publish``.  One batch (``publish``, ``batch()``) runs
    each recipe once over all its ranges, with at most one ``remote_cse`` overall.
    Texts side by side in a pack (``jit_text_alloc_many`` places them so) are
    written with one store and maintained as one range.
In place
    ``map_rw_inplace`` calls ``backend.begin_inplace`` and writes go straight to the
    final location; ``finalize`` calls ``end_inplace`` and then runs the recipe (its
    ``write`` step has nothing left to copy).
Coarse write units
    When ``backend.write_unit`` exceeds the granularity (mprotect mode: a write to
    executable memory makes whole pages non-executable for a moment), a text placed
    in a pack that is already mapped takes whole write units, so writing it or
    writing it in place never touches a page another live text is executing from.
    Texts placed while the pack is not mapped yet are packed densely (nothing can
    execute there); ``map_rw_inplace`` then claims its write units whole, and refuses
    when another text shares them.  Publishing one of several densely packed texts
    after their pack was mapped still writes pages the others share: publish them
    together (``publish``/``batch``), or use dual mapping, when other threads may be
    running those neighbours.  Live patches are refused there (``UnsafePatchError``):
    the atomic store would make the page briefly non-executable.
Freeing
    The text's chunks return to the pack, quarantined until an epoch if the
    reservation is mapped; their trap refill comes in a batch later (``_packs``),
    and never while another text in the same write unit may run.  A free while
    calls through ``function()`` are in flight (their call gates count them,
    ``_gates``) marks the text FREED at once and reclaims it at the first verb after
    the last call has returned.  Inside ``batch()`` a free waits for the end of the
    block like the publishes (and is cancelled with them).
Lifetime
    ``close()`` (or the ``with`` block) releases everything.  An allocator that
    becomes unreachable without it is released by a finalizer, with a
    ``ResourceWarning``.
"""

from __future__ import annotations

import itertools
import operator
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

from execmem import _checks, _compile, _data, _foreign, _forks, _gates, _lookup, _recipes, debuginfo
from execmem._backend import Backend
from execmem._batch import Batch, BatchBlock
from execmem._errors import (
    AlignmentError,
    BadStateError,
    ExecmemError,
    ForkedProcessError,
    OutOfBoundsError,
    OutOfMemoryError,
    UnsupportedError,
    UseAfterFreeError,
)
from execmem._freeing import Freeing
from execmem._gates import JitFunction
from execmem._interrupts import uninterrupted
from execmem._lifetime import Owned, finalize
from execmem._locks import OwnedLock
from execmem._names import check_name, check_names
from execmem._packs import Pack, PackPool
from execmem._placement import Window, window_near
from execmem._publishing import Publisher, begin_inplace, end_inplace, offset_of, trap_at
from execmem._stats import AllocatorStats, Totals
from execmem._text import JitText, TextState
from execmem.arch import ArchSpec

DEFAULT_PACK_SIZE = 2 * 1024 * 1024
DEFAULT_GRANULARITY = 64

_RESERVED, _WRITING, _LIVE, _FREED = TextState.RESERVED, TextState.WRITING, TextState.LIVE, TextState.FREED
#: ``Allocator._undo`` when no verb is in progress (an empty tuple: falsy, shared).
_DONE: tuple[()] = ()
_shadow_of, _staged_of = operator.attrgetter("_shadow"), operator.attrgetter("_staged")


class Allocator:
    """Owns packs of executable memory and hands out :class:`JitText` handles.

    ``backend``: where memory comes from (default ``execmem.native.NativeBackend()``,
    owned and closed by this allocator).  ``pack_size``: bytes per pack, a power of
    two and a multiple of the page size (default 2 MiB, the PMD size); the native
    backend maps a pack only as far as its texts need and grows it in place.
    ``granularity``: the chunk size texts are rounded to (default 64, as
    bpf_prog_pack).  ``keep_empty``: how many empty packs stay mapped for reuse.
    See the module docstring for the policies; use it as a context manager or
    ``close()`` it.

    ``perf_map``, ``jitdump`` (a directory) and ``gdb`` tell profilers and debuggers
    about every published text, by name (``execmem.debuginfo``); all off by default.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        granularity: int = DEFAULT_GRANULARITY,
        keep_empty: int = 1,
        *,
        perf_map: bool = False,
        jitdump: str | os.PathLike[str] | None = None,
        gdb: bool = False,
    ) -> None:
        pack_size = _checks.integer("pack_size", pack_size)
        granularity = _checks.integer("granularity", granularity)
        keep_empty = _checks.integer("keep_empty", keep_empty)
        owns = backend is None
        if backend is None:
            from execmem.native import NativeBackend

            # NativeBackend exposes arch/cache_features as read-only properties, which
            # mypy does not accept for the protocol's plain attributes.
            backend = cast(Backend, NativeBackend())
        elif not isinstance(backend, Backend):
            raise TypeError(f"backend must implement execmem's Backend protocol, not {type(backend).__name__}")
        spec = backend.arch
        unit = backend.write_unit
        minimum = max(spec.insn_align, len(spec.trap_fill), spec.patch_rule.word)
        pow2 = _checks.power_of_two
        problems = []
        if not pow2(granularity) or granularity < minimum:
            problems.append(f"granularity must be a power of two >= {minimum} on {spec.name}, not {granularity}")
        if not pow2(pack_size) or pack_size < max(backend.page_size, granularity, unit):
            problems.append(
                f"pack_size must be a power of two >= the page size ({backend.page_size:#x}), "
                f"the granularity and the write unit, not {pack_size:#x}"
            )
        if keep_empty < 0:
            problems.append(f"keep_empty must be >= 0, not {keep_empty}")
        if pow2(granularity) and unit > granularity and unit % granularity:
            problems.append(f"the backend's write unit {unit} is not a multiple of granularity {granularity}")
        # A backend may bound one reservation (the native one: the machine's RAM): a
        # pack it would refuse is a clear error now, not at the first allocation.
        limit = backend.max_reservation
        too_big = limit is not None and pack_size > limit
        if problems or too_big:
            if owns:
                backend.close()
            if problems:
                raise AlignmentError("; ".join(problems))
            raise OutOfMemoryError(f"pack_size {pack_size:#x} is larger than the backend allows for one reservation ({limit:#x})")
        self.backend: Backend = backend
        self.arch: ArchSpec = spec
        self.pack_size = pack_size
        self.granularity = granularity
        self.keep_empty = keep_empty
        #: Chunks per write unit when the backend writes whole pages (mprotect), else 1.
        self._unit_chunks = unit // granularity if unit > granularity else 1
        self._lock = OwnedLock("the allocator")
        self._local = threading.local()
        self._generation = _forks.generation  # fork detection without a getpid per verb
        self._closed = False
        #: Texts not freed (RESERVED, WRITING, LIVE).
        self._texts: set[JitText] = set()
        #: Freed texts whose calls through ``function()`` have not all returned yet.
        self._pinned: list[JitText] = []
        #: How to take back the verb in progress (``_interrupts``); ``_DONE`` between verbs.
        self._undo: list[Callable[[], None]] | tuple[()] = _DONE
        self._steps: Counter[str] = Counter()
        self._recipe_runs: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._pool = PackPool(
            backend,
            pack_size=pack_size,
            granularity=granularity,
            keep_empty=keep_empty,
            quarantine=spec.quarantine,
            unit_chunks=self._unit_chunks,
            events=self._events,
        )
        try:
            #: Profilers' and debuggers' sinks (``debuginfo``), told after each commit.
            self._debug = debuginfo.attach(spec, backend, perf_map=perf_map, jitdump=jitdump, gdb=gdb)
        except BaseException:
            if owns:
                backend.close()
            raise
        self._publisher = Publisher(backend, spec, self._pool, self._steps, self._recipe_runs, self._events)
        self._freeing = Freeing(backend, self._pool, self._texts, self._pinned, self._events, self._debug)
        self._data = _data.DataPool(backend, pack_size)
        self._owned = Owned(self._pool, backend if owns else None, self._debug)
        finalizer = weakref.finalize(self, finalize, self._owned, self._generation)
        finalizer.atexit = False  # at exit the process's memory goes anyway, and code may still run
        _lookup.register(self)

    # -- plumbing ---------------------------------------------------------------------------

    def _begin(self) -> None:
        """First thing under the lock: refuse a forked child or a closed allocator, take
        back a verb that an exception interrupted while it was being undone, and
        reclaim pinned texts whose calls have returned."""
        if self._generation != _forks.generation:
            raise ForkedProcessError(
                "this allocator belongs to the parent process; create a new one in the forked child"
            )
        if self._closed:
            raise BadStateError("the allocator is closed")
        if self._undo:
            self._rollback()
        if self._pinned:
            self._freeing.poll()

    def _rollback(self) -> None:
        """Run the undo actions of the verb in progress, newest first; each is removed
        only once it has run, so an interrupted rollback is finished by the next verb."""
        undo = self._undo
        while undo:
            undo[-1]()
            undo.pop()
        self._undo = _DONE

    def _own(self, text: object) -> JitText:
        if not isinstance(text, JitText):
            raise TypeError(f"expected a JitText, not {type(text).__name__}")
        if text._allocator is not self:
            raise BadStateError(f"{text!r} belongs to another allocator")
        return text

    @staticmethod
    def _expect(text: JitText, *states: TextState, verb: str) -> None:
        if text._state in states:
            return
        if text._state is _FREED:
            raise UseAfterFreeError(f"{verb}: the text at {text.address:#x} has been freed")
        hint = {
            _RESERVED: "write it, then map() (or map_rw_inplace(), write, finalize())",
            _WRITING: "it is being written in place: finalize() it",
            _LIVE: "it is live: use update() for a live patch, or publish a new text",
        }[text._state]
        raise BadStateError(f"{verb} is not allowed on a {text._state.name} text at {text.address:#x}: {hint}")

    def _checked(self, text: JitText, verb: str, *states: TextState) -> Batch | None:
        """Refuse ``text`` unless it is this allocator's, in one of ``states`` and not
        queued in this thread's open batch; return that batch (what every verb on one
        text checks first, in one call: the hot path)."""
        if type(text) is not JitText or text._allocator is not self:
            self._own(text)
        if text._state not in states:
            self._expect(text, *states, verb=verb)
        batch = self._batch()
        if batch is not None and (text in batch.queued or text in batch.freeing):
            what = "freeing" if text in batch.freeing else "publishing"
            raise BadStateError(f"{verb}: the text at {text.address:#x} is queued for {what} in a batch")
        return batch

    def _batch(self) -> Batch | None:
        """This thread's open batch: None outside its block, which includes one left
        without its end (``_batch``); such a batch is replaced by the next one.  (Its
        ``__exit__`` may still be about to run it: a signal handler's verb there must
        not drop it.)"""
        batch: Batch | None = getattr(self._local, "batch", None)
        return batch if batch is not None and batch.open() else None

    # -- allocation ---------------------------------------------------------------------------

    def jit_text_alloc(self, size: int, align: int = 16, *, name: str | None = None, near: int | None = None) -> JitText:
        """Reserve ``size`` bytes of executable address space aligned to ``align``;
        ``name`` is what profilers and debuggers will call it (``JitText.name``).  With
        ``near``, where a direct call reaches it from ``near`` and ``near`` from every
        byte of it (``ArchSpec.branch_reach``; ``OutOfMemoryError`` if no such place
        can be had)."""
        if name is not None:
            check_name(name)
        if type(size) is not int or size <= 0:  # exact ints checked inline: the hot path
            size = _checks.positive_size(size)
        if type(align) is not int or align <= 0 or align & (align - 1):
            align = _checks.alignment(align)
        window = None if near is None else window_near(near, self.arch.branch_reach, self.arch.name)
        with self._lock:
            self._begin()
            pack, starts, counts = self._pool.place(size, align, window)  # housekeeping only
            start = starts[0]
            offset = start * self.granularity
            text = JitText(self, pack, start, counts[0], pack.address + offset, size, trap_at(self.arch, offset, size))
            if name is not None:
                text._name = name
            self._undo = [partial(self._untake, {pack: pack.chunks.snapshot()}, [text])]
            try:
                pack.chunks.take(start, counts[0])
                self._texts.add(text)
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE  # the commit (after it, the lock's release: see _interrupts)
            return text

    def _untake(self, snapshots: dict[Pack, tuple[object, ...]], texts: list[JitText]) -> None:
        """Undo of an allocation: chunk maps back, the texts unusable."""
        for pack, snapshot in snapshots.items():
            pack.chunks.restore(snapshot)
        self._texts.difference_update(texts)
        for text in texts:
            text._state = _FREED
        self._pool.trim_quietly()  # a dedicated reservation made for it goes again

    def jit_text_alloc_many(
        self,
        sizes: Iterable[int],
        align: int = 16,
        *,
        names: Iterable[str | None] | None = None,
        near: int | None = None,
    ) -> list[JitText]:
        """One text per size, as ``jit_text_alloc`` would give, but placed side by side:
        one placement and one bookkeeping update per pack instead of one per text (a
        JIT compiling a module of functions), and ``publish`` then writes adjacent
        texts with one store.  ``names``: one name (or ``None``) per size; ``near`` as
        for ``jit_text_alloc``, for every text.  On any error nothing is allocated."""
        wanted = _checks.positive_sizes(sizes)
        given = None if names is None else check_names(names, len(wanted))
        align = _checks.alignment(align)
        window = window_near(near, self.arch.branch_reach, self.arch.name)
        gran = self.granularity
        unit = max(align, gran)  # a text takes whole alignment steps in a run
        budget = self.pack_size // 2 // unit  # a run never exceeds what one text may take
        shared = self._pool.fits_in_a_pack(1, align)
        counts = [-(-size // gran) for size in wanted]  # chunks per text
        steps = counts if unit == gran else [-(-size // unit) for size in wanted]
        out: list[JitText] = []
        if not wanted:
            return out
        with self._lock:
            self._begin()
            snapshots: dict[Pack, tuple[object, ...]] = {}
            self._undo = [partial(self._untake, snapshots, out)]
            try:
                if shared and sum(steps) <= budget:  # the common case: one run
                    self._alloc_run(wanted, counts, align, snapshots, out, window)
                else:
                    group: list[int] = []
                    group_counts: list[int] = []
                    used = 0
                    for size, count, n in zip(wanted, counts, steps, strict=True):
                        if not shared or n > budget:
                            self._alloc_run([size], [count], align, snapshots, out, window)  # a dedicated reservation
                            continue
                        if used + n > budget:
                            self._alloc_run(group, group_counts, align, snapshots, out, window)
                            group, group_counts, used = [], [], 0
                        group.append(size)
                        group_counts.append(count)
                        used += n
                    if group:
                        self._alloc_run(group, group_counts, align, snapshots, out, window)
                if given is not None:
                    for text, name in zip(out, given, strict=True):
                        if name is not None:
                            text._name = name
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE
            return out

    def _alloc_run(
        self,
        sizes: list[int],
        counts: list[int],
        align: int,
        snapshots: dict[Pack, tuple[object, ...]],
        out: list[JitText],
        window: Window | None,
    ) -> None:
        """Texts of ``sizes`` (``counts`` chunks each) side by side in one pack, added to
        ``out`` (the undo's list) before anything is taken for them."""
        gran = self.granularity
        if len(sizes) == 1:
            pack, chunks, taken = self._pool.place(sizes[0], align, window)
        else:
            # What each text takes may be more than asked (whole write units, mprotect mode).
            pack, chunks, taken = self._pool.place_many(counts, max(1, align // gran), window)
        # Chunks start on a whole trap instruction (the granularity is a multiple of its
        # length), so a text's initial (trap) contents depend on its size only.
        traps = {size: self.arch.trap_bytes(size) for size in set(sizes)}
        texts = JitText._run(self, pack, chunks, taken, sizes, traps)
        snapshots.setdefault(pack, pack.chunks.snapshot())
        out += texts
        if len(chunks) == 1:
            pack.chunks.take(chunks[0], taken[0])
        else:
            pack.chunks.take_many(chunks, taken)
        self._texts.update(texts)

    # -- writing ------------------------------------------------------------------------------

    def _write(self, text: JitText, offset: int, data: bytes) -> None:
        with self._lock:
            self._begin()
            self._checked(text, "write", _RESERVED, _WRITING)
            if text._state is _RESERVED and len(data) == text._size:
                # The whole staging buffer: it becomes ``data`` (immutable bytes, from
                # JitText.write), in one assignment, nothing to undo (the hot path).
                text._shadow, text._staged = data, True
                return
            old = bytes(text._shadow[offset : offset + len(data)])
            self._undo = [partial(self._unstore, text, text._shadow, text._staged, offset, old)]
            try:
                self._store(text, offset, data)
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE

    def _store(self, text: JitText, offset: int, data: bytes) -> None:
        """``data`` at ``offset``: into memory (in place) and the shadow, which is only
        ever replaced whole (a shared ``bytes`` is copied first)."""
        if text._state is _WRITING and data:
            self.backend.write(text._pack.reservation, offset_of(text) + offset, data)
        shadow = bytearray(text._shadow) if type(text._shadow) is not bytearray else text._shadow
        shadow[offset : offset + len(data)] = data
        text._shadow, text._staged = shadow, text._staged or bool(data)

    def _unstore(self, text: JitText, shadow: bytes | bytearray, staged: bool, offset: int, old: bytes) -> None:
        """Undo of a write: memory and shadow as they were (``shadow``, the shadow object
        before the write, got ``old`` back if it is a bytearray written in place)."""
        if text._state is _WRITING and old:
            self.backend.write(text._pack.reservation, offset_of(text) + offset, old)
        if type(shadow) is bytearray:
            shadow[offset : offset + len(old)] = old
        text._shadow, text._staged = shadow, staged

    def _map_rw_inplace(self, text: JitText) -> None:
        with self._lock:
            self._begin()
            self._checked(text, "map_rw_inplace", _RESERVED)
            pack, res = text._pack, text._pack.reservation
            offset = offset_of(text)
            claim: tuple[int, int] | None = None
            u = self._unit_chunks
            if u > 1:
                # Whole write units for the text: begin_inplace makes them non-executable.
                gran = self.granularity
                first = offset // gran // u * u
                end = -(-(offset + text.size) // gran)
                last = min(-(-end // u) * u, pack.chunks.n)
                mine = ((1 << text._nchunks) - 1) << text._chunk
                units = ((1 << (last - first)) - 1) << first
                if pack.chunks.used & units & ~mine:
                    raise UnsupportedError(
                        f"the text at {text.address:#x} shares a {self.backend.write_unit}-byte write unit with "
                        "another text; writing it in place would make that text non-executable: use write() "
                        "and map(), or allocate with align equal to the write unit"
                    )
                if not res.mapped and (first, last - first) != (text._chunk, text._nchunks):
                    if pack.chunks.dirty & units:
                        self._pool.refill(pack)  # unmapped: every freed chunk may be refilled
                    claim = (first, last - first)
            begun: list[JitText] = []
            self._undo = [partial(self._unbegin, text, begun, pack.chunks.snapshot(), (text._chunk, text._nchunks))]
            try:
                uninterrupted(begin_inplace, self.backend, text, begun)
                if text._staged:
                    self.backend.write(res, offset, bytes(text._shadow))
                if claim is not None:
                    pack.chunks.release(text._chunk, text._nchunks)
                    pack.chunks.take(*claim)
                    text._chunk, text._nchunks = claim
                text._state = _WRITING
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE

    def _unbegin(self, text: JitText, begun: list[JitText], snapshot: tuple[object, ...], chunks: tuple[int, int]) -> None:
        """Undo of ``map_rw_inplace``: RESERVED again, memory traps, not writable."""
        text._state = _RESERVED
        text._chunk, text._nchunks = chunks
        text._pack.chunks.restore(snapshot)
        if text._staged:
            self.backend.write(text._pack.reservation, offset_of(text), self.arch.trap_bytes(text.size))
        if begun:
            uninterrupted(end_inplace, self.backend, text, begun)

    # -- publishing ---------------------------------------------------------------------------

    def _publish_one(self, text: JitText, *, inplace: bool) -> None:
        verb = "finalize" if inplace else "map"
        state = _WRITING if inplace else _RESERVED
        with self._lock:
            self._begin()
            batch = self._checked(text, verb, state)
            if batch is not None:
                batch.publish([text])
                return
            self._sync([text], [])

    def publish(self, texts: Iterable[JitText], codes: Iterable[bytes] | None = None) -> None:
        """Publish many RESERVED (staged) and WRITING (in-place) texts with one synchronization.

        ``codes``, if given, holds one bytes-like per text, written at its offset 0
        first (as ``text.write(0, code)``); checked in full before anything is written.
        """
        items, payloads = self._publishable(texts, codes)
        with self._lock:
            self._begin()
            self._check_publish(items, payloads)
            if not items:
                return
            batch = self._batch()
            # What staging the codes changes, for the undo (in C: the hot path of a batch).
            shadows = staged = inplace = None
            if payloads is not None:
                shadows, staged = list(map(_shadow_of, items)), list(map(_staged_of, items))
                inplace = {t: bytes(t._shadow) for t in items if t._state is _WRITING}
            undo = self._undo = [partial(self._unstage, items, shadows, staged, inplace)]
            try:
                if payloads is not None:
                    self._stage_codes(items, payloads)
                if batch is None:
                    self._publisher.sync(items, [], undo)
                else:
                    batch.publish(items)
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE
            if self._debug is not None and batch is None:
                self._tell(self._debug, items, [], ())

    def _stage_codes(self, items: list[JitText], payloads: list[bytes]) -> None:
        """``text.write(0, code)`` for each text, checked already.  A RESERVED text's
        staging buffer becomes the (immutable) code itself, or the code and the rest of
        the buffer: no copy into a bytearray (the hot path of a batch)."""
        for text, code in zip(items, payloads, strict=True):
            if text._state is not _RESERVED:
                self._store(text, 0, code)
            elif len(code) == text._size:
                text._shadow, text._staged = code, True
            elif code:
                text._shadow, text._staged = code + text._shadow[len(code) :], True

    def _unstage(
        self,
        items: list[JitText],
        shadows: list[bytes | bytearray] | None,
        staged: list[bool] | None,
        inplace: dict[JitText, bytes] | None,
    ) -> None:
        """Undo of ``publish``'s staging: shadows (and in-place memory) as they were."""
        if shadows is None or staged is None or inplace is None:
            return
        for text, shadow, was_staged in zip(items, shadows, staged, strict=True):
            old = inplace.get(text)
            if old is not None:  # an in-place text: its memory was written
                self.backend.write(text._pack.reservation, offset_of(text), old)
                if type(shadow) is bytearray:
                    shadow[:] = old
            text._shadow, text._staged = shadow, was_staged

    @staticmethod
    def _publishable(texts: Iterable[JitText], codes: Iterable[bytes] | None) -> tuple[list[JitText], list[bytes] | None]:
        items = list(texts)
        payloads = None if codes is None else [c if type(c) is bytes else _checks.data(c) for c in codes]
        if payloads is not None and len(payloads) != len(items):
            raise AlignmentError(f"publish: {len(items)} texts but {len(payloads)} codes")
        return items, payloads

    def _check_publish(self, items: list[JitText], payloads: list[bytes] | None) -> None:
        """Raise unless every text may be published (with its code): under the lock."""
        publishable = (_RESERVED, _WRITING)
        batch = self._batch()
        queued = set() if batch is None else batch.queued | batch.freeing
        for text, code in zip(items, payloads or itertools.repeat(b""), strict=False):
            if (
                type(text) is not JitText
                or text._allocator is not self
                or text._state not in publishable
                or text in queued
                or len(code) > text._size
            ):
                self._checked(text, "publish", *publishable)
                raise OutOfBoundsError(f"publish: {len(code)} bytes of code for {text!r}")
        if len(set(items)) != len(items):
            twice = next(t for t, n in Counter(items).items() if n > 1)
            raise BadStateError(f"{twice!r} is listed twice")

    def _sync(self, texts: list[JitText], patches: list[tuple[JitText, int, bytes]]) -> None:
        """One verb's publish of ``texts`` and ``patches``, undone if it does not complete."""
        undo = self._undo = []
        try:
            self._publisher.sync(texts, patches, undo)
        except BaseException:
            self._rollback()
            raise
        self._undo = _DONE
        if self._debug is not None:
            self._tell(self._debug, texts, patches, ())

    def _tell(
        self, debug: debuginfo.DebugInfo, texts: list[JitText], patches: list[tuple[JitText, int, bytes]], frees: Iterable[JitText]
    ) -> None:
        """Tell the debug sinks what a committed verb did (``debuginfo``): a pinned
        text's free only once its last call has returned (``_freeing``)."""
        if texts or patches:
            debug.published(texts, list(dict.fromkeys(t for t, _, _ in patches)))
        for text in frees:
            if text not in self._pinned:
                debug.freed(text)

    # -- batches ------------------------------------------------------------------------------

    def batch(self) -> BatchBlock:
        """``with allocator.batch():`` defers ``map``/``finalize``/``publish``/``update``/
        ``free`` in this thread to one synchronization when the block exits; an
        exception cancels them all (the texts stay unpublished, the patches unapplied,
        the texts to free allocated).  Nested blocks join the outermost.  The queued
        work is this thread's: other threads do not see it."""
        return BatchBlock(self)

    def _finish_batch(self, batch: Batch) -> None:
        """The end of a batch's block: its publishes, patches and frees, one verb."""
        with self._lock:
            self._begin()
            freeing = batch.freeing
            texts = [t for t in batch.texts if t._state in (_RESERVED, _WRITING) and t not in freeing]
            patches = [p for p in batch.patches if p[0]._state is _LIVE and p[0] not in freeing]
            frees = [t for t in batch.frees if t._state is not _FREED]
            undo = self._undo = []
            pool = self._pool
            try:
                # Frees first: the publishes' epoch then covers them (quarantine; the
                # refill, made once they are committed: see PackPool.refill_at_epoch).
                pool.refill_at_epoch = not frees
                for text in frees:
                    self._freeing.now(text, undo)
                if texts or patches:
                    self._publisher.sync(texts, patches, undo)
            except BaseException:
                self._rollback()
                raise
            finally:
                pool.refill_at_epoch = True
            self._undo = _DONE
            if self._debug is not None:
                self._tell(self._debug, texts, patches, frees)
            if frees:
                self._freeing.after({t._pack for t in frees}, refill=bool(texts or patches))

    # -- live patching ------------------------------------------------------------------------

    def _check_patch(self, text: JitText, shadow: bytes | bytearray, offset: int, data: bytes) -> None:
        _recipes.check_patch(self.arch, self.backend, text.address, shadow, offset, data)

    def _update(self, text: JitText, offset: int, data: bytes) -> None:
        with self._lock:
            self._begin()
            batch = self._checked(text, "update", _LIVE)
            if batch is None:
                self._check_patch(text, text._shadow, offset, data)
                self._sync([], [(text, offset, data)])
                return
            overlay = batch.overlay.get(text)
            self._check_patch(text, text._shadow if overlay is None else overlay, offset, data)
            if overlay is None:
                overlay = batch.overlay[text] = bytearray(text._shadow)
            overlay[offset : offset + len(data)] = data
            batch.patches.append((text, offset, data))

    # -- calling ------------------------------------------------------------------------------

    def _function(self, text: JitText, restype: Any, argtypes: tuple[Any, ...], offset: int) -> JitFunction:
        with self._lock:
            self._begin()
            self._own(text)
            self._expect(text, _LIVE, verb="function")
            if not self.backend.callable_in_process:
                raise UnsupportedError(
                    f"the {self.backend.mode} backend's memory is not executable in this process; "
                    f"run the code on the backend instead (execmem.emu.Machine.call(t.address, ...))"
                )
            # Everything made here is owned by objects (slot, gate, callable) that give
            # it back when they are collected: nothing to undo.
            return _gates.make_function(text, restype, argtypes, text.address + offset)

    def _read(self, text: JitText) -> bytes:
        with self._lock:
            self._own(text)
            if self._undo and not self._closed and self._generation == _forks.generation:
                self._rollback()
            if text._state is _FREED:
                raise UseAfterFreeError(f"read: the text at {text.address:#x} has been freed")
            return bytes(text._shadow)

    # -- freeing ------------------------------------------------------------------------------

    def _free(self, text: JitText) -> None:
        with self._lock:
            self._begin()
            self._own(text)
            batch = self._batch()
            if text._state is _FREED or (batch is not None and text in batch.freeing):
                raise UseAfterFreeError(f"free: the text at {text.address:#x} has already been freed")
            if batch is not None:  # freed with the batch's publishes, or not at all if it raises
                batch.free(text)
                return
            undo = self._undo = []
            try:
                self._freeing.now(text, undo)
            except BaseException:
                self._rollback()
                raise
            self._undo = _DONE
            if self._debug is not None:
                self._tell(self._debug, [], [], (text,))
            self._freeing.after((text._pack,))

    # -- data regions -------------------------------------------------------------------------

    def jit_data_alloc(self, size: int, *, near: int | None = None, align: int = 16) -> _data.JitData:
        """``size`` zeroed bytes of read+write memory that is never executable, in reach
        (``ArchSpec.branch_reach``) of every pack of this allocator, or of ``near``
        (``_data``).  ``OutOfMemoryError`` if no such place can be had."""
        return _data.jit_data_alloc(self, size, near, align)

    # -- one call -----------------------------------------------------------------------------

    def compile_function(
        self,
        source: str,
        restype: Any = None,
        argtypes: Sequence[Any] = (),
        *,
        name: str | None = None,
        arch: str | None = None,
        near: int | None = None,
        syntax: str | None = None,
        symbols: Mapping[str, int] | None = None,
    ) -> JitFunction:
        """Assemble ``source`` for its final address, allocate (``near`` as for
        ``jit_text_alloc``), publish and return ``text.function(restype, *argtypes)``
        (``.text`` is the text); assembled once when the text lands where the
        allocator guessed, twice otherwise (``_compile``).  ``syntax`` and ``symbols``
        are :func:`execmem.asm`'s."""
        return _compile.compile_function(
            self, source, restype, argtypes, name=name, arch=arch, near=near, syntax=syntax, symbols=symbols
        )

    # -- code written by others ---------------------------------------------------------------

    def sync_code(self, address: int, length: int) -> None:
        """Run the architecture's publish recipe over ``[address, address+length)``, code
        that something else wrote (``_foreign``): cache maintenance, local and remote
        context synchronization.  ``OutOfBoundsError`` unless the range is mapped readable."""
        _foreign.sync_code(self, address, length)

    def serialize_all_threads(self) -> None:
        """Every thread (every modeled CPU) takes a context-synchronization event: the
        ``remote_cse`` step alone (one epoch)."""
        _foreign.serialize_all_threads(self)

    # -- reporting ----------------------------------------------------------------------------

    def text_at(self, address: int) -> JitText | None:
        """The text (in any state but FREED) whose bytes hold ``address``, or ``None``
        (also once closed); cheap, from any thread (``_lookup``)."""
        address = _checks.integer("address", address)
        if self._generation != _forks.generation:
            raise ForkedProcessError("this allocator belongs to the parent process")
        return self._text_at(address)

    def _text_at(self, address: int) -> JitText | None:
        with self._lock:
            if self._closed or self._generation != _forks.generation:
                return None
            return _lookup.find(self, address)

    def stats(self) -> AllocatorStats:
        """What the allocator holds and did (and ``backend.stats()`` under ``"backend"``)."""
        with self._lock:
            if self._generation != _forks.generation:
                raise ForkedProcessError("this allocator belongs to the parent process")
            if not self._closed:
                self._begin()
            pool = self._pool
            packs = pool.describe()
            totals: Totals = {
                "packs": len(packs),
                "reserved_bytes": sum(p["size"] for p in packs),
                "capacity_bytes": sum(p["capacity"] for p in packs),
                "live_bytes": sum(p["live_bytes"] for p in packs),
                "free_bytes": sum(p["free_bytes"] for p in packs),
                "quarantined_bytes": sum(p["quarantined_bytes"] for p in packs),
                "unfilled_bytes": sum(p["unfilled_bytes"] for p in packs),
            }
            by_state = Counter(t._state.name for t in self._texts)
            texts = {s.name: by_state[s.name] for s in TextState if s is not _FREED}
            texts["FREED"] = self._events["freed"]
            return {
                "arch": self.arch.name,
                "mode": self.backend.mode,
                "granularity": self.granularity,
                "pack_size": self.pack_size,
                "write_unit": self.backend.write_unit,
                "keep_empty": self.keep_empty,
                "quarantine": pool.quarantine,
                "closed": self._closed,
                "packs": packs,
                "totals": totals,
                "texts": texts,
                "epochs": {"started": pool.started, "completed": pool.completed, "forced": pool.forced},
                "steps": dict(self._steps),
                "recipes": dict(self._recipe_runs),
                "events": dict(self._events),
                "data": self._data.totals(),
                "backend": dict(self.backend.stats()),
                "debuginfo": {} if self._debug is None else self._debug.describe(),
            }

    def occupancy(self) -> list[dict[str, object]]:
        """Per pack: address, size, granularity, flags and ``runs``, the chunk states
        run-length encoded as ``[(state, chunks), ...]`` with states live/free/quarantined
        (freed chunks waiting for their trap refill count as quarantined; ``unfilled``
        has a bit set for each of them)."""
        with self._lock:
            return self._pool.occupancy()

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release every reservation (idempotent).  Texts become unusable.  Refused
        (``BadStateError``, nothing changes) while a call through ``function()`` is
        running: releasing the memory would pull the code from under it."""
        with self._lock:
            if self._closed:
                return
            if self._generation != _forks.generation:
                self._closed = True  # the parent owns the memory; touch nothing
                return
            self._begin()
            running = sum(_gates.in_flight(t) for t in (*self._texts, *self._pinned))
            if running:
                raise BadStateError(
                    f"close: {running} call(s) through function() are still running; close after they return"
                )
            first = uninterrupted(self._close_now)
            if first is not None:
                raise first

    def _close_now(self) -> ExecmemError | None:
        self._closed = self._owned.closed = True
        for text in (*self._texts, *self._pinned):
            _gates.retire(text)
            text._state = _FREED
        self._texts.clear()
        self._pinned.clear()
        if self._debug is not None:
            self._debug.close()  # before the memory goes: GDB forgets the texts first
        first = self._data.close()
        first = self._pool.close() or first
        backend = self._owned.backend
        if backend is not None:
            try:
                backend.close()
            except ExecmemError as exc:
                first = first or exc
        return first

    def __enter__(self) -> Allocator:
        with self._lock:
            self._begin()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pool.packs)} packs, {len(self._texts)} texts"
        return f"<execmem.Allocator {self.arch.name} {self.backend.mode}: {state}>"


__all__ = ["DEFAULT_GRANULARITY", "DEFAULT_PACK_SIZE", "Allocator", "AllocatorStats"]
