"""The ``execmem`` command line (also ``python -m execmem``).

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``execmem --help`` stays fast.  Errors are one line on stderr and a non-zero exit
code; ``--debug`` shows the traceback.  The global options (``--debug``,
``--quiet``) are accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: (name, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("demo", "execmem._demo", "assemble, publish and call a few functions on this host"),
    ("example", "execmem.examples._cli", "run one of the JIT examples (calc, bf, hotswap, bpf, libc)"),
    ("litmus", "execmem.litmus._cli", "run herd7 AArch64 litmus tests on the machine model"),
    ("verify", "execmem.verify._cli", "run the seed scenario catalog and its mutations"),
    ("bench", "execmem.bench._cli", "benchmark execmem against mmap+mprotect per function"),
    ("stats", "execmem._stats_cli", "show pack occupancy of an allocator as text and PNG"),
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="execmem",
        description="Put machine code into executable memory safely, and prove it on a modeled machine.",
    )
    from execmem import __version__

    parser.add_argument("--version", action="version", version=f"execmem {__version__}")
    _global_options(parser, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    children: dict[str, argparse.ArgumentParser] = {}
    for name, _module, help_text in SUBCOMMANDS:
        children[name] = sub.add_parser(name, help=help_text, description=help_text)
        # Accepted after the subcommand too; SUPPRESS keeps a value given before it.
        _global_options(children[name], argparse.SUPPRESS)
    return parser, children


def _global_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")
    parser.add_argument(
        "--quiet", action="store_true", default=default, help="no progress line on stderr for long commands"
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, children = _parser()
    # Only the chosen subcommand's module is imported and asked for its options.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {name: module for name, module, _ in SUBCOMMANDS}
    debug = "--debug" in argv
    try:
        if chosen in modules:
            module = importlib.import_module(modules[chosen])
            module.configure(children[chosen])
            children[chosen].set_defaults(_run=module.run)
        args = parser.parse_args(argv)
        args.debug = getattr(args, "debug", False)
        args.quiet = getattr(args, "quiet", False)
        if args.quiet:
            from execmem import _progress

            _progress.set_quiet(True)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("execmem: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BrokenPipeError:
        return 1
    except Exception as exc:  # one clear line, unless --debug
        if debug:
            raise
        from execmem._errors import ExecmemError

        kind = "" if isinstance(exc, ExecmemError) else f"{type(exc).__name__}: "
        print(f"execmem: error: {kind}{exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
