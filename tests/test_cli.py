"""The command line's global behaviour: version, global options anywhere, progress."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import execmem
from execmem import _progress
from execmem.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"execmem {execmem.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "stats", "--png", "x.svg"],
        ["stats", "--debug", "--png", "x.svg"],
        ["stats", "--png", "x.svg", "--debug"],
    ],
)
def test_debug_is_accepted_before_or_after_the_subcommand(argv: list[str]) -> None:
    # --debug re-raises the command's error instead of printing one line, wherever it stands.
    with pytest.raises(execmem.ExecmemError, match=r"ending in \.png"):
        main(argv)


def test_without_debug_an_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--png", "x.svg"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("execmem: error: --png 'x.svg'") and err.count("\n") == 1


def test_quiet_after_the_subcommand_silences_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_progress, "_quiet", False)
    assert main(["stats", "--quiet", "--workload", "random"]) == 0
    assert _progress._quiet


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_shown_only_on_a_terminal_and_not_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(_progress, "_quiet", False)
    with _progress.Progress(2) as progress:
        progress.step("first")
    assert "[1/2] first" in terminal.getvalue()
    _progress.set_quiet(True)
    terminal.truncate(0)
    terminal.seek(0)
    with _progress.Progress(2) as progress:
        progress.step("first")
    assert terminal.getvalue() == ""
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    _progress.set_quiet(False)
    assert not _progress.enabled()


def test_stats_png_refuses_a_name_that_is_not_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "packs.svg"
    assert main(["stats", "--png", str(target)]) == 1
    assert "ending in .png" in capsys.readouterr().err
    assert not target.exists()
