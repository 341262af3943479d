"""Running synchronization recipes, and the live-patch rule.

A batch is one or more *groups*, each a recipe (``publish_fresh``, ``publish``,
``patch``) with the address ranges it covers.  :func:`run` executes them in order,
step by step from ``Recipe.effective(cache_features)``: ``write``, ``map`` and
``atomic_store`` are the group's own actions (per text / reservation / word),
every other step is one ``backend.run_step(name, ranges)`` over the group's ranges.
``remote_cse`` runs once for the whole batch, at the position of the last group
that has one, over every range of the batch: one IPI round (membarrier) however
many texts and kinds of change a batch holds.

:func:`check_patch` (from ``_patch``) decides whether ``JitText.update`` may store
some bytes while other threads may execute them (``ArchSpec.patch_rule``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from execmem._backend import Backend, Range
from execmem._patch import SAFE_ALTERNATIVE, check_patch
from execmem.arch import Recipe


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
    features = backend.cache_features
    if len(groups) == 1:  # one kind of change (the hot path of one-by-one publishing)
        plans = [(groups[0], groups[0].recipe.effective(features))]
        owner, everything = 0, groups[0].ranges
    else:
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


__all__ = ["SAFE_ALTERNATIVE", "Group", "check_patch", "run"]
