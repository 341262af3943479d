"""The verification catalog: seed scenarios, their mutations, and a runner."""

from execmem.verify._catalog import SCENARIOS, find, scenarios, variants
from execmem.verify._framework import Case, Result, Scenario, Variant, replay, run_variant, show

__all__ = [
    "SCENARIOS",
    "Case",
    "Result",
    "Scenario",
    "Variant",
    "find",
    "replay",
    "run_variant",
    "scenarios",
    "show",
    "variants",
]
