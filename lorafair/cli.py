"""The ``lorafair`` command (also ``python -m lorafair``): subcommands from a small table.

Each entry names a module with ``register(subparsers) -> None``, which adds its parser and sets
``run`` (``argparse.Namespace -> int``) as a default. Bad input (:class:`~lorafair.errors.
LoRAFairError`) prints one line and exits 2; an internal failure prints one line and exits 1;
neither prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from lorafair.errors import LoRAFairError

__all__ = ["build_parser", "main"]

_COMMANDS: tuple[tuple[str, str], ...] = (
    ("aggregate", "lorafair._aggregate_command"),
    ("bench", "lorafair.bench.cli"),
)
"""(name, module): each module's ``register(subparsers)`` adds the subcommand ``name``."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (exit 2) instead of usage plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every registered subcommand (modules imported here, not at import time)."""
    parser = _Parser(
        prog="lorafair",
        description="Server-side aggregation for federated LoRA, on peft adapter folders.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _COMMANDS:
        imported = importlib.import_module(module)
        imported.register(subparsers)
        if name not in subparsers.choices:
            raise RuntimeError(f"{module}.register did not add the {name!r} subcommand")
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lorafair COMMAND ...``; return the exit status (0 ok, 2 bad input, 1 internal)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed on one line)
        return exc.code if isinstance(exc.code, int) else 2
    run = getattr(args, "run", None)
    if run is None:
        commands = ", ".join(name for name, _ in _COMMANDS)
        print(f"lorafair: error: choose a command ({commands}; see --help)", file=sys.stderr)
        return 2
    prog = f"lorafair {args.command}"
    try:
        return int(run(args))
    except LoRAFairError as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise: one line, no traceback, exit 1
        print(
            f"{prog}: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(please report it with the command line)",
            file=sys.stderr,
        )
        return 1
