"""``execmem example NAME [ARGS...]``: run one of the JIT examples."""

from __future__ import annotations

import argparse
import importlib

from execmem._errors import ExecmemError
from execmem.examples import EXAMPLES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=EXAMPLES, help="which example")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the example (see its --help)")


def run(args: argparse.Namespace) -> int:
    if args.name not in EXAMPLES:
        raise ExecmemError(f"no example {args.name!r}; choose from {', '.join(EXAMPLES)}")
    module = importlib.import_module(f"execmem.examples.{args.name}")
    return int(module.main(args.args) or 0)
