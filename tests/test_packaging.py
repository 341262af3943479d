"""What a user's environment gets from installing execmem."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import execmem

ROOT = Path(__file__).resolve().parents[1]


def _in_a_user_project(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with this interpreter from a folder outside the checkout."""
    return subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )


def test_only_the_execmem_package_is_installed(tmp_path: Path) -> None:
    # arch/ and jit_examples/ live inside the package: a user's `import arch` must still
    # find the PyPI package of that name (or nothing), never ours.
    done = _in_a_user_project(
        tmp_path,
        "import importlib.util as u, execmem.arch, execmem.examples.bf;"
        "print(u.find_spec('jit_examples'), execmem.examples.bf.__name__);"
        "s = u.find_spec('arch'); print(s is None or 'execmem' not in (s.origin or ''))",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "execmem.examples.bf", "True"]


def test_examples_run_from_the_installed_package(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "execmem.examples.calc", "6*7"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("6*7 = 42")


def test_mypy_in_a_user_project_sees_execmem_types(tmp_path: Path) -> None:
    # The default (import-hook) editable install hides the package from type checkers;
    # `make` installs in strict mode, and a regular install is a plain package.
    if any("__editable__" in type(f).__module__ for f in sys.meta_path):
        pytest.skip("execmem is installed in import-hook editable mode (not how `make` installs it)")
    (tmp_path / "user.py").write_text("import execmem\nreveal_type(execmem.jit_text_alloc(16))\n")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )
    assert 'Revealed type is "execmem._text.JitText"' in done.stdout, done.stdout + done.stderr


def test_license_is_shipped() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert importlib.metadata.metadata("execmem")["License-Expression"] == "MIT"
    assert execmem.__version__ == importlib.metadata.version("execmem")
