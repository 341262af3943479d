"""What a user's environment gets from installing execmem."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import paths
import pytest
from programs import HOST, needs_programs

import execmem
import execmem.arch
from execmem.bench._publish import encoder

ROOT = paths.ROOT


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


@needs_programs
def test_allocating_and_calling_code_loads_no_emulator(tmp_path: Path) -> None:
    # The host's code is made here (assembled in this process) and handed over as bytes.
    code = encoder(HOST)(42)
    done = _in_a_user_project(
        tmp_path,
        "import ctypes, sys, execmem\n"
        "t = execmem.jit_text_alloc(64)\n"
        f"t.write(0, {code!r})\n"
        "t.map()\n"
        "assert t.function(ctypes.c_int)() == 42\n"
        "t.free()\n"
        "assert 'unicorn' not in sys.modules, sorted(m for m in sys.modules if 'unicorn' in m)\n",
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", execmem.arch.names())
def test_engine_numbers_are_the_libraries_constants(name: str) -> None:
    # arch/*.py write Keystone/Capstone/Unicorn modes and Keystone's syntax options as
    # numbers (importing none of the three); these are the names they stand for.
    import capstone
    import keystone
    import unicorn

    names = {
        "x86_64": (("KS_ARCH_X86", "KS_MODE_64"), ("CS_ARCH_X86", "CS_MODE_64"), ("UC_ARCH_X86", "UC_MODE_64")),
        "arm64": (("KS_ARCH_ARM64", "KS_MODE_LITTLE_ENDIAN"), ("CS_ARCH_ARM64", "CS_MODE_ARM"),
                  ("UC_ARCH_ARM64", "UC_MODE_ARM")),
        "riscv64": (None, ("CS_ARCH_RISCV", "CS_MODE_RISCV64", "CS_MODE_RISCVC"), ("UC_ARCH_RISCV", "UC_MODE_RISCV64")),
    }[name]
    engines = execmem.arch.get(name).engines
    for library, modes, constants in zip(
        (keystone, capstone, unicorn), (engines.keystone, engines.capstone, engines.unicorn), names, strict=True
    ):
        if constants is None:
            assert modes is None
            continue
        arch, *flags = (getattr(library, c) for c in constants)
        mode = 0
        for flag in flags:
            mode |= flag
        assert modes == (arch, mode), (library.__name__, constants)
    spec = execmem.arch.get(name)
    for syntax in spec.asm.syntaxes if spec.asm is not None else ():
        if syntax.keystone_option is not None:
            assert syntax.keystone_option == getattr(keystone, f"KS_OPT_SYNTAX_{syntax.name.upper()}"), syntax.name


def test_ci_runs_the_arm64_host_selection_the_readme_describes() -> None:
    """The emulated CI run leaves out only the model's files, as the README lists them."""
    makefile = (ROOT / "Makefile").read_text()
    selection = makefile.split("ARM64_HOST_TESTS =", 1)[1].split("\ntest-arm64-host:", 1)[0]
    left_out = [word.split("=", 1)[1].strip("'") for word in selection.split() if word.startswith("--ignore")]
    readme = (ROOT / "README.md").read_text()
    described = readme.split("**What CI runs.**", 1)[1].split("**What it shows.**", 1)[0]
    assert left_out and all(f"`{pattern}`" in described for pattern in left_out)
    for pattern in left_out:  # every pattern still names test files, all of the model's side
        files = sorted(f for match in ROOT.glob(pattern) for f in ([match] if match.is_file() else match.rglob("test_*.py")))
        assert files, pattern
        for path in files:
            source = path.read_text()
            assert any(w in source for w in ("litmus", "Machine", "verify", "emu")), path
    assert "make test-arm64-host" in (ROOT / ".ci" / "run").read_text()
