"""The allocator core: handles, states, publishing and patching.

Everything that touches memory goes through a :class:`~execmem._backend.Backend`;
everything that depends on the architecture is asked of its ``ArchSpec``.  Packs,
placement, quarantine epochs and retirement are in ``_packs``; recipe execution and
the live-patch rule in ``_recipes``; running a batch's recipes over texts and
patch words in ``_publishing``; the handles in ``_text``; the module-level API in
``_default``.

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
    in a pack that is already mapped takes whole write units, so writing, refilling
    or writing it in place never touches a page another live text is executing from.
    Texts placed while the pack is not mapped yet are packed densely (nothing can
    execute there); ``map_rw_inplace`` then claims its write units whole, and refuses
    when another text shares them.  Publishing or freeing one of several densely
    packed texts after their pack was mapped still writes pages the others share:
    publish them together (``publish``/``batch``), or use dual mapping, when other
    threads may be running those neighbours.  Live patches are refused there
    (``UnsafePatchError``): the atomic store would make the page briefly
    non-executable.
Freeing
    The text is refilled with traps and its chunks return to the pack, quarantined
    until an epoch if the reservation is mapped.  A free while ``JitFunction`` calls
    are in flight marks the text FREED at once and leaves refill and quarantine to
    the last call that returns.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from execmem import _forks, _lookup, _publishing, _recipes, debuginfo
from execmem._backend import Backend, Reservation
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
from execmem._locks import OwnedLock, SetupLock
from execmem._names import check_name, check_names
from execmem._packs import PackPool
from execmem._text import JitFunction, JitText, TextState, check_bytes, check_int, make_cfunc
from execmem.arch import ArchSpec, Recipe

DEFAULT_PACK_SIZE = 2 * 1024 * 1024
DEFAULT_GRANULARITY = 64


@dataclass
class _Batch:
    texts: list[JitText] = field(default_factory=list)
    patches: list[tuple[JitText, int, bytes]] = field(default_factory=list)
    overlay: dict[JitText, bytearray] = field(default_factory=dict)
    depth: int = 0


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _positive(size: object) -> int:
    if check_int("size", size) <= 0:
        raise AlignmentError(f"size must be positive, not {size}")
    return cast(int, size)


def _positive_sizes(sizes: Iterable[int]) -> list[int]:
    """``sizes`` as a list, each checked as ``_positive`` does: as a whole first (two
    passes in C), one by one only when that fails, to raise for the first bad one."""
    wanted = list(sizes)
    if set(map(type, wanted)) <= {int} and (not wanted or min(wanted) > 0):
        return wanted
    return [_positive(size) for size in wanted]


class Allocator:
    """Owns packs of executable memory and hands out :class:`JitText` handles.

    ``backend``: where memory comes from (default ``execmem.native.NativeBackend()``,
    owned and closed by this allocator).  ``pack_size``: bytes per pack, a power of
    two and a multiple of the page size (default 2 MiB, the PMD size); the native
    backend maps a pack only as far as its texts need and grows it in place.
    ``granularity``: the chunk size texts are rounded to (default 64, as
    bpf_prog_pack).  ``keep_empty``: how many empty packs stay mapped for reuse.
    See the module docstring for the policies.

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
        _recipes: Mapping[str, Recipe] | None = None,
        _quarantine: bool = True,
    ) -> None:
        for name, value in (("pack_size", pack_size), ("granularity", granularity), ("keep_empty", keep_empty)):
            check_int(name, value)
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
        problems = []
        if not _pow2(granularity) or granularity < minimum:
            problems.append(f"granularity must be a power of two >= {minimum} on {spec.name}, not {granularity}")
        if not _pow2(pack_size) or pack_size < max(backend.page_size, granularity, unit):
            problems.append(
                f"pack_size must be a power of two >= the page size ({backend.page_size:#x}), "
                f"the granularity and the write unit, not {pack_size:#x}"
            )
        if keep_empty < 0:
            problems.append(f"keep_empty must be >= 0, not {keep_empty}")
        if _pow2(granularity) and unit > granularity and unit % granularity:
            problems.append(f"the backend's write unit {unit} is not a multiple of granularity {granularity}")
        recipes = dict(_recipes or {})
        for key, recipe in recipes.items():
            if key not in ("publish", "publish_fresh", "patch") or not isinstance(recipe, Recipe):
                problems.append(f"_recipes: {key!r} is not a publish/publish_fresh/patch Recipe")
        # A backend may bound one reservation (the native one: the machine's RAM): a
        # pack it would refuse is a clear error now, not at the first allocation.
        limit = getattr(backend, "max_reservation", None)
        too_big = isinstance(limit, int) and pack_size > limit
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
        self._owns_backend = owns
        self._recipes = recipes
        self._quarantine = bool(_quarantine)
        #: Chunks per write unit when the backend writes whole pages (mprotect), else 1.
        self._unit_chunks = unit // granularity if unit > granularity else 1
        self._lock = OwnedLock("the allocator")
        #: Guards the texts' counts of calls in flight (JitFunction) against free() and
        #: close().  Re-entrant: its sections are a few statements that a signal
        #: handler's own call (which completes before they resume) cannot upset.  A
        #: SetupLock, so a forked child calling an inherited function never waits for
        #: a parent thread that was counting its own call at the fork.
        self._calls_lock = SetupLock("the allocator's calls in flight")
        self._local = threading.local()
        self._generation = _forks.generation  # fork detection without a getpid per verb
        self._closed = False
        self._texts: set[JitText] = set()
        self._steps: Counter[str] = Counter()
        self._recipe_runs: Counter[str] = Counter()
        self._events: Counter[str] = Counter()
        self._pool = PackPool(
            backend,
            pack_size=pack_size,
            granularity=granularity,
            keep_empty=keep_empty,
            quarantine=self._quarantine,
            unit_chunks=self._unit_chunks,
            events=self._events,
        )
        try:
            self._debug = debuginfo.attach(spec, backend.mode, perf_map=perf_map, jitdump=jitdump, gdb=gdb)
        except BaseException:
            if owns:
                backend.close()
            raise
        _lookup.register(self)

    # -- plumbing ---------------------------------------------------------------------------

    def _check(self) -> None:
        if self._generation != _forks.generation:
            raise ForkedProcessError(
                "this allocator belongs to the parent process; create a new one in the forked child"
            )
        if self._closed:
            raise BadStateError("the allocator is closed")

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
        if text._state is TextState.FREED:
            raise UseAfterFreeError(f"{verb}: the text at {text.address:#x} has been freed")
        hint = {
            TextState.RESERVED: "write it, then map() (or map_rw_inplace(), write, finalize())",
            TextState.WRITING: "it is being written in place: finalize() it",
            TextState.LIVE: "it is live: use update() for a live patch, or publish a new text",
        }[text._state]
        raise BadStateError(f"{verb} is not allowed on a {text._state.name} text at {text.address:#x}: {hint}")

    @staticmethod
    def _not_pending(text: JitText, verb: str) -> None:
        if text._pending is not None:
            raise BadStateError(f"{verb}: the text at {text.address:#x} is queued for publishing in a batch")

    def _recipe(self, name: str) -> Recipe:
        return self._recipes.get(name) or self.arch.recipe(name)

    def _batch(self) -> _Batch | None:
        return getattr(self._local, "batch", None)

    def _trap(self, res: Reservation, offset: int, size: int) -> bytes:
        phase = offset % len(self.arch.trap_fill)
        return self.arch.trap_bytes(phase + size)[phase:]

    def _offset(self, text: JitText) -> int:
        return text.address - text._pack.reservation.address

    # -- allocation ---------------------------------------------------------------------------

    def jit_text_alloc(self, size: int, align: int = 16, *, name: str | None = None) -> JitText:
        """Reserve ``size`` bytes of executable address space aligned to ``align``;
        ``name`` is what profilers and debuggers will call it (``JitText.name``)."""
        if name is not None:
            check_name(name)
        check_int("size", size)
        check_int("align", align)
        if size <= 0:
            raise AlignmentError(f"size must be positive, not {size}")
        if not _pow2(align):
            raise AlignmentError(f"align must be a power of two, not {align}")
        with self._lock:
            self._check()
            text = self._alloc(size, align)
            if name is not None:
                text._name = name
            return text

    def _alloc(self, size: int, align: int) -> JitText:
        pack, index, count = self._pool.place(size, align)
        gran = self.granularity
        trap = self._trap(pack.reservation, index * gran, size)
        text = JitText(self, pack, index, count, pack.address + index * gran, size, trap)
        self._texts.add(text)
        return text

    def jit_text_alloc_many(
        self, sizes: Iterable[int], align: int = 16, *, names: Iterable[str | None] | None = None
    ) -> list[JitText]:
        """One text per size, as ``jit_text_alloc`` would give, but placed side by side:
        one placement and one bookkeeping update per pack instead of one per text (a
        JIT compiling a module of functions), and ``publish`` then writes adjacent
        texts with one store.  ``names``: one name (or ``None``) per size.  On any
        error nothing is allocated."""
        wanted = _positive_sizes(sizes)
        given = None if names is None else check_names(names, len(wanted))
        texts = self._alloc_many(wanted, align)
        if given is not None:
            for text, name in zip(texts, given, strict=True):
                if name is not None:
                    text._name = name
        return texts

    def _alloc_many(self, wanted: list[int], align: int) -> list[JitText]:
        check_int("align", align)
        if not _pow2(align):
            raise AlignmentError(f"align must be a power of two, not {align}")
        gran = self.granularity
        unit = max(align, gran)  # a text takes whole alignment steps in a run
        budget = self.pack_size // 2 // unit  # a run never exceeds what one text may take
        shared = self._pool.fits_in_a_pack(1, align)
        counts = [-(-size // gran) for size in wanted]  # chunks per text
        steps = counts if unit == gran else [-(-size // unit) for size in wanted]
        out: list[JitText] = []
        with self._lock:
            self._check()
            try:
                if shared and sum(steps) <= budget:  # the common case: one run
                    return self._alloc_run(wanted, counts, align)
                group: list[int] = []
                group_counts: list[int] = []
                used = 0
                for size, count, n in zip(wanted, counts, steps, strict=True):
                    if not shared or n > budget:
                        out.append(self._alloc(size, align))  # a dedicated reservation
                        continue
                    if used + n > budget:
                        out += self._alloc_run(group, group_counts, align)
                        group, group_counts, used = [], [], 0
                    group.append(size)
                    group_counts.append(count)
                    used += n
                if group:
                    out += self._alloc_run(group, group_counts, align)
            except BaseException:
                for text in out:
                    # Never published, so never fetched: free again without quarantine.
                    text._pack.chunks.release(text._chunk)
                    text._state = TextState.FREED
                    self._texts.discard(text)
                self._pool.trim_quietly()
                raise
        return out

    def _alloc_run(self, sizes: list[int], counts: list[int], align: int) -> list[JitText]:
        """Texts of ``sizes`` (``counts`` chunks each) side by side in one pack."""
        # What each text takes may be more than asked (whole write units, mprotect mode).
        pack, chunks, taken = self._pool.place_many(counts, max(1, align // self.granularity))
        # Chunks start on a whole trap instruction (the granularity is a multiple of its
        # length), so a text's initial (trap) contents depend on its size only.
        traps = {size: self._trap(pack.reservation, 0, size) for size in set(sizes)}
        texts = JitText._run(self, pack, chunks, taken, sizes, traps)
        self._texts.update(texts)
        return texts

    # -- writing ------------------------------------------------------------------------------

    def _write(self, text: JitText, offset: int, data: bytes) -> None:
        with self._lock:
            self._check()
            self._own(text)
            self._expect(text, TextState.RESERVED, TextState.WRITING, verb="write")
            self._not_pending(text, "write")
            self._store(text, offset, data)

    def _store(self, text: JitText, offset: int, data: bytes) -> None:
        if text._state is TextState.WRITING and data:
            self.backend.write(text._pack.reservation, self._offset(text) + offset, data)
        shadow = text._shadow
        if type(shadow) is not bytearray:  # shared immutable bytes: copy before writing
            shadow = text._shadow = bytearray(shadow)
        shadow[offset : offset + len(data)] = data
        text._staged = text._staged or bool(data)

    def _map_rw_inplace(self, text: JitText) -> None:
        with self._lock:
            self._check()
            self._own(text)
            self._expect(text, TextState.RESERVED, verb="map_rw_inplace")
            self._not_pending(text, "map_rw_inplace")
            pack, res = text._pack, text._pack.reservation
            offset = self._offset(text)
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
                    claim = (first, last - first)
            self.backend.begin_inplace(res, offset, text.size)
            try:
                if text._staged:
                    self.backend.write(res, offset, bytes(text._shadow))
            except BaseException:
                self.backend.end_inplace(res, offset, text.size)
                raise
            if claim is not None:
                pack.chunks.release(text._chunk)
                pack.chunks.take(*claim)
                text._chunk, text._nchunks = claim
            text._state = TextState.WRITING

    # -- publishing ---------------------------------------------------------------------------

    def _publish_one(self, text: JitText, *, inplace: bool) -> None:
        verb = "finalize" if inplace else "map"
        state = TextState.WRITING if inplace else TextState.RESERVED
        with self._lock:
            self._check()
            self._own(text)
            self._expect(text, state, verb=verb)
            self._not_pending(text, verb)
            batch = self._batch()
            if batch is not None:
                text._pending = "publish"
                batch.texts.append(text)
                return
            self._sync([text], [])

    def publish(self, texts: Iterable[JitText], codes: Iterable[bytes] | None = None) -> None:
        """Publish many RESERVED (staged) and WRITING (in-place) texts with one synchronization.

        ``codes``, if given, holds one bytes-like per text, written at its offset 0
        first (as ``text.write(0, code)``); checked in full before anything is written.
        """
        items, payloads = self._publishable(texts, codes)
        with self._lock:
            self._check()
            self._check_publish(items, payloads)
            if payloads is not None:
                self._stage_codes(items, payloads)
            if not items:
                return
            batch = self._batch()
            if batch is not None:
                for text in items:
                    text._pending = "publish"
                    batch.texts.append(text)
                return
            self._sync(items, [])

    def _stage_codes(self, items: list[JitText], payloads: list[bytes]) -> None:
        """``text.write(0, code)`` for each text, checked already.  A RESERVED text's
        staging buffer becomes the (immutable) code itself, or the code and the rest of
        the buffer: no copy into a bytearray (the hot path of a batch)."""
        reserved = TextState.RESERVED
        for text, code in zip(items, payloads, strict=True):
            if text._state is not reserved:
                self._store(text, 0, code)
            elif len(code) == text._size:
                text._shadow = code
                text._staged = True
            elif code:
                text._shadow = code + text._shadow[len(code) :]
                text._staged = True

    @staticmethod
    def _publishable(texts: Iterable[JitText], codes: Iterable[bytes] | None) -> tuple[list[JitText], list[bytes] | None]:
        items = list(texts)
        payloads = None if codes is None else [c if type(c) is bytes else check_bytes(c) for c in codes]
        if payloads is not None and len(payloads) != len(items):
            raise AlignmentError(f"publish: {len(items)} texts but {len(payloads)} codes")
        return items, payloads

    def _check_publish(self, items: list[JitText], payloads: list[bytes] | None) -> None:
        """Raise unless every text may be published (with its code): under the lock."""
        publishable = (TextState.RESERVED, TextState.WRITING)
        for text, code in zip(items, payloads or itertools.repeat(b""), strict=False):
            if (
                type(text) is not JitText
                or text._allocator is not self
                or text._state not in publishable
                or text._pending is not None
                or len(code) > text._size
            ):
                self._own(text)
                self._expect(text, *publishable, verb="publish")
                self._not_pending(text, "publish")
                raise OutOfBoundsError(f"publish: {len(code)} bytes of code for {text!r}")
        if len(set(items)) != len(items):
            twice = next(t for t, n in Counter(items).items() if n > 1)
            raise BadStateError(f"{twice!r} is listed twice")

    def _sync(self, texts: list[JitText], patches: list[tuple[JitText, int, bytes]]) -> None:
        """Run the recipes for ``texts`` (to LIVE) and ``patches`` (see ``_publishing``)."""
        _publishing.sync(self, texts, patches)

    # -- batches ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Allocator]:
        """Defer ``map``/``finalize``/``publish``/``update`` in this thread to one
        synchronization when the block exits; an exception cancels them all (the
        texts stay unpublished, the patches unapplied).  Nested blocks join the
        outermost."""
        with self._lock:
            self._check()
        current = self._batch()
        if current is not None:
            current.depth += 1
            try:
                yield self
            finally:
                current.depth -= 1
            return
        batch = _Batch()
        self._local.batch = batch
        try:
            yield self
        except BaseException:
            self._local.batch = None
            with self._lock:
                for text in batch.texts:
                    text._pending = None
            raise
        self._local.batch = None
        with self._lock:
            self._check()
            texts = [t for t in batch.texts if t._pending is not None and t._state is not TextState.FREED]
            patches = [p for p in batch.patches if p[0]._state is TextState.LIVE]
            if texts or patches:
                self._sync(texts, patches)

    # -- live patching ------------------------------------------------------------------------

    def _check_patch(self, text: JitText, shadow: bytes | bytearray, offset: int, data: bytes) -> None:
        _recipes.check_patch(self.arch, self.backend, text.address, shadow, offset, data)

    def _update(self, text: JitText, offset: int, data: bytes) -> None:
        with self._lock:
            self._check()
            self._own(text)
            self._expect(text, TextState.LIVE, verb="update")
            batch = self._batch()
            if batch is None:
                self._check_patch(text, text._shadow, offset, data)
                self._sync([], [(text, offset, data)])
                return
            overlay = batch.overlay.setdefault(text, bytearray(text._shadow))
            self._check_patch(text, overlay, offset, data)
            overlay[offset : offset + len(data)] = data
            batch.patches.append((text, offset, data))

    # -- calling ------------------------------------------------------------------------------

    def _function(self, text: JitText, restype: Any, argtypes: tuple[Any, ...], offset: int) -> JitFunction:
        with self._lock:
            self._check()
            self._own(text)
            self._expect(text, TextState.LIVE, verb="function")
            if self.backend.mode in ("emulated", "memory"):
                raise UnsupportedError(
                    f"the {self.backend.mode} backend's memory is not executable in this process; "
                    f"run the code on the backend instead (execmem.emu.Machine.call(t.address, ...))"
                )
            return JitFunction(text, make_cfunc(restype, argtypes, text.address + offset), text.address + offset)

    def _read(self, text: JitText) -> bytes:
        with self._lock:
            self._own(text)
            if text._state is TextState.FREED:
                raise UseAfterFreeError(f"read: the text at {text.address:#x} has been freed")
            return bytes(text._shadow)

    # -- freeing ------------------------------------------------------------------------------

    def _free(self, text: JitText) -> None:
        with self._lock:
            self._check()
            self._own(text)
            if text._state is TextState.FREED:
                raise UseAfterFreeError(f"free: the text at {text.address:#x} has already been freed")
            previous = text._state
            with self._calls_lock:
                deferred = text._inflight > 0
                text._state = TextState.FREED
                text._freed_from = previous
                text._reclaim_pending = deferred
            text._pending = None
            batch = self._batch()
            if batch is not None:
                batch.patches = [p for p in batch.patches if p[0] is not text]
                batch.overlay.pop(text, None)
            self._events["freed"] += 1
            if deferred:
                self._events["frees_deferred"] += 1
                return
            try:
                self._reclaim(text, previous)
            except BaseException:
                text._state = previous
                self._events["freed"] -= 1
                raise
            if self._debug is not None:
                self._debug.freed(text)
            self._pool.trim_quietly()

    def _finish_deferred_free(self, text: JitText) -> None:
        """The last in-flight call of a freed text returned: refill and quarantine now."""
        with self._lock:
            if self._closed or self._generation != _forks.generation or text not in self._texts:
                return
            try:
                self._reclaim(text, text._freed_from)
            except ExecmemError:
                self._events["deferred_free_errors"] += 1
                return
            if self._debug is not None:
                self._debug.freed(text)  # only now: the code ran until the last call returned
            self._pool.trim_quietly()

    def _reclaim(self, text: JitText, previous: TextState) -> None:
        pack, res = text._pack, text._pack.reservation
        offset = self._offset(text)
        if previous is TextState.WRITING:
            self.backend.end_inplace(res, offset, text.size)
        if previous in (TextState.WRITING, TextState.LIVE):
            try:
                self.backend.write(res, offset, self._trap(res, offset, text.size))
            except BaseException:
                # The refill may have failed after storing the traps (mprotect mode:
                # execute permission not restored): put the code back, best effort, so
                # the text is still what its state says and its page executable again.
                with contextlib.suppress(ExecmemError):
                    self.backend.write(res, offset, bytes(text._shadow))
                if previous is TextState.WRITING:
                    self.backend.begin_inplace(res, offset, text.size)
                raise
        # Another CPU may hold instructions fetched from here: reuse after an epoch.
        self._pool.free(pack, text._chunk)
        self._texts.discard(text)
        text._shadow = b""

    # -- reporting ----------------------------------------------------------------------------

    def text_at(self, address: int) -> JitText | None:
        """The text (in any state but FREED) whose bytes hold ``address``, or ``None``
        (also once closed); cheap, from any thread (``_lookup``)."""
        check_int("address", address)
        if self._generation != _forks.generation:
            raise ForkedProcessError("this allocator belongs to the parent process")
        return self._text_at(address)

    def _text_at(self, address: int) -> JitText | None:
        with self._lock:
            if self._closed or self._generation != _forks.generation:
                return None
            return _lookup.find(self, address)

    def stats(self) -> dict[str, object]:
        """What the allocator holds and did (and ``backend.stats()`` under ``"backend"``)."""
        with self._lock:
            if self._generation != _forks.generation:
                raise ForkedProcessError("this allocator belongs to the parent process")
            pool = self._pool
            packs = pool.describe()
            keys = ("size", "capacity", "live_bytes", "free_bytes", "quarantined_bytes")
            names = {"size": "reserved_bytes", "capacity": "capacity_bytes"}
            totals: dict[str, object] = {"packs": len(packs)}
            for key in keys:
                totals[names.get(key, key)] = sum(cast(int, p[key]) for p in packs)
            by_state = Counter(t.state.name for t in self._texts)
            texts = {s.name: by_state[s.name] for s in TextState if s is not TextState.FREED}
            texts["FREED"] = self._events["freed"]
            return {
                "arch": self.arch.name,
                "mode": self.backend.mode,
                "granularity": self.granularity,
                "pack_size": self.pack_size,
                "write_unit": self.backend.write_unit,
                "keep_empty": self.keep_empty,
                "quarantine": self._quarantine,
                "closed": self._closed,
                "packs": packs,
                "totals": totals,
                "texts": texts,
                "epochs": {"started": pool.started, "completed": pool.completed, "forced": pool.forced},
                "steps": dict(self._steps),
                "recipes": dict(self._recipe_runs),
                "events": dict(self._events),
                "backend": dict(self.backend.stats()),
                "debuginfo": {} if self._debug is None else self._debug.describe(),
            }

    def occupancy(self) -> list[dict[str, object]]:
        """Per pack: address, size, granularity, flags and ``runs``, the chunk states
        run-length encoded as ``[(state, chunks), ...]`` with states live/free/quarantined."""
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
            with self._calls_lock:
                running = sum(t._inflight for t in self._texts)
                if running:
                    raise BadStateError(
                        f"close: {running} call(s) through function() are still running; close after they return"
                    )
                self._closed = True
                for text in self._texts:
                    text._state = TextState.FREED
            self._texts.clear()
            if self._debug is not None:
                self._debug.close()  # before the memory goes: GDB forgets the texts first
            first = self._pool.close()
            if self._owns_backend:
                try:
                    self.backend.close()
                except ExecmemError as exc:
                    first = first or exc
            if first is not None:
                raise first

    def __enter__(self) -> Allocator:
        self._check()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._pool.packs)} packs, {len(self._texts)} texts"
        return f"<execmem.Allocator {self.arch.name} {self.backend.mode}: {state}>"


__all__ = ["DEFAULT_GRANULARITY", "DEFAULT_PACK_SIZE", "Allocator"]
