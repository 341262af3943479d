"""Chunk bookkeeping for one pack: bit vectors kept outside executable memory.

A pack is carved into ``n`` chunks of the allocator's granularity.  As asmjit's
``JitAllocator`` does, two bit vectors describe the allocations:

* ``used``: bit ``i`` set when chunk ``i`` belongs to a text (any state but freed);
* ``stop``: bit ``i`` set on the *last* chunk of each allocation, so that freeing
  needs only the first chunk index (the size is recovered by scanning to the stop).

A third vector, ``quarantined``, holds chunks that were freed but whose virtual
addresses must not be handed out again before a synchronization epoch completes
(see ``_packs``: another CPU may still hold instructions fetched from them).  They
are grouped by the epoch stamp of their free, one mask per stamp, in stamp order, so
a free and the maturing of a whole epoch's frees each cost one update.  A fourth,
``dirty``, holds freed chunks whose memory has not been refilled with traps yet
(``_packs`` refills them in batches, before they are handed out again).

Free chunks are ``~(used | quarantined | dirty)``; neighbouring free chunks merge by
construction.

Every update replaces the vectors it changes in one assignment statement, so an
asynchronous exception (``_interrupts``) sees the map either before or after it;
:meth:`ChunkMap.snapshot` and :meth:`ChunkMap.restore` let a verb undo its updates.  Python integers serve as bit vectors: a first-fit search for ``k``
consecutive free chunks is ``O(log k)`` shifts and ands over the whole vector (the
classic doubling trick), which for a 2 MiB pack of 64-byte chunks (32768 bits) is a
few microseconds.

Everything here is pure: no I/O, no knowledge of addresses or architectures.
"""

from __future__ import annotations

from functools import lru_cache

#: Chunk states reported by :meth:`ChunkMap.states` / :meth:`ChunkMap.runs`.
LIVE, FREE, QUARANTINED = "live", "free", "quarantined"
_STATE_CHAR = {LIVE: "L", FREE: ".", QUARANTINED: "q"}


@lru_cache(maxsize=256)
def every(step: int, nbits: int) -> int:
    """Bits 0, step, 2*step, ... below ``nbits`` set."""
    if step <= 1:
        return (1 << nbits) - 1
    count = -(-nbits // step)
    # sum_{j<count} 2^(j*step) == (2^(count*step) - 1) / (2^step - 1)
    return (((1 << (count * step)) - 1) // ((1 << step) - 1)) & ((1 << nbits) - 1)


@lru_cache(maxsize=1024)
def _bits(gap: int, count: int, stop: bool) -> str:
    """``gap`` clear bits, then ``count`` chunks: all set, or only the last (``stop``)."""
    return "0" * gap + ("0" * (count - 1) + "1" if stop else "1" * count)


def _lowest(bits: int) -> int:
    """Index of the lowest set bit of a non-zero ``bits``."""
    return (bits & -bits).bit_length() - 1


def run_starts(bits: int, length: int) -> int:
    """Positions ``i`` such that bits ``i .. i+length-1`` are all set in ``bits``."""
    if length <= 0:
        raise ValueError("run length must be positive")
    result = -1  # all ones: neutral for &
    result_len = 0
    cur, cur_len = bits, 1
    remaining = length
    while remaining:
        if remaining & 1:
            result = cur if result_len == 0 else result & (cur >> result_len)
            result_len += cur_len
        remaining >>= 1
        if remaining:
            cur &= cur >> cur_len
            cur_len *= 2
    return result


class ChunkMap:
    """Allocation state of ``n`` chunks (see the module docstring)."""

    def __init__(self, n: int, *, window: int = 1024) -> None:
        if n <= 0:
            raise ValueError("a chunk map needs at least one chunk")
        self.n = n
        self._all = (1 << n) - 1
        self.used = 0
        self.stop = 0
        self.quarantined = 0
        self.dirty = 0
        #: ``(stamp, mask)`` of quarantined chunks, one entry per stamp, oldest first.
        self._stamps: tuple[tuple[int, int], ...] = ()
        #: Every chunk below ``_hint`` is busy (a lower bound, as asmjit's search hints):
        #: ``find`` first looks at ``window`` chunks from there, with small integers,
        #: before it searches the whole vector.
        self._hint = 0
        self._window = window

    # -- queries -------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Chunks that may not be handed out: used, quarantined or not yet refilled."""
        return self.used | self.quarantined | self.dirty

    @property
    def free(self) -> int:
        return self._all & ~self.busy

    @property
    def held(self) -> int:
        """Freed chunks not free yet: quarantined, or waiting for their refill."""
        return (self.quarantined | self.dirty) & ~self.used

    def count(self, state: str) -> int:
        """Chunks in a reported state (a chunk whose refill is pending is reported free:
        it is handed out once refilled; only the quarantine holds chunks back)."""
        if state == LIVE:
            return self.used.bit_count()
        if state == QUARANTINED:
            return (self.quarantined & ~self.used).bit_count()
        if state == FREE:
            return (self._all & ~(self.used | self.quarantined)).bit_count()
        raise ValueError(f"unknown chunk state {state!r}")

    @property
    def trailing_free(self) -> int:
        """Free chunks after the last busy one."""
        return self.n - self.busy.bit_length()

    @property
    def empty(self) -> bool:
        """No chunk belongs to a text (freed chunks may remain)."""
        return self.used == 0

    def state(self, index: int) -> str:
        """The reported state of chunk ``index`` (see :meth:`count`)."""
        bit = 1 << index
        if self.used & bit:
            return LIVE
        if self.quarantined & bit:
            return QUARANTINED
        return FREE

    def find(self, count: int, step: int = 1, *, among: int | None = None, within: int | None = None) -> int | None:
        """First index ``i`` (a multiple of ``step``) where ``count`` chunks are free.

        ``among`` replaces the free vector (e.g. free | quarantined, to ask whether
        quarantined space would do); ``within`` masks the candidates further.
        """
        if count <= 0 or count > self.n:
            return None
        if among is None and within is None:
            found = self._find_near_hint(count, step)
            if found is not None:
                return found
        bits = self.free if among is None else among & self._all
        if within is not None:
            bits &= within
        starts = run_starts(bits, count) & every(step, self.n)
        # A run must end inside the map: starts beyond n - count are impossible anyway
        # because bits above n are clear, but keep the mask explicit.
        starts &= (1 << (self.n - count + 1)) - 1
        if not starts:
            return None
        return (starts & -starts).bit_length() - 1

    def _find_near_hint(self, count: int, step: int) -> int | None:
        """First fit inside the window at the hint (which is then the global first fit:
        nothing below the hint is free), or None to search everything."""
        lo = self._hint - self._hint % step
        width = min(max(self._window, 2 * (count + step)), self.n - lo)  # a small map: all of it
        if width < count:
            return None
        mask = (1 << width) - 1
        free = ~(self.busy >> lo) & mask
        if not free:
            self._hint = max(self._hint, lo + width)
            return None
        starts = run_starts(free, count) & every(step, width) & ((1 << (width - count + 1)) - 1)
        if not starts:
            return None
        return lo + (starts & -starts).bit_length() - 1

    def span_of(self, start: int) -> int:
        """Length of the allocation that starts at chunk ``start``."""
        bit = 1 << start
        if not self.used & bit:
            raise ValueError(f"chunk {start} is not allocated")
        if start and self.used & (bit >> 1) and not self.stop & (bit >> 1):
            raise ValueError(f"chunk {start} is inside an allocation, not at its start")
        above = self.stop >> start
        if not above:
            raise ValueError(f"allocation at chunk {start} has no stop bit")
        return (above & -above).bit_length()

    def is_free(self, start: int, count: int) -> bool:
        if start < 0 or count < 0 or start + count > self.n:
            return False
        return not (self.busy >> start) & ((1 << count) - 1)

    # -- updates (each one assignment statement: see the module docstring) ---------------

    def take(self, start: int, count: int) -> None:
        """Mark ``count`` free chunks from ``start`` as one allocation."""
        if not self.is_free(start, count):
            raise ValueError(f"chunks [{start}, {start + count}) are not all free")
        hint = start + count if start <= self._hint < start + count else self._hint
        self.used, self.stop, self._hint = (
            self.used | ((1 << count) - 1) << start,
            self.stop | 1 << (start + count - 1),
            hint,
        )

    def take_many(self, starts: list[int], counts: list[int]) -> None:
        """Mark several allocations (``starts[i]``, ``counts[i]``) at once, sorted and
        disjoint, all inside one free run: one update of each vector instead of one
        per allocation."""
        if len(starts) != len(counts):
            raise ValueError("one count per start")
        if not starts:
            return
        lo = starts[0]
        hi = starts[-1] + counts[-1]
        if not self.is_free(lo, hi - lo):
            raise ValueError(f"chunks [{lo}, {hi}) are not all free")
        if len(starts) == hi - lo and counts.count(1) == len(counts):
            mask = ((1 << (hi - lo)) - 1) << lo  # one chunk each, no gaps: every bit set
            self.used, self.stop = self.used | mask, self.stop | mask
            return
        used: list[str] = []
        stop: list[str] = []
        pos = lo
        for start, count in zip(starts, counts, strict=True):
            if start < pos or count <= 0:
                raise ValueError("allocations must be sorted, disjoint and non-empty")
            used.append(_bits(start - pos, count, False))
            stop.append(_bits(start - pos, count, True))
            pos = start + count
        # Built as text in chunk order, read back reversed: bit i is character i.
        self.used, self.stop = (
            self.used | int("".join(used)[::-1], 2) << lo,
            self.stop | int("".join(stop)[::-1], 2) << lo,
        )

    def release(self, start: int, count: int | None = None, *, stamp: int | None = None, dirty: bool = False) -> int:
        """Free the allocation starting at ``start``, ``count`` chunks long (looked up
        when not given: the lookup is half the cost on a 2 MiB pack's bit vectors);
        returns its length in chunks.

        ``stamp``: quarantine the chunks until an epoch started after it completes.
        ``dirty``: their memory still holds code (``refilled`` clears it)."""
        if count is None:
            count = self.span_of(start)
        mask = ((1 << count) - 1) << start
        last = 1 << (start + count - 1)
        if self.used & mask != mask or not self.stop & last:
            raise ValueError(f"chunks [{start}, {start + count}) are not one allocation")
        stamps = self._stamped(stamp, mask)
        self.used, self.stop, self.quarantined, self.dirty, self._stamps, self._hint = (
            self.used ^ mask,  # the bits are set (checked above): XOR clears them, and costs a tenth of & ~
            self.stop ^ last,
            self.quarantined | mask if stamp is not None else self.quarantined,
            self.dirty | mask if dirty else self.dirty,
            stamps,
            min(self._hint, start),
        )
        return count

    def _stamped(self, stamp: int | None, mask: int) -> tuple[tuple[int, int], ...]:
        """The stamp list with ``mask`` quarantined under ``stamp`` (``None``: unchanged)."""
        stamps = self._stamps
        if stamp is None:
            return stamps
        if stamps and stamps[-1][0] == stamp:
            return (*stamps[:-1], (stamp, stamps[-1][1] | mask))
        return (*stamps, (stamp, mask))

    def shrink(self, start: int, keep: int, *, stamp: int | None = None, dirty: bool = False) -> int:
        """Keep the first ``keep`` chunks of the allocation at ``start`` and free the
        rest as :meth:`release` would; returns how many were freed."""
        count = self.span_of(start)
        if not 0 < keep <= count:
            raise ValueError(f"cannot keep {keep} of the {count} chunks at {start}")
        gone = count - keep
        if not gone:
            return 0
        mask = ((1 << gone) - 1) << (start + keep)
        stamps = self._stamped(stamp, mask)
        self.used, self.stop, self.quarantined, self.dirty, self._stamps, self._hint = (
            self.used & ~mask,
            self.stop & ~(1 << (start + count - 1)) | 1 << (start + keep - 1),
            self.quarantined | mask if stamp is not None else self.quarantined,
            self.dirty | mask if dirty else self.dirty,
            stamps,
            min(self._hint, start + keep),
        )
        return gone

    def quarantine(self, start: int, count: int, stamp: int) -> None:
        """Hold free chunks back until an epoch started after ``stamp`` completes."""
        mask = ((1 << count) - 1) << start
        if self.busy & mask:
            raise ValueError(f"chunks [{start}, {start + count}) are not free")
        stamps = self._stamps
        if stamps and stamps[-1][0] == stamp:
            stamps = (*stamps[:-1], (stamp, stamps[-1][1] | mask))
        else:
            stamps = (*stamps, (stamp, mask))
        self.quarantined, self._stamps = self.quarantined | mask, stamps

    def mature(self, completed: int) -> int:
        """Return to the free pool every quarantined chunk whose stamp is below
        ``completed`` (stamps are in order: only the oldest entries are looked at).

        Returns the number of chunks released from quarantine."""
        stamps = self._stamps
        done = 0
        for stamp, _ in stamps:
            if completed <= stamp:
                break
            done += 1
        if not done:
            return 0
        released = 0
        for _, mask in stamps[:done]:
            released |= mask
        self.quarantined, self._stamps, self._hint = (
            self.quarantined & ~released,
            stamps[done:],
            min(self._hint, _lowest(released)),
        )
        return released.bit_count()

    def dirty_runs(self, *, clean_units: int | None = None) -> list[tuple[int, int]]:
        """Runs ``(start, count)`` of chunks between which nothing is in use and that
        hold dirty chunks at both ends: what one refill write each may cover (free and
        quarantined chunks in between already hold traps).  ``clean_units``, a mask
        of chunks, limits them to where a write may go."""
        dirty = self.dirty if clean_units is None else self.dirty & clean_units
        runs: list[tuple[int, int]] = []
        used = self.used
        while dirty:
            start = (dirty & -dirty).bit_length() - 1
            above = used >> start
            # The run ends at the next used chunk (or the end of the map).
            limit = (above & -above).bit_length() - 1 + start if above else self.n
            inside = dirty & ((1 << limit) - 1)
            end = inside.bit_length()
            runs.append((start, end - start))
            dirty &= ~((1 << end) - 1)
        return runs

    def refilled(self, start: int, count: int) -> None:
        """The memory of ``count`` chunks from ``start`` holds traps again."""
        mask = ((1 << count) - 1) << start
        self.dirty, self._hint = self.dirty & ~mask, min(self._hint, start)

    def quarantine_stamps(self) -> list[tuple[int, int, int]]:
        """``(start, count, stamp)`` of every run of quarantined chunks of one stamp."""
        out: list[tuple[int, int, int]] = []
        for stamp, mask in self._stamps:
            while mask:
                start = (mask & -mask).bit_length() - 1
                above = ~(mask >> start)
                count = (above & -above).bit_length() - 1
                out.append((start, count, stamp))
                mask &= ~(((1 << count) - 1) << start)
        return out

    def grow(self, n: int) -> None:
        """Add free chunks at the end, up to ``n`` in all (the pack grew in place)."""
        if n < self.n:
            raise ValueError(f"a chunk map cannot shrink from {self.n} to {n} chunks")
        self.n, self._all = n, (1 << n) - 1

    def reset(self) -> None:
        """Everything free, no quarantine (a pack reused after an epoch and refilled)."""
        self.used, self.stop, self.quarantined, self.dirty, self._stamps, self._hint = 0, 0, 0, 0, (), 0

    def snapshot(self) -> tuple[object, ...]:
        """The allocation state, for :meth:`restore` (undoing a verb's updates)."""
        return (self.used, self.stop, self.quarantined, self.dirty, self._stamps, self._hint)

    def restore(self, snapshot: tuple[object, ...]) -> None:
        """Back to ``snapshot`` (idempotent).  Growth is not undone: chunks added since
        are free in the snapshot, as they were when they were added."""
        self.used, self.stop, self.quarantined, self.dirty, self._stamps, self._hint = snapshot  # type: ignore[assignment]

    # -- reporting -----------------------------------------------------------------------

    def states(self) -> str:
        """One character per chunk: ``L`` live, ``.`` free, ``q`` quarantined."""
        return "".join(_STATE_CHAR[state] * length for state, length in self.runs())

    def runs(self) -> list[tuple[str, int]]:
        """Run-length encoded chunk states, e.g. ``[("live", 3), ("free", 509)]``."""
        out: list[tuple[str, int]] = []
        index = 0
        while index < self.n:
            state = self.state(index)
            if state == LIVE:
                vec = self.used
            elif state == QUARANTINED:
                vec = self.quarantined & ~self.used
            else:
                vec = self._all & ~(self.used | self.quarantined)
            # Length of the run of set bits from index.
            above = ~(vec >> index)
            length = min((above & -above).bit_length() - 1, self.n - index)
            out.append((state, length))
            index += length
        return out


__all__ = ["FREE", "LIVE", "QUARANTINED", "ChunkMap", "every", "run_starts"]
