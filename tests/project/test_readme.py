"""The README's Python examples run as written (x86-64 hosts)."""

from __future__ import annotations

import gc
import platform
import re

import paths
import pytest

README = paths.ROOT / "README.md"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the README's examples are written in x86-64 assembly")
def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # the blocks build on each other
    finally:
        # The modeled machine's Unicorn instances sit in reference cycles: collect them
        # now, not during a later test (whose W+X sampler saw their 1 GiB rwx regions).
        namespace.clear()
        gc.collect()
