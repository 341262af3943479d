"""Packs of executable address space: placement, refill, quarantine epochs, retirement.

:class:`PackPool` owns every reservation of one allocator and the two epoch
counters.  It knows nothing about texts' states; the allocator (``_allocator``)
calls it under its lock, finds a place here and takes the chunks itself (so that it
can undo the taking, ``_interrupts``).

Placement
    First fit over the packs in the order they were reserved, honouring the
    alignment (in chunks).  A request whose footprint exceeds half a pack, or whose
    alignment exceeds a pack, gets a dedicated reservation: above that size a pack
    would mostly hold one text anyway, and a big text would keep a whole pack from
    ever returning to the system.  With a coarse write unit (``unit_chunks > 1``,
    mprotect mode) a request placed in a *mapped* pack takes whole write units.
    When nothing free fits, the remedies are tried in order of cost: refill freed
    chunks (below), grow a pack in place, adopt a retired pack, force one epoch
    (when quarantined space would do), reserve a new pack.  A request with a
    *window* (``near=``, ``_placement``) considers only the packs whose whole slot
    lies in it, and reserves its new pack there (``Backend.reserve(window=...)``).
Growth
    A pack is a ``pack_size`` slot (2 MiB: PMD-aligned, so a full pack can be a
    large page) of which only a prefix is mapped at first: what the first request
    needs, rounded up to ``COMMIT_STEP``.  A pack that can still grow is extended in
    place just enough (``Backend.grow``: fresh trap-filled addresses joined to the
    same VMA), so N small texts cost about N chunks of address space and memory,
    not a whole pack from the first one.  If the addresses after a pack are taken,
    it keeps its size.
Refill
    A free does not write: its chunks are marked *dirty* (their memory holds the freed
    code) in the same update that frees them.  :meth:`PackPool.refill` writes traps
    over a pack's dirty chunks, one write per run of chunks that holds no text (free
    and quarantined chunks between dirty ones already hold traps), in batches: at
    every epoch, for every free since the last one, and before any dirty chunk is
    handed out again (first fit counts dirty chunks as free and refills the pack when
    it picks one).  This keeps the design's promise at the granularity it already
    has: until the epoch after a free, another CPU may still run instructions it
    fetched from the freed text (seeds/000, the reason for the quarantine); the
    memory holding them until then adds nothing a raw pointer could not already
    meet.  From that epoch on, the freed address holds traps until it is reused;
    ``function()`` callables never enter a freed text (their call gate refuses).
    With a coarse write unit, a dirty chunk is refilled only while no text is in its
    write unit (the write makes the unit briefly non-executable): a free never stops
    a neighbour that is running, and its chunks keep the code until the unit's last
    text is gone.
Epochs
    ``started``/``completed`` count the ``remote_cse`` steps run through
    :meth:`PackPool.remote_cse`.  Chunks freed from a mapped reservation are stamped
    with ``started`` and become free again once ``completed > stamp``: every thread
    has then taken a context-synchronization event since the free (seeds/000: stale
    in-flight instructions survive TLB and cache maintenance until a CSE).  An epoch
    interrupted after it started leaves ``started > completed``; the next completes
    both.
Retirement
    At most ``keep_empty`` empty packs stay.  An extra empty pack that is mapped is
    unmapped (the VA stays reserved) and quarantined as a whole; after an epoch it
    is reused as a fresh pack, and released at the next epoch if nobody needed it.
    Unmapped empty packs are released at once (nothing could have fetched from them).

Every step that calls the backend to create, map, unmap or release memory runs with
its bookkeeping under :func:`~execmem._interrupts.uninterrupted`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TypedDict

from execmem._backend import Backend, Range, Reservation
from execmem._chunks import QUARANTINED, ChunkMap, every
from execmem._errors import ExecmemError, OutOfMemoryError
from execmem._interrupts import uninterrupted
from execmem._placement import Window, inside

#: How much a pack is mapped at a time (rounded up to the backend's page size): as
#: asmjit's default block size; small enough that a few texts cost little, large
#: enough that growing costs a system call per thousand small texts.
COMMIT_STEP = 64 << 10


@dataclass(eq=False)
class Pack:
    reservation: Reservation
    chunks: ChunkMap
    dedicated: bool
    #: Set while unmapped and waiting for an epoch (``None``: in use).
    retired_stamp: int | None = None
    #: ``completed`` when the retired pack matured (released one epoch later if unused).
    matured_at: int | None = None

    @property
    def address(self) -> int:
        return self.reservation.address


#: Where a request goes: the pack, each allocation's first chunk and chunk count.
Placement = tuple[Pack, list[int], list[int]]


class PackStats(TypedDict):
    """One pack in ``Allocator.stats()["packs"]``."""

    address: int
    size: int
    capacity: int
    mapped: bool
    dedicated: bool
    retired: bool
    live_bytes: int
    free_bytes: int
    #: Freed bytes waiting for an epoch.
    quarantined_bytes: int
    #: Of the free bytes, those freed whose trap refill comes before they are handed out.
    unfilled_bytes: int


class PackPool:
    """Every reservation of one allocator (see the module docstring)."""

    def __init__(
        self,
        backend: Backend,
        *,
        pack_size: int,
        granularity: int,
        keep_empty: int,
        quarantine: bool,
        unit_chunks: int,
        events: Counter[str],
    ) -> None:
        self.backend = backend
        self.pack_size = pack_size
        self.granularity = granularity
        self.keep_empty = keep_empty
        self.quarantine = quarantine
        self.unit_chunks = unit_chunks
        self.events = events
        self.commit_step = max(COMMIT_STEP, backend.page_size)
        self.packs: list[Pack] = []
        self.retired: list[Pack] = []
        self.started = 0
        self.completed = 0
        self.forced = 0
        #: False while a verb's frees are not committed (a batch's frees, before its
        #: synchronization): an epoch then leaves the refills to the verb's end, as an
        #: undone free must find its code where it was.
        self.refill_at_epoch = True

    # -- placement ------------------------------------------------------------------------

    def layout(self, mapped: bool, counts: list[int], step: int) -> tuple[list[int], list[int], int, int]:
        """Allocations of ``counts`` chunks side by side in a pack (``mapped`` or not):
        their offsets from the run's start and chunk counts, the run's length and its
        alignment step.  (Lists of ints, not of tuples: a run may hold thousands, and
        ints are not tracked by the garbage collector.)"""
        u = self.unit_chunks
        coarse = u > 1 and mapped
        if not coarse and len(counts) == 1:  # one allocation (the hot path)
            return [0], counts, counts[0], step
        s = max(step, u) if coarse else step
        if s == 1 and not coarse:  # side by side, no padding
            starts = list(itertools.accumulate(counts, initial=0))
            total = starts.pop()
            return starts, counts, total, 1
        offsets: list[int] = []
        shaped: list[int] = []
        offset = 0
        for count in counts:
            n = -(-count // u) * u if coarse else count
            offset = -(-offset // s) * s
            offsets.append(offset)
            shaped.append(n)
            offset += n
        return offsets, shaped, offset, s

    def _find(self, counts: list[int], step: int, packs: list[Pack]) -> Placement | None:
        """First fit, over free chunks and freed ones whose refill may be written now
        (which it then is, for the whole pack: one batch)."""
        shapes: dict[bool, tuple[list[int], list[int], int, int]] = {}
        for pack in packs:
            if pack.dedicated:
                continue
            key = pack.reservation.mapped
            if key not in shapes:
                shapes[key] = self.layout(key, counts, step)
            offsets, shaped, total, s = shapes[key]
            chunks = pack.chunks
            among = None
            if chunks.dirty:
                among = chunks.free | chunks.dirty & ~chunks.quarantined & self._refillable(pack)
            index = chunks.find(total, s, among=among)
            if index is not None:
                if among is not None and chunks.dirty & (((1 << total) - 1) << index):
                    self.refill(pack)
                return pack, list(map(index.__add__, offsets)), shaped
        return None

    def _quarantine_would_do(self, counts: list[int], step: int, packs: list[Pack], window: Window | None) -> bool:
        if any(not p.dedicated and self.in_window(p, window) for p in self.retired):
            return True
        for pack in packs:
            if pack.dedicated or not pack.chunks.quarantined:
                continue
            _, _, total, s = self.layout(pack.reservation.mapped, counts, step)
            if pack.chunks.find(total, s, among=pack.chunks.free | pack.chunks.held) is not None:
                return True
        return False

    def _grow_into(self, counts: list[int], step: int, packs: list[Pack]) -> Placement | None:
        """Extend a pack that has room to grow just enough (in steps of ``COMMIT_STEP``) for
        the run after its last allocation, and place the run there."""
        gran = self.granularity
        for pack in packs:
            res = pack.reservation
            if pack.dedicated or res.size >= res.capacity:
                continue
            _, _, total, s = self.layout(res.mapped, counts, step)
            chunks = pack.chunks
            first = -(-(chunks.n - chunks.trailing_free) // s) * s
            want = (first + total) * gran
            if want > res.capacity:
                continue
            if not uninterrupted(self._grow, pack, min(res.capacity, -(-want // self.commit_step) * self.commit_step)):
                continue  # the addresses after the pack are taken: it keeps its size
            hit = self._find(counts, step, [pack])
            if hit is not None:
                return hit
        return None

    def _grow(self, pack: Pack, size: int) -> bool:
        res = pack.reservation
        if not self.backend.grow(res, size):
            return False
        pack.chunks.grow(res.size // self.granularity)
        self.events["packs_grown"] += 1
        return True

    def _adopt_retired(self, window: Window | None) -> Pack | None:
        """A matured retired pack, refilled and made a fresh (unmapped, empty) pack again."""
        for pack in self.retired:
            if not pack.dedicated and pack.matured_at is not None and self.in_window(pack, window):
                uninterrupted(self._adopt, pack)
                return pack
        return None

    def _adopt(self, pack: Pack) -> None:
        self.refill(pack)  # unmapped: nothing can run there, every dirty chunk goes
        self.retired.remove(pack)
        pack.retired_stamp = pack.matured_at = None
        pack.chunks.reset()
        self.packs.append(pack)
        self.events["packs_reused"] += 1

    def fits_in_a_pack(self, size: int, align: int) -> bool:
        """Whether ``size`` bytes at ``align`` share packs (else: a dedicated reservation)."""
        return -(-size // self.granularity) * self.granularity <= self.pack_size // 2 and align <= self.pack_size

    def anchor(self) -> None:
        """Reserve an (empty, unmapped) pack if there is none and one may stay empty
        (``keep_empty``), so that data regions placed in reach of the packs are in reach
        of the texts to come: a new pack goes next to the previous one (the native
        backend's slots; ``near=`` otherwise)."""
        if self.keep_empty and not any(not p.dedicated for p in self.packs):
            uninterrupted(self._new_pack, self.commit_step, None)

    def peek(self, align: int, window: Window | None) -> int | None:
        """Where first fit would put one chunk at ``align`` now, placing nothing (a guess
        of the next text's address: ``compile_function`` assembles there first)."""
        step = max(1, align // self.granularity)
        for pack in self.packs:
            if not pack.dedicated and self.in_window(pack, window):
                index = pack.chunks.find(1, step)
                if index is not None:
                    return pack.address + index * self.granularity
        return None

    @staticmethod
    def in_window(pack: Pack, window: Window | None) -> bool:
        """Whether the pack's whole slot (what it may grow to) lies in ``window``."""
        return inside(window, pack.address, pack.reservation.capacity)

    def place(self, size: int, align: int, window: Window | None = None) -> Placement:
        """Where ``size`` bytes at ``align`` go (nothing is taken: see the module docstring)."""
        gran = self.granularity
        count = -(-size // gran)
        if not self.fits_in_a_pack(size, align):
            return uninterrupted(self._new_dedicated, count, max(align, gran), window), [0], [count]
        step = max(1, align // gran)
        if window is None and self.unit_chunks == 1:
            # The hot path: first fit among clean free chunks (what _find would find
            # first in a pack without freed chunks awaiting their refill).  A pack
            # that is not so ends it: _find's order is kept.
            for pack in self.packs:
                chunks = pack.chunks
                if pack.dedicated or chunks.dirty:
                    break
                index = chunks.find(count, step)
                if index is not None:
                    return pack, [index], [count]
        return self.place_many([count], step, window)

    def _reserve(self, size: int, align: int, capacity: int | None, window: Window | None) -> Reservation:
        if window is None:  # the calls as they were before windows (test doubles wrap them)
            return self.backend.reserve(size, align) if capacity is None else self.backend.reserve(size, align, capacity)
        res = self.backend.reserve(size, align, capacity, window=window)
        if not inside(window, res.address, res.capacity):  # a backend that ignored it
            self.backend.release(res)
            raise OutOfMemoryError(
                f"the {self.backend.mode} backend placed {res.capacity:#x} bytes at {res.address:#x}, "
                f"outside [{window[0]:#x}, {window[1]:#x})"
            )
        return res

    def _new_dedicated(self, count: int, align: int, window: Window | None) -> Pack:
        res = self._reserve(count * self.granularity, align, None, window)
        pack = Pack(res, ChunkMap(res.size // self.granularity), dedicated=True)
        self.packs.append(pack)
        self.events["dedicated_reserved"] += 1
        return pack

    def place_many(self, counts: list[int], step: int, window: Window | None = None) -> Placement:
        """Where side-by-side allocations of ``counts`` chunks go, each aligned to
        ``step`` chunks, in packs inside ``window`` if given.  The caller keeps the run
        within half a pack (``fits_in_a_pack``) and takes the chunks."""
        packs = self.packs if window is None else [p for p in self.packs if self.in_window(p, window)]
        hit = self._find(counts, step, packs) or self._grow_into(counts, step, packs)
        if hit is None:
            adopted = self._adopt_retired(window)
            if adopted is None and self.quarantine and self._quarantine_would_do(counts, step, packs, window):
                # Reuse quarantined space after one epoch rather than reserve a new pack.
                self.forced += 1
                self.remote_cse([])
                hit = self._find(counts, step, packs)
                adopted = None if hit is not None else self._adopt_retired(window)
            if hit is None and adopted is not None:
                hit = self._find(counts, step, [adopted])
        if hit is None:
            total = self.layout(False, counts, step)[2] * self.granularity
            first = min(self.pack_size, -(-total // self.commit_step) * self.commit_step)
            pack = uninterrupted(self._new_pack, first, window)
            hit = self._find(counts, step, [pack])
            assert hit is not None
        return hit

    def _new_pack(self, size: int, window: Window | None) -> Pack:
        res = self._reserve(size, self.pack_size, self.pack_size, window)
        pack = Pack(res, ChunkMap(res.size // self.granularity), dedicated=False)
        self.packs.append(pack)
        self.events["packs_reserved"] += 1
        return pack

    # -- freeing and refilling ----------------------------------------------------------------

    def free(self, pack: Pack, first: int, count: int, *, dirty: bool) -> None:
        """Return an allocation of ``count`` chunks (``dirty``: its memory holds code);
        quarantined if its reservation may have been executed.  One update of the
        chunk map."""
        stamp = self.started if self.quarantine and pack.reservation.mapped else None
        pack.chunks.release(first, count, stamp=stamp, dirty=dirty)

    def free_tail(self, pack: Pack, first: int, keep: int, *, dirty: bool) -> None:
        """Free all but the first ``keep`` chunks of an allocation (``JitText.shrink``),
        under the rules of :meth:`free`."""
        stamp = self.started if self.quarantine and pack.reservation.mapped else None
        pack.chunks.shrink(first, keep, stamp=stamp, dirty=dirty)

    def _refillable(self, pack: Pack) -> int:
        """Chunks whose refill may be written now: all, except with a coarse write unit
        in a mapped pack, where only units without a text qualify (the write makes its
        unit briefly non-executable)."""
        chunks = pack.chunks
        u = self.unit_chunks
        if u == 1 or not pack.reservation.mapped:
            return -1
        # Spread "the unit has a used chunk" over the unit: fold each unit's bits into
        # its first, keep the firsts, multiply them back across the unit.
        folded = chunks.used
        shift = 1
        while shift < u:
            folded |= folded >> shift
            shift *= 2
        return ~((folded & every(u, chunks.n)) * ((1 << u) - 1))

    def refill(self, pack: Pack) -> bool:
        """Write traps over ``pack``'s dirty chunks that may be written (see the module
        docstring); True if there were any."""
        chunks = pack.chunks
        res = pack.reservation
        refillable = self._refillable(pack)
        runs = chunks.dirty_runs(clean_units=None if refillable == -1 else refillable)
        gran = self.granularity
        trap = self.backend.arch.trap_bytes
        for start, count in runs:
            # Chunks start on a whole trap instruction: the filler depends on the length only.
            self.backend.write(res, start * gran, trap(count * gran))
            chunks.refilled(start, count)
        if runs:
            self.events["refills"] += 1
            self.events["refill_writes"] += len(runs)
        return bool(runs)

    # -- epochs -----------------------------------------------------------------------------

    def remote_cse(self, ranges: list[Range]) -> None:
        """One synchronization epoch: every thread passes a context-synchronization event."""
        self.started += 1
        mine = self.started
        self.backend.run_step("remote_cse", ranges)
        if mine > self.completed:
            self.completed = mine
        self._mature()

    def _mature(self) -> None:
        completed = self.completed
        for pack in self.packs:
            if pack.chunks.quarantined:
                pack.chunks.mature(completed)
            if pack.chunks.dirty and self.refill_at_epoch:
                self.refill_quietly(pack)
        for pack in list(self.retired):
            if pack.matured_at is None:
                if pack.retired_stamp is not None and completed > pack.retired_stamp:
                    pack.matured_at = completed
                    if pack.dedicated:
                        self._release_quietly(pack)
            elif completed > pack.matured_at:
                # Matured one epoch ago and not reused since: return it to the system.
                self._release_quietly(pack)

    def refill_quietly(self, pack: Pack) -> None:
        """The epoch's batch of refills: a refused write must not fail the publish or
        allocation that ran the epoch (the chunks wait for the next epoch or their reuse)."""
        try:
            self.refill(pack)
        except ExecmemError:
            self.events["refill_errors"] += 1

    def _release_quietly(self, pack: Pack) -> None:
        """Housekeeping inside an epoch: a refused release must not fail the publish or
        allocation that ran the epoch (the backend keeps what it could not release and
        tries again when it is closed)."""
        try:
            self.release(pack)
        except ExecmemError:
            self.events["release_errors"] += 1

    # -- retirement -------------------------------------------------------------------------

    def release(self, pack: Pack) -> None:
        uninterrupted(self._release, pack)

    def _release(self, pack: Pack) -> None:
        if pack in self.retired:
            self.retired.remove(pack)
        if pack in self.packs:
            self.packs.remove(pack)
        self.backend.release(pack.reservation)
        self.events["packs_released"] += 1

    def trim(self) -> None:
        """Keep at most ``keep_empty`` empty packs; retire the others."""
        empty = [p for p in self.packs if p.chunks.empty]
        for pack in [p for p in empty if p.dedicated]:
            self._retire(pack)
        regular = [p for p in empty if not p.dedicated]
        excess = len(regular) - self.keep_empty
        if excess > 0:
            # Unmapped ones go first (no TLB shootdown), then the highest addresses.
            victims = sorted(regular, key=lambda p: (p.reservation.mapped, -p.address))[:excess]
            for pack in victims:
                self._retire(pack)

    def trim_quietly(self) -> None:
        """:meth:`trim` after a free that succeeded: a refused unmap or release leaves
        the empty pack in place (tried again at the next trim) instead of making the
        free look failed."""
        try:
            self.trim()
        except ExecmemError:
            self.events["trim_errors"] += 1

    def _retire(self, pack: Pack) -> None:
        if not pack.reservation.mapped:
            self.release(pack)  # never executable (or already unmapped): nothing to wait for
            return
        uninterrupted(self._unmap_and_retire, pack)

    def _unmap_and_retire(self, pack: Pack) -> None:
        self.backend.unmap(pack.reservation)
        self.events["packs_unmapped"] += 1
        self.packs.remove(pack)
        pack.retired_stamp = self.started
        # Without quarantine the VA may be mapped again at once (verification mutation).
        pack.matured_at = None if self.quarantine else self.completed
        self.retired.append(pack)

    def close(self) -> ExecmemError | None:
        """Release every reservation; returns the first error (after trying them all)."""
        return uninterrupted(self._close)

    def _close(self) -> ExecmemError | None:
        first: ExecmemError | None = None
        for pack, _ in self.rows():
            try:
                self.backend.release(pack.reservation)
            except ExecmemError as exc:
                first = first or exc
        self.packs.clear()
        self.retired.clear()
        return first

    # -- reporting --------------------------------------------------------------------------

    def rows(self) -> list[tuple[Pack, bool]]:
        """Every pack (with whether it is retired), by address."""
        rows = [(p, False) for p in self.packs] + [(p, True) for p in self.retired]
        return sorted(rows, key=lambda row: row[0].address)

    def describe(self) -> list[PackStats]:
        gran = self.granularity
        out: list[PackStats] = []
        for pack, retired in self.rows():
            chunks = pack.chunks
            size = chunks.n * gran
            if retired:  # the whole pack waits for its epoch
                live, quarantined, unfilled = 0, size, 0
            else:
                live = chunks.used.bit_count() * gran
                quarantined = (chunks.quarantined & ~chunks.used).bit_count() * gran
                unfilled = (chunks.dirty & ~chunks.quarantined & ~chunks.used).bit_count() * gran
            out.append(
                {
                    "address": pack.address,
                    "size": size,
                    "capacity": pack.reservation.capacity,
                    "mapped": pack.reservation.mapped,
                    "dedicated": pack.dedicated,
                    "retired": retired,
                    "live_bytes": live,
                    "free_bytes": size - live - quarantined,
                    "quarantined_bytes": quarantined,
                    "unfilled_bytes": unfilled,
                }
            )
        return out

    def occupancy(self) -> list[dict[str, object]]:
        """See ``Allocator.occupancy``."""
        out: list[dict[str, object]] = []
        for pack, retired in self.rows():
            out.append(
                {
                    "address": pack.address,
                    "size": pack.chunks.n * self.granularity,
                    "capacity": pack.reservation.capacity,
                    "granularity": self.granularity,
                    "mapped": pack.reservation.mapped,
                    "dedicated": pack.dedicated,
                    "retired": retired,
                    "runs": [(QUARANTINED, pack.chunks.n)] if retired else pack.chunks.runs(),
                    # Chunks (bits) freed whose memory still holds code: refill pending.
                    "unfilled": pack.chunks.dirty,
                }
            )
        return out


__all__ = ["COMMIT_STEP", "Pack", "PackPool", "PackStats", "Placement"]
