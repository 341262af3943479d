"""Where the tests find the checkout and the data vendored for them (nothing outside
the repository is read)."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
