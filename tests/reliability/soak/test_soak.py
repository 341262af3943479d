"""The soak runner (``execmem.bench.soak``) in process, small: 10,000 operations per
mode must end bounded (RSS, VMAs, fds), with every call right, no W+X mapping seen
and nothing left mapped after ``close``.  The full run is ``make soak``."""

from __future__ import annotations

import json
import platform

import pytest

from execmem.bench import soak

x86_soak = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the soak runner (execmem.bench.soak) generates and live-patches x86-64 code only",
)


@x86_soak
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_soak_10k_is_bounded(mode: str) -> None:
    report = soak.run_soak(10_000, mode, seed=3)
    print("\n" + soak.table(report))
    assert report["verdict"]["bounded"], report["verdict"]
    assert report["wrong"] == []
    assert report["wx"] == []
    assert report["left_mapped_after_close"] == []
    assert report["ok"]
    counts = report["counts"]
    assert counts["calls_checked"] > 3000 and counts["published"] > 1000 and counts["frees"] > 500
    assert (counts.get("updates", 0) > 0) == (mode == "dual")
    assert len(report["samples"]) == 201


def rows(**series: list[int]) -> list[dict[str, int]]:
    n = len(next(iter(series.values())))
    base = {"op": 0, "rss": 50 << 20, "vmas": 200, "execmem_vmas": 2, "fds": 7, "live": 0, "packs": 1}
    return [{**base, "op": i, **{k: v[i] for k, v in series.items()}} for i in range(n)]


def test_verdict_flags_growth_and_tolerates_noise() -> None:
    flat = rows(rss=[(50 << 20) + (i % 3) * 4096 for i in range(40)])
    assert soak.verdict(flat)["bounded"]
    leaking = rows(rss=[(50 << 20) + i * (1 << 20) for i in range(40)])  # 1 MiB per sample
    judged = soak.verdict(leaking)
    assert not judged["bounded"] and "rss" in judged["why"]
    fds = rows(fds=[7 + i // 4 for i in range(40)])
    assert not soak.verdict(fds)["bounded"]
    assert not soak.verdict(flat[:5])["bounded"]  # too few samples to judge


@x86_soak
def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["--ops", "2000", "--sample-every", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["config"]["ops"] == 2000 and len(report["samples"]) == 21
