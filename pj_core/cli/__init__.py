"""The ``pj`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (``args -> exit code``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pj_core.errors import PersonaJudgeError

# Sub-command modules, in the order ``pj --help`` lists them.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "info",
    "generate",
    "serve",
    "keys",
    "eval",
    "personas",
    "profiles",
    "bench",
)


def csv_tuple(value: str) -> tuple[str, ...]:
    """An argparse ``type`` for comma-separated lists: ``"a, b,"`` -> ``("a", "b")``."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (``pj: error: ... (see pj CMD --help)``) and
    exit status 2, as the commands' own errors are one line; sub-command parsers are of the
    same class."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        self.exit(2, f"pj: error: {line} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = OneLineErrorParser(
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
        return _fail(str(exc))
    except BrokenPipeError:
        # The reader went away (``pj profiles list | head -1``): not an error of ours. Point
        # stdout at devnull so that the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout not a file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A file or folder the user named cannot be read or written (missing, a directory,
        # no permission): what and where, in one line.
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    # One line, whatever the message holds (a lone surrogate from a mis-decoded argument
    # cannot be printed as it is).
    line = " ".join(message.split()) or "failed"
    print(f"pj: error: {line}".encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
