"""Packs of executable address space: placement, quarantine epochs, retirement.

:class:`PackPool` owns every reservation of one allocator and the two epoch
counters.  It knows nothing about texts' contents or states; the allocator
(``_allocator``) calls it under its lock.

Placement
    First fit over the packs in the order they were reserved, honouring the
    alignment (in chunks).  A request whose footprint exceeds half a pack, or whose
    alignment exceeds a pack, gets a dedicated reservation: above that size a pack
    would mostly hold one text anyway, and a big text would keep a whole pack from
    ever returning to the system.  With a coarse write unit (``unit_chunks > 1``,
    mprotect mode) a request placed in a *mapped* pack takes whole write units.
Growth
    A pack is a ``pack_size`` slot (2 MiB: PMD-aligned, so a full pack can be a
    large page) of which only a prefix is mapped at first: what the first request
    needs, rounded up to ``COMMIT_STEP``.  When nothing fits, a pack that can still
    grow is extended in place just enough (``Backend.grow``: fresh trap-filled
    addresses joined to the same VMA) before any other remedy, so N small texts cost
    about N chunks of address space and memory, not a whole pack from the first
    one.  If the addresses after a pack are taken, it keeps its size.
Epochs
    ``started``/``completed`` count the ``remote_cse`` steps run through
    :meth:`PackPool.remote_cse`.  Chunks freed from a mapped reservation are stamped
    with ``started`` and become free again once ``completed > stamp``: every thread
    has then taken a context-synchronization event since the free (seeds/000: stale
    in-flight instructions survive TLB and cache maintenance until a CSE).  When a
    request fits only in quarantined space, one epoch is forced rather than a new
    pack reserved.
Retirement
    At most ``keep_empty`` empty packs stay.  An extra empty pack that is mapped is
    unmapped (the VA stays reserved) and quarantined as a whole; after an epoch it
    is reused as a fresh pack, and released at the next epoch if nobody needed it.
    Unmapped empty packs are released at once (nothing could have fetched from them).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from execmem._backend import Backend, Range, Reservation
from execmem._chunks import LIVE, QUARANTINED, ChunkMap
from execmem._errors import ExecmemError

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

    # -- placement ------------------------------------------------------------------------

    def layout(self, mapped: bool, counts: list[int], step: int) -> tuple[list[int], list[int], int, int]:
        """Allocations of ``counts`` chunks side by side in a pack (``mapped`` or not):
        their offsets from the run's start and chunk counts, the run's length and its
        alignment step.  (Lists of ints, not of tuples: a run may hold thousands, and
        ints are not tracked by the garbage collector.)"""
        u = self.unit_chunks
        coarse = u > 1 and mapped
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

    def _find(self, counts: list[int], step: int, packs: list[Pack]) -> tuple[Pack, list[int], list[int]] | None:
        shapes: dict[bool, tuple[list[int], list[int], int, int]] = {}
        for pack in packs:
            if pack.dedicated:
                continue
            key = pack.reservation.mapped
            if key not in shapes:
                shapes[key] = self.layout(key, counts, step)
            offsets, shaped, total, s = shapes[key]
            index = pack.chunks.find(total, s)
            if index is not None:
                return pack, list(map(index.__add__, offsets)), shaped
        return None

    def _quarantine_would_do(self, counts: list[int], step: int) -> bool:
        if any(not p.dedicated for p in self.retired):
            return True
        for pack in self.packs:
            if pack.dedicated or not pack.chunks.quarantined:
                continue
            _, _, total, s = self.layout(pack.reservation.mapped, counts, step)
            if pack.chunks.find(total, s, among=pack.chunks.free | pack.chunks.quarantined) is not None:
                return True
        return False

    def _grow_into(self, counts: list[int], step: int) -> tuple[Pack, list[int], list[int]] | None:
        """Extend a pack that has room to grow just enough (in steps of ``COMMIT_STEP``) for
        the run after its last allocation, and place the run there."""
        gran = self.granularity
        for pack in self.packs:
            res = pack.reservation
            if pack.dedicated or res.size >= res.capacity:
                continue
            _, _, total, s = self.layout(res.mapped, counts, step)
            chunks = pack.chunks
            first = -(-(chunks.n - chunks.trailing_free) // s) * s
            want = (first + total) * gran
            if want > res.capacity:
                continue
            if not self.backend.grow(res, min(res.capacity, -(-want // self.commit_step) * self.commit_step)):
                continue  # the addresses after the pack are taken: it keeps its size
            chunks.grow(res.size // gran)
            self.events["packs_grown"] += 1
            hit = self._find(counts, step, [pack])
            if hit is not None:
                return hit
        return None

    def _adopt_retired(self) -> Pack | None:
        """A matured retired pack, made a fresh (unmapped, empty) pack again."""
        for pack in self.retired:
            if not pack.dedicated and pack.matured_at is not None:
                self.retired.remove(pack)
                pack.retired_stamp = pack.matured_at = None
                pack.chunks.reset()
                self.packs.append(pack)
                self.events["packs_reused"] += 1
                return pack
        return None

    def fits_in_a_pack(self, size: int, align: int) -> bool:
        """Whether ``size`` bytes at ``align`` share packs (else: a dedicated reservation)."""
        return -(-size // self.granularity) * self.granularity <= self.pack_size // 2 and align <= self.pack_size

    def place(self, size: int, align: int) -> tuple[Pack, int, int]:
        """Take chunks for ``size`` bytes at ``align``: (pack, first chunk, chunk count)."""
        gran = self.granularity
        count = -(-size // gran)
        if not self.fits_in_a_pack(size, align):
            res = self.backend.reserve(count * gran, max(align, gran))
            pack = Pack(res, ChunkMap(res.size // gran), dedicated=True)
            self.packs.append(pack)
            self.events["dedicated_reserved"] += 1
            pack.chunks.take(0, count)
            return pack, 0, count
        pack, starts, counts = self.place_many([count], max(1, align // gran))
        return pack, starts[0], counts[0]

    def place_many(self, counts: list[int], step: int) -> tuple[Pack, list[int], list[int]]:
        """Take side-by-side chunks in one pack for allocations of ``counts`` chunks, each
        aligned to ``step`` chunks: (pack, first chunks, chunk counts).  The caller
        keeps the run within half a pack (``fits_in_a_pack``)."""
        hit = self._find(counts, step, self.packs) or self._grow_into(counts, step)
        if hit is None:
            adopted = self._adopt_retired()
            if adopted is None and self.quarantine and self._quarantine_would_do(counts, step):
                # Reuse quarantined space after one epoch rather than reserve a new pack.
                self.forced += 1
                self.remote_cse([])
                hit = self._find(counts, step, self.packs)
                adopted = None if hit is not None else self._adopt_retired()
            if hit is None and adopted is not None:
                hit = self._find(counts, step, [adopted])
        if hit is None:
            total = self.layout(False, counts, step)[2] * self.granularity
            first = min(self.pack_size, -(-total // self.commit_step) * self.commit_step)
            res = self.backend.reserve(first, self.pack_size, self.pack_size)
            pack = Pack(res, ChunkMap(res.size // self.granularity), dedicated=False)
            self.packs.append(pack)
            self.events["packs_reserved"] += 1
            hit = self._find(counts, step, [pack])
            assert hit is not None
        pack, starts, taken = hit
        if len(starts) == 1:
            pack.chunks.take(starts[0], taken[0])
        else:
            pack.chunks.take_many(starts, taken)
        return hit

    def free(self, pack: Pack, first: int) -> None:
        """Return an allocation; quarantined if its reservation may have been executed."""
        count = pack.chunks.release(first)
        if self.quarantine and pack.reservation.mapped:
            pack.chunks.quarantine(first, count, self.started)

    # -- epochs -----------------------------------------------------------------------------

    def remote_cse(self, ranges: list[Range]) -> None:
        """One synchronization epoch: every thread passes a context-synchronization event."""
        self.started += 1
        mine = self.started
        self.backend.run_step("remote_cse", ranges)
        self.completed = max(self.completed, mine)
        self._mature()

    def _mature(self) -> None:
        completed = self.completed
        for pack in self.packs:
            if pack.chunks.quarantined:
                pack.chunks.mature(completed)
        for pack in list(self.retired):
            if pack.matured_at is None:
                if pack.retired_stamp is not None and completed > pack.retired_stamp:
                    pack.matured_at = completed
                    if pack.dedicated:
                        self._release_quietly(pack)
            elif completed > pack.matured_at:
                # Matured one epoch ago and not reused since: return it to the system.
                self._release_quietly(pack)

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
        res = pack.reservation
        if not res.mapped:
            self.release(pack)  # never executable (or already unmapped): nothing to wait for
            return
        self.backend.unmap(res)
        self.events["packs_unmapped"] += 1
        self.packs.remove(pack)
        pack.chunks.reset()
        pack.retired_stamp = self.started
        # Without quarantine the VA may be mapped again at once (verification mutation).
        pack.matured_at = None if self.quarantine else self.completed
        self.retired.append(pack)

    def close(self) -> ExecmemError | None:
        """Release every reservation; returns the first error (after trying them all)."""
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

    def describe(self) -> list[dict[str, object]]:
        gran = self.granularity
        out: list[dict[str, object]] = []
        for pack, retired in self.rows():
            size = pack.chunks.n * gran
            if retired:
                live, quarantined = 0, size
            else:
                live = pack.chunks.count(LIVE) * gran
                quarantined = pack.chunks.count(QUARANTINED) * gran
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
                }
            )
        return out

    def occupancy(self) -> list[dict[str, object]]:
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
                }
            )
        return out


__all__ = ["COMMIT_STEP", "Pack", "PackPool"]
