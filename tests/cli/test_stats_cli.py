"""``execmem stats`` and ``render_occupancy``: the map says what ``occupancy()`` says,
checks trap fill, and the command draws a PNG."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import execmem
from execmem import _stats_cli
from execmem._memory_backend import MemoryBackend
from execmem.cli import main


def _allocator() -> execmem.Allocator:
    return execmem.Allocator(backend=MemoryBackend("x86_64"), pack_size=64 * 1024)


def _publish(a: execmem.Allocator, size: int) -> execmem.JitText:
    t = a.jit_text_alloc(size)
    t.write(0, b"\xc3" + b"\x90" * (size - 1))
    t.map()
    return t


def _map_lines(text: str) -> str:
    """The map lines of the first pack (``+0x... <cells>``)."""
    return "".join(m.group(1) for m in re.finditer(r"^  \+0x[0-9a-f]+ ([#.q!]+)$", text, re.MULTILINE))


def test_map_shows_live_free_and_quarantined_chunks_exactly() -> None:
    a = _allocator()
    texts = [_publish(a, 64) for _ in range(6)]  # chunks 0..5 live
    texts[1].free()  # mapped pack: quarantined until the next epoch
    texts[3].free()
    text = _stats_cli.render_occupancy(a)
    assert _map_lines(text) == "#q#q##"  # one character per chunk; the free tail is summarized
    assert "1,024 KiB" not in text and "... 63.6 KiB free to the end" in text
    assert "live 256 B" not in text  # totals are in KiB
    assert re.search(r"live 0\.2 KiB \(0\.4%\), free 63\.6 KiB \(99\.4%\), quarantined 0\.1 KiB \(0\.2%\)", text), text
    assert "texts: RESERVED 0, WRITING 0, LIVE 4, FREED 2" in text
    _publish(a, 64)  # the next publish completes an epoch: the holes become free
    assert _map_lines(_stats_cli.render_occupancy(a)) == "#.#.###"


def test_free_chunks_that_are_not_traps_are_flagged() -> None:
    a = _allocator()
    t = _publish(a, 64)
    _publish(a, 64)
    t.free()
    backend = a.backend
    assert isinstance(backend, MemoryBackend)
    res = backend.reservations[0]
    # Freed memory keeps the code until the next epoch refills it: not flagged.  A stray
    # write into free memory that was never used is.
    assert _map_lines(_stats_cli.render_occupancy(a)) == "q#"
    backend.write(res, 2 * 64, b"\x90" * 8)
    text = _stats_cli.render_occupancy(a)
    assert _map_lines(text) == "q#!"
    assert "1 chunk(s) NOT trap-filled" in text


def test_big_packs_use_coarser_cells_and_identical_lines_collapse() -> None:
    a = execmem.Allocator(backend=MemoryBackend("x86_64"))  # 2 MiB packs of 64-byte chunks
    big = a.jit_text_alloc(1536 * 1024)  # more than half a pack: a dedicated reservation
    big.write(0, b"\xc3")
    big.map()
    text = _stats_cli.render_occupancy(a)
    assert "(mapped, dedicated); one character = 32 chunk(s), 2 KiB" in text
    assert re.search(r"\+0x000000 #{64}\n  \.\.\. 11 more line\(s\) like this one", text), text


def test_render_occupancy_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    a = _allocator()
    for _ in range(3):
        _publish(a, 100)
    path = tmp_path / "packs.png"
    text = _stats_cli.render_occupancy(a, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pack 0x" in text


def test_render_occupancy_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match=r"execmem\.Allocator"):
        _stats_cli.render_occupancy(object())  # type: ignore[arg-type]


def test_unknown_workload_is_a_clear_error() -> None:
    with pytest.raises(execmem.ExecmemError, match="unknown workload"):
        _stats_cli.workload(_allocator(), "nope", 1)


def test_stats_command_demo_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "stats.png"
    assert main(["stats", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    for c, what in _stats_cli.LEGEND:
        assert f"  {c}  {what}" in out
    packs = re.findall(r"^pack 0x[0-9a-f]+ .*$", out, re.MULTILINE)
    assert len(packs) == 2 and sum("dedicated" in p for p in packs) == 1, out
    assert "!" not in "".join(re.findall(r"^  \+0x[0-9a-f]+ (\S+)$", out, re.MULTILINE))
    totals = re.findall(r"live [\d,.]+ KiB .*, quarantined ([\d,.]+) KiB", out)
    assert any(float(t.replace(",", "")) > 0 for t in totals), out  # the last frees are still quarantined
    assert re.search(r"texts: .*LIVE \d+, FREED \d+", out)


def test_stats_command_random_workload_is_reproducible(capsys: pytest.CaptureFixture[str]) -> None:
    def maps() -> str:
        assert main(["stats", "--workload", "random", "--seed", "3"]) == 0
        out = capsys.readouterr().out
        return re.sub(r"0x[0-9a-f]{6,}", "ADDR", out)  # addresses differ between runs

    assert maps() == maps()


def test_stats_command_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["stats", "--png", str(tmp_path / "missing" / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("execmem: error: cannot write") and err.count("\n") == 1


def test_text_table_lists_texts_by_name_in_address_order() -> None:
    a = _allocator()
    texts = a.jit_text_alloc_many([64, 16, 200], names=["alpha", None, "gamma"])
    texts[0].map()
    texts[2].free()
    table = _stats_cli.text_table(a).splitlines()
    assert table[0] == "texts by name (2, in address order):"
    assert table[2].split() == [f"{texts[0].address:#018x}", "64", "LIVE", "alpha"]
    assert table[3].split() == [f"{texts[1].address:#018x}", "16", "RESERVED", f"jit_{texts[1].address:x}"]
    assert _stats_cli.text_table(a, 1).splitlines()[-1] == "  ... 1 more (--texts all lists them)"


def test_stats_command_lists_the_workloads_texts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--texts", "all"]) == 0
    out = capsys.readouterr().out
    count = int(re.search(r"^texts by name \((\d+), in address order\):$", out, re.MULTILINE)[1])  # type: ignore[index]
    rows = re.findall(r"^  (0x[0-9a-f]{16}) +(\d+)  LIVE +(\S+)$", out, re.MULTILINE)
    assert len(rows) == count and re.search(r"LIVE \d+", out)[0] == f"LIVE {count}"  # type: ignore[index]
    assert [int(r[0], 16) for r in rows] == sorted(int(r[0], 16) for r in rows)
    names = {r[2] for r in rows}
    assert "big0" in names and {n.split("_")[0] for n in names} == {"big0", "first", "second"}
    assert main(["stats", "--texts", "0"]) == 0
    assert "texts by name" not in capsys.readouterr().out
