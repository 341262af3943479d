"""Publishing: the recipes of one batch over texts and patch words, undoably.

:class:`Publisher` holds what publishing needs (the backend and its architecture, the
pack pool whose epochs ``remote_cse`` advances, and the counters it reports into) and
:meth:`Publisher.sync` is what ``map``, ``finalize``, ``publish``, ``update`` and the
end of a ``batch()`` run, under the allocator's lock: texts in address order are cut
into runs of adjacent texts that need the same work (``jit_text_alloc_many`` places
them so), each run written with one store, and touching runs maintained as one
address range; everything after the cut is decided per run, not per text (a batch may
hold thousands).  Patch words are composed in order.

Before it changes anything, ``sync`` registers how to undo all of it (``_interrupts``):
unpublished texts read as traps again, in-place texts are writable again, patched
words and shadows are restored, states are put back.  The undo is idempotent and
correct whatever part of the publish had happened, so it serves a failed system call
and an asynchronous exception alike.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from execmem import _recipes
from execmem._backend import Backend, Reservation
from execmem._interrupts import uninterrupted
from execmem._packs import PackPool
from execmem._text import JitText, TextState
from execmem.arch import ArchSpec

_address = operator.attrgetter("_address")
_RESERVED, _LIVE = TextState.RESERVED, TextState.LIVE


def _work(text: JitText) -> bool | None:
    """What publishing does to ``text``'s bytes: write them (True: staged), nothing
    (False: never written, memory holds the traps) or end in-place writing (None)."""
    return text._staged if text._state is _RESERVED else None


def runs_of(texts: list[JitText]) -> list[list[JitText]]:
    """``texts`` cut into runs of texts side by side in one pack (their chunks touch)
    that need the same work (``_work``), in address order.  Texts given in address
    order (as ``jit_text_alloc_many`` returns them) are not sorted again."""
    runs = cut(texts)
    if any(a[-1]._address > b[0]._address for a, b in itertools.pairwise(runs)):
        runs = cut(sorted(texts, key=_address))
    return runs


def cut(texts: list[JitText]) -> list[list[JitText]]:
    """``texts`` cut, in the given order, wherever the pack, the adjacency or the work changes."""
    runs: list[list[JitText]] = []
    run: list[JitText] = []
    pack = work = None
    end = -1
    reserved = _RESERVED
    for t in texts:
        this = t._staged if t._state is reserved else None  # _work(t), inline: the hot loop
        if t._chunk != end or t._pack is not pack or this is not work:
            run = [t]
            runs.append(run)
            pack, work = t._pack, this
        else:
            run.append(t)
        end = t._chunk + t._nchunks
    return runs


def ranges_of(runs: list[list[JitText]]) -> list[tuple[int, int]]:
    """One address range per stretch of touching runs, for the recipe's cache-maintenance
    steps (the bytes between the texts are trap filler)."""
    ranges: list[tuple[int, int]] = []
    previous: list[JitText] | None = None
    for run in runs:
        first, last = run[0], run[-1]
        end = last._address + last._size
        if previous is not None and previous[-1]._pack is first._pack and first._chunk == (
            previous[-1]._chunk + previous[-1]._nchunks
        ):
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((first._address, end - first._address))
        previous = run
    return ranges


@dataclass
class Publisher:
    """Everything :meth:`sync` reads or advances (explicit, instead of an allocator)."""

    backend: Backend
    spec: ArchSpec
    pool: PackPool
    #: Recipe steps run, recipes run, and events ("published", "patched", "maps").
    steps: Counter[str]
    recipe_runs: Counter[str]
    events: Counter[str]

    def sync(self, texts: list[JitText], patches: list[tuple[JitText, int, bytes]], undo: list[Callable[[], None]]) -> None:
        """Run the recipes for ``texts`` (to LIVE) and ``patches`` (composed words),
        having first appended to ``undo`` what takes it all back."""
        if len(texts) == 1 and not patches and texts[0]._state is _RESERVED and texts[0]._pack.reservation.mapped:
            self._publish_mapped(texts[0], undo)
            return
        backend = self.backend
        # Texts allocated together form runs, each written with one store; the work is
        # decided per run, not per text.
        runs = runs_of(texts)
        inplace = [t for run in runs if _work(run[0]) is None for t in run]
        fresh: list[list[JitText]] = []
        mapped: list[list[JitText]] = []
        for run in runs:
            (mapped if run[0]._pack.reservation.mapped else fresh).append(run)
        # Compose the patch words in order (several patches may hit one word).
        shadows: dict[JitText, bytearray] = {}
        words: list[tuple[Reservation, int, bytes, bytes]] = []
        for text, offset, data in patches:
            shadow = shadows.setdefault(text, bytearray(text._shadow))
            before = patch_word(self.spec, text, shadow, offset)
            shadow[offset : offset + len(data)] = data
            res_offset, word = patch_word(self.spec, text, shadow, offset)
            words.append((text._pack.reservation, res_offset, word, before[1]))
        writable = list(inplace)  # in-place texts still writable (end_inplace not run yet)
        written = [run for run in runs if _work(run[0])]
        undo.append(partial(self._undo, [(t, t._state) for t in texts], written, inplace, writable, words,
                            [(t, t._shadow) for t in shadows]))

        def write(runs: list[list[JitText]]) -> Callable[[], None]:
            todo = [run for run in runs if _work(run[0])]

            def run() -> None:
                for part in todo:
                    res, offset, data = run_bytes(self.spec, part)
                    backend.write(res, offset, data)
                todo.clear()  # a recipe that names write twice stores once

            return run

        def map_(runs: list[list[JitText]]) -> Callable[[], None]:
            def run() -> None:
                for res in dict.fromkeys(run[0]._pack.reservation for run in runs):
                    if not res.mapped:
                        uninterrupted(self._map, res)

            return run

        def store() -> None:
            for res, res_offset, word, _old in words:
                uninterrupted(backend.atomic_store, res, res_offset, word)

        groups: list[_recipes.Group] = []
        for recipe, group in (("publish_fresh", fresh), ("publish", mapped)):
            if group:
                groups.append(_recipes.Group(self.spec.recipe(recipe), ranges_of(group), write=write(group), map=map_(group)))
        if words:
            ranges = [(res.address + off, len(word)) for res, off, word, _ in words]
            groups.append(_recipes.Group(self.spec.recipe("patch"), ranges, store=store))
        for text in inplace:
            uninterrupted(end_inplace, backend, text, writable)
        _recipes.run(backend, groups, remote_cse=self.pool.remote_cse, steps=self.steps, recipes=self.recipe_runs)
        live = _LIVE
        for text in texts:
            text._state = live
        for text, shadow in shadows.items():
            text._shadow = shadow  # a private copy already (the old one may be shared bytes)
        self.events["published"] += len(texts)
        self.events["patched"] += len(patches)

    def _publish_mapped(self, text: JitText, undo: list[Callable[[], None]]) -> None:
        """``sync([text], [])`` for a RESERVED text in a mapped pack, the hot path of
        one-by-one publishing: one run, one range and one recipe, so none of the
        cutting and grouping a batch needs (the same undo, steps and counters)."""
        res = text._pack.reservation
        todo = [text] if text._staged else []
        undo.append(partial(self._undo, [(text, _RESERVED)], [list(todo)] if todo else [], [], [], [], []))
        backend = self.backend

        def write() -> None:
            while todo:  # a recipe that names write twice stores once
                backend.write(res, text._address - res.address, bytes(todo.pop()._shadow))

        group = _recipes.Group(self.spec.publish, [(text._address, text._size)], write=write)
        _recipes.run(backend, [group], remote_cse=self.pool.remote_cse, steps=self.steps, recipes=self.recipe_runs)
        text._state = _LIVE
        self.events["published"] += 1

    def _map(self, res: Reservation) -> None:
        self.backend.map(res)
        self.events["maps"] += 1

    def _undo(
        self,
        states: list[tuple[JitText, TextState]],
        written: list[list[JitText]],
        inplace: list[JitText],
        writable: list[JitText],
        words: list[tuple[Reservation, int, bytes, bytes]],
        old_shadows: list[tuple[JitText, bytes | bytearray]],
    ) -> None:
        """Take a publish back, whatever part of it happened (idempotent)."""
        for text, state in states:
            text._state = state
        for run in written:  # their memory held traps before: it does again
            first, last = run[0], run[-1]
            offset = offset_of(first)
            size = last._address + last._size - first._address
            self.backend.write(first._pack.reservation, offset, self.spec.trap_bytes(size))
        for text in inplace:
            if text not in writable:
                uninterrupted(begin_inplace, self.backend, text, writable)
        for res, res_offset, _new, old in reversed(words):
            uninterrupted(self.backend.atomic_store, res, res_offset, old)
        for text, shadow in old_shadows:
            text._shadow = shadow


def begin_inplace(backend: Backend, text: JitText, writable: list[JitText]) -> None:
    """``backend.begin_inplace`` over ``text``, recorded in ``writable`` in the same
    step (callers run it ``uninterrupted``: an undo must know whether it happened)."""
    backend.begin_inplace(text._pack.reservation, offset_of(text), text.size)
    writable.append(text)


def end_inplace(backend: Backend, text: JitText, writable: list[JitText]) -> None:
    """``backend.end_inplace`` over ``text``, and ``text`` out of ``writable``."""
    backend.end_inplace(text._pack.reservation, offset_of(text), text.size)
    writable.remove(text)


def offset_of(text: JitText) -> int:
    """``text``'s offset in its reservation."""
    return text._address - text._pack.reservation.address


def trap_at(spec: ArchSpec, offset: int, size: int) -> bytes:
    """``size`` bytes of trap filler for reservation offset ``offset`` (in phase)."""
    phase = offset % len(spec.trap_fill)
    return spec.trap_bytes(phase + size)[phase:]


def run_bytes(spec: ArchSpec, run: list[JitText]) -> tuple[Reservation, int, bytes]:
    """One write for texts adjacent in one reservation: their staged bytes, with
    the trap filler that is already between them."""
    res = run[0]._pack.reservation
    first = run[0]
    if len(run) == 1:
        return res, offset_of(first), bytes(first._shadow)
    # Every text starts on a whole trap instruction (chunks do), so the filler before
    # it depends on its length only: made once per length (a slice per gap costs more).
    fillers: dict[int, bytes] = {}
    trap = spec.trap_bytes
    pieces: list[bytes | bytearray] = []
    at = first._address  # where the previous text ended
    for t in run:
        address = t._address
        if address != at:
            gap = address - at
            filler = fillers.get(gap)
            if filler is None:
                filler = fillers[gap] = trap(gap + -gap % len(spec.trap_fill))[-gap:]
            pieces.append(filler)
        pieces.append(t._shadow)
        at = address + t._size
    return res, offset_of(first), b"".join(pieces)


def patch_word(spec: ArchSpec, text: JitText, shadow: bytearray, offset: int) -> tuple[int, bytes]:
    """The aligned patch word around ``text.address + offset`` composed from
    ``shadow`` (bytes past the text are trap filler): (reservation offset, bytes)."""
    word = spec.patch_rule.word
    start = (text.address + offset) & ~(word - 1)
    out = bytearray()
    for address in range(start, start + word):
        index = address - text.address
        if 0 <= index < text.size:
            out.append(shadow[index])
        else:
            out += trap_at(spec, address - text._pack.address, 1)
    return start - text._pack.address, bytes(out)


__all__ = [
    "Publisher",
    "begin_inplace",
    "cut",
    "end_inplace",
    "offset_of",
    "patch_word",
    "ranges_of",
    "run_bytes",
    "runs_of",
    "trap_at",
]
