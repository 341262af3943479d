"""Printing litmus results: herd7's output format, a one-line summary, agreement.

herd7 prints, per test (and so does ``execmem litmus`` by default)::

    Test SB Allowed                       the kind the test's quantifier states
    States 4                              distinct final states, one per line:
    0:X2=0; 1:X2=0;                       its condition's locations (registers, then
    0:X2=0; 1:X2=1;                       memory, then faults: fault(...) or ~fault(...))
    ...
    Ok                                    the quantifier holds on these states (else No)
    Witnesses
    Positive: 1 Negative: 3               executions satisfying the predicate, and not
    Condition exists (0:X2=0 /\\ 1:X2=0)
    Observation SB Sometimes 1 3          Never / Sometimes / Always
    Time SB 0.01

The state lines are what compares with herd7's and with hardware runs (litmus7).
The witness counts are the model's executions: schedules through its explored
state graph (interleavings included), not herd's candidate executions, so only
whether each is zero compares.
"""

from __future__ import annotations

from collections.abc import Iterable

from execmem.litmus._run import LitmusResult

#: The kind herd prints for each quantifier.
_KIND = {"exists": "Allowed", "~exists": "Forbidden", "forall": "Required"}
CATEGORIES = ("faults", "TLBI", "BBM", "AF/DB", "other")


def state_line(state: dict[str, str]) -> str:
    parts = []
    for location, value in state.items():
        if location.startswith("fault("):
            parts.append(location if value == "1" else f"~{location}")
        else:
            parts.append(f"{location}={value}")
    return "".join(f"{p}; " for p in parts).rstrip()


def herd_block(r: LitmusResult) -> str:
    """One test's result in herd7's format (or one line saying why there is none)."""
    if r.verdict in ("error", "unsupported"):
        return f"Test {r.name} {r.verdict}: {r.detail}\n"
    quantifier = r.condition.split(" ", 1)[0]
    lines = [f"Test {r.name} {_KIND.get(quantifier, 'Allowed')}", f"States {len(r.final_states)}"]
    lines += [state_line(s) for s in r.final_states]
    lines.append("Ok" if r.validated else "No")
    if r.verdict == "unknown":
        lines.append(f"(incomplete: {r.detail})")
    lines.append("Witnesses")
    lines.append(f"Positive: {r.positive} Negative: {r.negative}")
    lines.append(f"Condition {r.condition}")
    how = "Never" if not r.positive else "Always" if not r.negative else "Sometimes"
    lines.append(f"Observation {r.name} {how} {r.positive} {r.negative}")
    lines.append(f"Time {r.name} {r.seconds:.2f}")
    return "\n".join(lines) + "\n"


def summary_line(r: LitmusResult, width: int) -> str:
    extra = f"  {r.detail}" if r.detail else ""
    return f"{r.name:<{width}}  {r.verdict:<11} states {r.states:<4} explored {r.explored:<7} {r.seconds:6.2f}s{extra}"


def by_category(results: Iterable[LitmusResult], kinds: dict[str, str]) -> list[str]:
    """``agree N/M`` per category of the compared tests (a test may count in several)."""
    lines = []
    for category in CATEGORIES:
        rows = [r for r in results if r.name in kinds and category in r.categories]
        if rows:
            agree = sum(r.agrees(kinds[r.name]) for r in rows)
            lines.append(f"  {category:<7} agree {agree}/{len(rows)}")
    return lines
