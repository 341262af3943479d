"""The verification catalog: seed scenarios, their mutations, and a runner."""

from execmem.verify._framework import (
    Case,
    Result,
    Scenario,
    Variant,
    find,
    replay,
    run_variant,
    scenarios,
    show,
    variants,
)

__all__ = ["Case", "Result", "Scenario", "Variant", "find", "replay", "run_variant", "scenarios", "show", "variants"]
