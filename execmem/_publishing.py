"""Publishing: the recipes of one batch over texts and patch words, with rollback.

``sync`` is what ``map``, ``finalize``, ``publish``, ``update`` and the end of a
``batch()`` run, under the allocator's lock: texts in address order are cut into
runs of adjacent texts (``jit_text_alloc_many`` places them so), each run written
with one store and maintained as one address range; patch words are composed in
order; a failure leaves every text as it was (unpublished texts read as traps again,
in-place texts writable again, patched words restored).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from execmem import _recipes
from execmem._backend import Reservation
from execmem._errors import ExecmemError
from execmem._text import JitText, TextState

if TYPE_CHECKING:
    from execmem._allocator import Allocator

_address = operator.attrgetter("_address")


def adjacent(texts: list[JitText]) -> Iterator[list[JitText]]:
    """``texts`` (in address order) cut into runs whose chunks touch in one pack."""
    run: list[JitText] = []
    for t in texts:
        if run and (t._pack is not run[-1]._pack or t._chunk != run[-1]._chunk + run[-1]._nchunks):
            yield run
            run = []
        run.append(t)
    if run:
        yield run


def ranges_of(runs: list[list[JitText]]) -> list[tuple[int, int]]:
    """One address range per run of adjacent texts, for the recipe's cache-maintenance
    steps (the bytes between the texts are trap filler)."""
    return [(run[0]._address, run[-1]._address + run[-1]._size - run[0]._address) for run in runs]


def sync(a: Allocator, texts: list[JitText], patches: list[tuple[JitText, int, bytes]]) -> None:
    """Run the recipes for ``texts`` (to LIVE) and ``patches`` (composed words)."""
    backend = a.backend
    # Address order: texts allocated together form runs written with one store.
    texts = sorted(texts, key=_address)
    inplace = [t for t in texts if t._state is TextState.WRITING]
    fresh: list[JitText] = []
    mapped: list[JitText] = []
    for t in texts:
        (mapped if t._pack.reservation.mapped else fresh).append(t)
    staged_set = {t for t in texts if t._state is TextState.RESERVED}
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
        def run() -> None:
            for whole in runs:
                todo = [t for t in whole if t in staged_set and t._staged]
                staged_set.difference_update(todo)
                for part in [whole] if len(todo) == len(whole) else adjacent(todo):
                    # Listed before the write: a write that fails after storing the
                    # bytes (mprotect mode: execute permission not restored) is
                    # rolled back to traps too, which also restores the permission.
                    written.extend(part)
                    res, offset, data = run_bytes(a, part)
                    backend.write(res, offset, data)

        return run

    def map_(group: list[JitText]) -> Callable[[], None]:
        def run() -> None:
            for res in dict.fromkeys(t._pack.reservation for t in group):
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
            runs = list(adjacent(group))
            groups.append(_recipes.Group(a._recipe(recipe), ranges_of(runs), write=write(runs), map=map_(group)))
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
    for text in texts:
        text._state = TextState.LIVE
        text._pending = None
    for text, shadow in shadows.items():
        text._shadow = shadow  # a private copy already (the old one may be shared bytes)
    a._events["published"] += len(texts)
    a._events["patched"] += len(patches)


def run_bytes(a: Allocator, run: list[JitText]) -> tuple[Reservation, int, bytes]:
    """One write for texts adjacent in one reservation: their staged bytes, with
    the trap filler that is already between them."""
    res = run[0]._pack.reservation
    first = run[0]
    if len(run) == 1:
        return res, a._offset(first), bytes(first._shadow)
    start, end = first._address, run[-1]._address + run[-1]._size
    blob = bytearray(a._trap(res, start - res.address, end - start))
    for t in run:
        at = t._address - start
        blob[at : at + t._size] = t._shadow
    return res, start - res.address, bytes(blob)


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


__all__ = ["adjacent", "patch_word", "ranges_of", "run_bytes", "sync"]
