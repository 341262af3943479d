"""Running synchronization recipes, and the live-patch rule.

A batch is one or more *groups*, each a recipe (``publish_fresh``, ``publish``,
``patch``) with the address ranges it covers.  :func:`run` executes them in order,
step by step from ``Recipe.effective(cache_features)``: ``write``, ``map`` and
``atomic_store`` are the group's own actions (per text / reservation / word),
every other step is one ``backend.run_step(name, ranges)`` over the group's ranges.
``remote_cse`` runs once for the whole batch, at the position of the last group
that has one, over every range of the batch: one IPI round (membarrier) however
many texts and kinds of change a batch holds.

:func:`check_patch` decides whether ``JitText.update`` may store some bytes while
other threads may execute them (``ArchSpec.patch_rule``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from execmem._backend import Backend, Range
from execmem._errors import UnsafePatchError
from execmem.arch import ArchSpec, Recipe

SAFE_ALTERNATIVE = (
    "publish a new text with the new code, swap the pointer callers use to reach it, "
    "and free the old text (its memory is reclaimed after the next epoch)"
)


def _nothing() -> None:
    return None


@dataclass
class Group:
    """One recipe run: its ranges and what its write/map/atomic_store steps do."""

    recipe: Recipe
    ranges: list[Range]
    write: Callable[[], None] = _nothing
    map: Callable[[], None] = _nothing
    store: Callable[[], None] = _nothing


def run(
    backend: Backend,
    groups: list[Group],
    *,
    remote_cse: Callable[[list[Range]], None],
    steps: Counter[str],
    recipes: Counter[str],
) -> None:
    """Execute ``groups`` in order with one ``remote_cse`` overall (see the module docstring)."""
    features = frozenset(backend.cache_features)
    plans = [(g, g.recipe.effective(features)) for g in groups]
    owner = max((i for i, (_, st) in enumerate(plans) if any(s.name == "remote_cse" for s in st)), default=-1)
    everything = [r for g in groups for r in g.ranges]
    for i, (group, effective) in enumerate(plans):
        recipes[group.recipe.name] += 1
        for step in effective:
            name = step.name
            if name == "write":
                group.write()
            elif name == "map":
                group.map()
            elif name == "atomic_store":
                group.store()
            elif name == "remote_cse":
                if i != owner:
                    steps["remote_cse_merged"] += 1
                    continue
                remote_cse(everything)
            else:
                backend.run_step(name, group.ranges)
            steps[name] += 1


def check_patch(spec: ArchSpec, backend: Backend, address: int, old: bytes, new: bytes) -> None:
    """Raise ``UnsafePatchError`` unless replacing ``old`` by ``new`` at ``address`` is
    allowed while other threads may execute it."""
    rule = spec.patch_rule
    where = f"patch of {len(new)} bytes at {address:#x}"
    if not new:
        raise UnsafePatchError(f"{where}: nothing to patch")
    if not backend.concurrent_patch_safe:
        raise UnsafePatchError(
            f"{where}: in {backend.mode} mode an atomic store makes the page briefly "
            f"non-executable, so threads running it would fault; {SAFE_ALTERNATIVE}"
        )
    if len(new) > rule.max_size or address // rule.word != (address + len(new) - 1) // rule.word:
        raise UnsafePatchError(
            f"{where}: a live patch must lie within one naturally aligned {rule.word}-byte word "
            f"({rule.why}); {SAFE_ALTERNATIVE}"
        )
    if not rule.whole_instruction:
        return
    from execmem._asm import decode_one

    old_m = decode_one(spec, old, address)
    new_m = decode_one(spec, new, address)
    if old_m is None or new_m is None:
        which = "old" if old_m is None else "new"
        raise UnsafePatchError(
            f"{where}: the {which} bytes are not exactly one whole {spec.name} instruction "
            f"of {len(new)} bytes ({rule.why}); {SAFE_ALTERNATIVE}"
        )
    if rule.mnemonics and (old_m not in rule.mnemonics or new_m not in rule.mnemonics):
        bad = old_m if old_m not in rule.mnemonics else new_m
        raise UnsafePatchError(
            f"{where}: {bad!r} may not be modified while other CPUs may execute it ({rule.why}); "
            f"{SAFE_ALTERNATIVE}"
        )


__all__ = ["SAFE_ALTERNATIVE", "Group", "check_patch", "run"]
