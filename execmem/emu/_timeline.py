"""The machine's global timeline: one total order of memory events.

Every event that other CPUs can observe sits at an integer *position*:

* ``W``  a write leaving a store buffer (appended: positions only grow for writes),
* ``DC`` a data-cache clean to the point of unification of one line,
* ``IC`` an instruction-cache invalidation of one line (or of all lines), placed
  when the issuing CPU's DSB completes it,
* ``TLBI`` a TLB invalidation of one virtual page (or all), placed when it completes.

Position 0 is the initial state.  Reads and instruction fetches are not events:
a CPU performs them "just after" some position (its *view*), which may be in the
past, as in the view-based models of Arm (Pulte et al., PLDI 2019) - that is how
out-of-order and speculative execution shows up in a model whose CPUs run their
instructions in program order.  DC and IC may also be placed in the past (a DC is
not ordered after earlier reads by DMB LD, for instance); placing one there is only
allowed when it does not contradict a fetch already performed (see
``execmem.emu._semantics``).

Memory is a set of *granules* (4 bytes on arm64, 8 on x86-64): each aligned granule
is one location whose history is the sequence of writes covering it.  A cache *line*
groups granules for DC/IC (herd7's model puts every location on its own line; the
machine's default is the CPU's real line size).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

W, DC, IC, TLBI, INIT = "W", "DC", "IC", "TLBI", "INIT"
ALL_LINES = -1


@dataclass(frozen=True, slots=True)
class Event:
    """One timeline event.  ``addr`` is the first granule (W), the line (DC/IC) or -1."""

    kind: str
    cpu: int
    addr: int
    #: W: bytes written over ``span`` granules; other kinds: empty.
    data: bytes = b""
    #: W: bit i set when byte i of ``data`` is written (partial stores).
    mask: int = -1
    span: int = 0
    #: IC/TLBI: the only CPU it has completed for (-1: every CPU).
    page: int = -1
    note: str = ""

    def key(self) -> tuple[object, ...]:
        return (self.kind, self.cpu, self.addr, self.data, self.mask, self.span, self.page)


INITIAL = Event(INIT, -1, -1)


class Timeline:
    """An immutable timeline plus indices (rebuilt on insertion, extended on append)."""

    __slots__ = ("_key", "_values", "events", "granule", "initial", "line", "maint", "tlbis", "writes")

    def __init__(
        self,
        events: tuple[Event, ...],
        granule: int,
        line: int,
        initial: dict[int, bytes],
        *,
        writes: dict[int, tuple[int, ...]] | None = None,
        maint: dict[int, tuple[int, ...]] | None = None,
        tlbis: dict[int, tuple[int, ...]] | None = None,
    ) -> None:
        self.events = events
        self.granule = granule
        self.line = line
        #: Initial bytes of every granule that has any (others read as zero).
        self.initial = initial
        self._values: dict[int, tuple[bytes, ...]] = {}
        self._key: tuple[object, ...] | None = None
        if writes is None or maint is None or tlbis is None:
            writes, maint, tlbis = {}, {}, {}
            for pos, ev in enumerate(events):
                self._index(pos, ev, writes, maint, tlbis)
        self.writes = writes
        self.maint = maint
        #: TLBI positions by virtual page (-1: every page)
        self.tlbis = tlbis

    def _index(
        self,
        pos: int,
        ev: Event,
        writes: dict[int, tuple[int, ...]],
        maint: dict[int, tuple[int, ...]],
        tlbis: dict[int, tuple[int, ...]],
    ) -> None:
        if ev.kind == W:
            for k in range(ev.span):
                g = ev.addr + k * self.granule
                writes[g] = (*writes.get(g, ()), pos)
        elif ev.kind in (DC, IC):
            maint[ev.addr] = (*maint.get(ev.addr, ()), pos)
        elif ev.kind == TLBI:
            tlbis[ev.addr] = (*tlbis.get(ev.addr, ()), pos)

    # -- construction ------------------------------------------------------
    @classmethod
    def start(cls, granule: int, line: int, initial: dict[int, bytes]) -> Timeline:
        return cls((INITIAL,), granule, line, initial)

    def append(self, ev: Event) -> Timeline:
        pos = len(self.events)
        writes = dict(self.writes)
        maint = dict(self.maint)
        tlbis = dict(self.tlbis)
        self._index(pos, ev, writes, maint, tlbis)
        return Timeline(
            (*self.events, ev), self.granule, self.line, self.initial, writes=writes, maint=maint, tlbis=tlbis
        )

    def insert_after(self, pos: int, ev: Event) -> Timeline:
        """A timeline with ``ev`` at position ``pos + 1`` (later events shift by one)."""
        events = (*self.events[:pos + 1], ev, *self.events[pos + 1:])
        return Timeline(events, self.granule, self.line, self.initial)

    @property
    def end(self) -> int:
        return len(self.events) - 1

    def key(self) -> tuple[object, ...]:
        if self._key is None:
            self._key = tuple(ev.key() for ev in self.events)
        return self._key

    # -- per-granule history -------------------------------------------------
    def line_of(self, granule: int) -> int:
        return granule - granule % self.line

    def write_positions(self, granule: int) -> tuple[int, ...]:
        return self.writes.get(granule, ())

    def latest_write_at(self, granule: int, pos: int) -> int:
        """Position of the last write to ``granule`` at or before ``pos`` (0: initial)."""
        ws = self.writes.get(granule, ())
        i = bisect_right(ws, pos)
        return ws[i - 1] if i else 0

    def value_at(self, granule: int, pos: int) -> bytes:
        """The granule's bytes just after position ``pos``."""
        ws = self.writes.get(granule, ())
        i = bisect_right(ws, pos)
        values = self._values.get(granule)
        if values is None:
            values = self._history(granule, ws)
            self._values[granule] = values
        return values[i]

    def _history(self, granule: int, ws: tuple[int, ...]) -> tuple[bytes, ...]:
        size = self.granule
        current = bytearray(self.initial.get(granule, bytes(size)))
        out = [bytes(current)]
        for pos in ws:
            ev = self.events[pos]
            offset = granule - ev.addr
            chunk = ev.data[offset : offset + size]
            if ev.mask == -1:
                current[:] = chunk
            else:
                for b in range(size):
                    if ev.mask >> (offset + b) & 1:
                        current[b] = chunk[b]
            out.append(bytes(current))
        return tuple(out)

    # -- instruction-cache floors ------------------------------------------------
    def maintenance(self, line: int) -> tuple[int, ...]:
        """Positions of DC/IC events on ``line`` and of all-lines ICs, in order."""
        own = self.maint.get(line, ())
        every = self.maint.get(ALL_LINES, ())
        if not every:
            return own
        return tuple(sorted(own + every))

    def floor(self, granule: int, ic_pos: int, *, idc: bool) -> int:
        """Oldest write a fetch after the IC at ``ic_pos`` may still return.

        Arm's model (herd7 aarch64.cat, IC-ca): a fetch after a completed IC cannot
        read a write older than one that a DC cleaned before that IC; with
        CTR_EL0.IDC=1 no clean is needed, so every write before the IC counts.
        """
        if idc:
            return self.latest_write_at(granule, ic_pos)
        line = self.line_of(granule)
        last_dc = 0
        for pos in self.maint.get(line, ()):
            if pos >= ic_pos:
                break
            if self.events[pos].kind == DC:
                last_dc = pos
        return self.latest_write_at(granule, last_dc) if last_dc else 0

    def floor_before(self, granule: int, anchor: int, cpu: int, *, idc: bool) -> int:
        """The floor imposed on a fetch by ``cpu`` of ``granule`` placed just after
        ``anchor`` (an IC completed only for another CPU does not count)."""
        line = self.line_of(granule)
        latest_ic = 0
        for pos in self.maintenance(line):
            if pos > anchor:
                break
            event = self.events[pos]
            if event.kind == IC and event.page in (-1, cpu):
                latest_ic = pos
        return self.floor(granule, latest_ic, idc=idc) if latest_ic else 0
