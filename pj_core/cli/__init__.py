"""The ``pj`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pj_core.errors import PersonaJudgeError

# Sub-command modules, in the order ``pj --help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = ("info", "generate", "eval", "personas", "profiles", "bench")


def csv_tuple(value: str) -> tuple[str, ...]:
    """An argparse ``type`` for comma-separated lists: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="pj", description="Persona-judge: personalised decoding with local open models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"pj_core.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pj`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except PersonaJudgeError as exc:
        # Our errors already say what to do; a traceback would only hide that.
        print(f"pj: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
