"""Publishing: the recipes of one batch over texts and patch words, with rollback.

``sync`` is what ``map``, ``finalize``, ``publish``, ``update`` and the end of a
``batch()`` run, under the allocator's lock: texts in address order are cut into
runs of adjacent texts that need the same work (``jit_text_alloc_many`` places them
so), each run written with one store, and touching runs maintained as one address
range; everything after the cut is decided per run, not per text (a batch may hold
thousands).  Patch words are composed in order; a failure leaves every text as it
was (unpublished texts read as traps again, in-place texts writable again, patched
words restored).
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

from execmem import _recipes
from execmem._backend import Reservation
from execmem._errors import ExecmemError
from execmem._text import JitText, TextState

if TYPE_CHECKING:
    from execmem._allocator import Allocator

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


def sync(a: Allocator, texts: list[JitText], patches: list[tuple[JitText, int, bytes]]) -> None:
    """Run the recipes for ``texts`` (to LIVE) and ``patches`` (composed words)."""
    backend = a.backend
    # Texts allocated together form runs, each written with one store; the work is
    # decided per run, not per text.
    runs = runs_of(texts)
    inplace = [t for run in runs if _work(run[0]) is None for t in run]
    fresh: list[list[JitText]] = []
    mapped: list[list[JitText]] = []
    for run in runs:
        (mapped if run[0]._pack.reservation.mapped else fresh).append(run)
    written: list[JitText] = []
    stored: list[tuple[Reservation, int, bytes]] = []
    ended: list[JitText] = []
    # Compose the patch words in order (several patches may hit one word).
    shadows: dict[JitText, bytearray] = {}
    words: list[tuple[Reservation, int, bytes, bytes]] = []
    for text, offset, data in patches:
        shadow = shadows.setdefault(text, bytearray(text._shadow))
        before = patch_word(a, text, shadow, offset)
        shadow[offset : offset + len(data)] = data
        res_offset, word = patch_word(a, text, shadow, offset)
        words.append((text._pack.reservation, res_offset, word, before[1]))

    def write(runs: list[list[JitText]]) -> Callable[[], None]:
        todo = [run for run in runs if _work(run[0])]

        def run() -> None:
            for part in todo:
                # Listed before the write: a write that fails after storing the
                # bytes (mprotect mode: execute permission not restored) is
                # rolled back to traps too, which also restores the permission.
                written.extend(part)
                res, offset, data = run_bytes(a, part)
                backend.write(res, offset, data)
            todo.clear()  # a recipe that names write twice stores once

        return run

    def map_(runs: list[list[JitText]]) -> Callable[[], None]:
        def run() -> None:
            for res in dict.fromkeys(run[0]._pack.reservation for run in runs):
                if not res.mapped:
                    backend.map(res)
                    a._events["maps"] += 1

        return run

    def store() -> None:
        for res, res_offset, word, _old in words:
            backend.atomic_store(res, res_offset, word)
            stored.append((res, res_offset, _old))

    groups: list[_recipes.Group] = []
    for recipe, group in (("publish_fresh", fresh), ("publish", mapped)):
        if group:
            groups.append(_recipes.Group(a._recipe(recipe), ranges_of(group), write=write(group), map=map_(group)))
    if words:
        ranges = [(res.address + off, len(word)) for res, off, word, _ in words]
        groups.append(_recipes.Group(a._recipe("patch"), ranges, store=store))
    try:
        for text in inplace:
            backend.end_inplace(text._pack.reservation, a._offset(text), text.size)
            ended.append(text)
        _recipes.run(
            backend, groups, remote_cse=a._pool.remote_cse, steps=a._steps, recipes=a._recipe_runs
        )
    except BaseException:
        # Leave every text as it was: unpublished texts read as traps again,
        # in-place texts writable again, patched words restored (best effort).
        with contextlib.suppress(ExecmemError):
            for t in written:
                backend.write(t._pack.reservation, a._offset(t), a._trap(t._pack.reservation, a._offset(t), t.size))
            for t in ended:
                backend.begin_inplace(t._pack.reservation, a._offset(t), t.size)
            for res, res_offset, old in reversed(stored):
                backend.atomic_store(res, res_offset, old)
        for t in texts:
            t._pending = None
        raise
    live = _LIVE
    for text in texts:
        text._state = live
        text._pending = None
    for text, shadow in shadows.items():
        text._shadow = shadow  # a private copy already (the old one may be shared bytes)
    a._events["published"] += len(texts)
    a._events["patched"] += len(patches)
    if a._debug is not None:
        a._debug.published(texts, list(shadows))


def run_bytes(a: Allocator, run: list[JitText]) -> tuple[Reservation, int, bytes]:
    """One write for texts adjacent in one reservation: their staged bytes, with
    the trap filler that is already between them."""
    res = run[0]._pack.reservation
    first = run[0]
    if len(run) == 1:
        return res, a._offset(first), bytes(first._shadow)
    # Every text starts on a whole trap instruction (chunks do), so the filler before
    # it depends on its length only: made once per length (a slice per gap costs more).
    fillers: dict[int, bytes] = {}
    trap = a.arch.trap_bytes
    pieces: list[bytes | bytearray] = []
    at = first._address  # where the previous text ended
    for t in run:
        address = t._address
        if address != at:
            gap = address - at
            filler = fillers.get(gap)
            if filler is None:
                filler = fillers[gap] = trap(gap + -gap % len(a.arch.trap_fill))[-gap:]
            pieces.append(filler)
        pieces.append(t._shadow)
        at = address + t._size
    return res, a._offset(first), b"".join(pieces)


def patch_word(a: Allocator, text: JitText, shadow: bytearray, offset: int) -> tuple[int, bytes]:
    """The aligned patch word around ``text.address + offset`` composed from
    ``shadow`` (bytes past the text are trap filler): (reservation offset, bytes)."""
    word = a.arch.patch_rule.word
    start = (text.address + offset) & ~(word - 1)
    out = bytearray()
    for address in range(start, start + word):
        index = address - text.address
        if 0 <= index < text.size:
            out.append(shadow[index])
        else:
            out += a._trap(text._pack.reservation, address - text._pack.address, 1)
    return start - text._pack.address, bytes(out)


__all__ = ["cut", "patch_word", "ranges_of", "run_bytes", "runs_of", "sync"]
