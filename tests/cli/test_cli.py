"""The command line's global behaviour: version, global options anywhere, progress."""

from __future__ import annotations

import io
import platform
import sys
from pathlib import Path

import paths
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


HERD = paths.DATA / "herd" / "aarch64-ifetch"
LONG_COMMANDS = {
    "litmus": ["litmus", "-j", "1", str(HERD / "MP+rel+blr.litmus"), str(HERD / "LB.RF+dmb.sy+po.litmus")],
    "verify": ["verify", "--scenario", "tlb-async-flush", "-j", "1"],
    "hotswap": ["example", "hotswap", "--workers", "1", "--versions", "5"],
}


@pytest.mark.parametrize("name", sorted(LONG_COMMANDS))
def test_long_commands_draw_one_progress_line_on_a_terminal(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(_progress, "_quiet", False)
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(LONG_COMMANDS[name]) == 0
    drawn = terminal.getvalue()
    # Drawn in place (no newline), counted, and erased when the command ends.
    assert "\r\033[K[1/" in drawn and "\n" not in drawn and drawn.endswith("\r\033[K")
    assert "\033" not in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(LONG_COMMANDS))
def test_quiet_silences_the_progress_of_long_commands(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(_progress, "_quiet", False)
    monkeypatch.setattr("sys.stderr", terminal)
    assert main([*LONG_COMMANDS[name], "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_progress_lines_are_throttled_but_the_last_step_is_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with _progress.Progress(1000, enabled=True) as progress:
        for k in range(1000):
            progress.step(f"step {k}")
    drawn = terminal.getvalue()
    assert drawn.count("\r\033[K[") < 100  # at most ten redraws a second
    assert "[1/1000] step 0" in drawn and "[1000/1000] step 999" in drawn


def test_not_a_terminal_means_no_progress(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(_progress, "_quiet", False)
    assert main(LONG_COMMANDS["verify"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the soak runner makes x86-64 code")
@pytest.mark.parametrize("quiet", [False, True])
def test_soak_runner_notes_its_samples_on_the_progress_line(quiet: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from execmem.bench import soak

    terminal = _Terminal()
    monkeypatch.setattr(_progress, "_quiet", False)
    monkeypatch.setattr("sys.stderr", terminal)
    assert soak.main(["--ops", "500", "--sample-every", "50", *(["--quiet"] if quiet else [])]) == 0
    drawn = terminal.getvalue()
    assert drawn == "" if quiet else ("\r\033[Ksoak dual: op 0/500" in drawn and drawn.endswith("\r\033[K"))


def test_stats_png_without_matplotlib_is_refused_before_the_workload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from execmem import _stats_cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # ``import matplotlib`` fails
    monkeypatch.setattr(_stats_cli, "workload", lambda *args: pytest.fail("ran the workload before refusing"))
    assert main(["stats", "--png", str(tmp_path / "packs.png")]) == 1
    assert "--png needs matplotlib: pip install 'execmem[plot]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
