"""The README's Python examples run as written (x86-64 hosts)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the README's examples are written in x86-64 assembly")
def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # the blocks build on each other
