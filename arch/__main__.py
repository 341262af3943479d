"""``python -m execmem.arch``: print every architecture's synchronization recipes
as a Markdown table (the README's table is this output)."""

from __future__ import annotations

from execmem.arch import get, names


def recipe_table() -> str:
    rows = ["| architecture | recipe | steps (skipped when CTR_EL0 says so) | context-synchronizing events | TLB styles |",
            "|---|---|---|---|---|"]
    for name in names():
        spec = get(name)
        for recipe in (spec.publish, spec.publish_fresh, spec.patch):
            steps = " → ".join(f"{s.name}" + (f" (unless {s.skip_if.upper()})" if s.skip_if else "") for s in recipe.steps)
            rows.append(f"| {spec.name} | {recipe.name} | {steps} | {', '.join(spec.cse_events)} | {', '.join(spec.tlb_styles)} |")
    return "\n".join(rows)


def why_table() -> str:
    rows = ["| architecture | step | why |", "|---|---|---|"]
    for name in names():
        spec = get(name)
        seen: set[str] = set()
        for recipe in (spec.publish, spec.publish_fresh, spec.patch):
            for step in recipe.steps:
                if step.name not in seen:
                    seen.add(step.name)
                    rows.append(f"| {spec.name} | {step.name} | {step.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(recipe_table())
    print()
    print(why_table())
