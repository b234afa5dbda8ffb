"""``python -m pfmseg_engine``: the headless command line.

Subcommands live in :mod:`pfmseg_engine.commands`, one module each, listed in :data:`COMMANDS`. Each
module's ``register(subparsers)`` adds its parser; errors the engine raises on purpose, and every
file-system fault (``OSError``: disk full, permissions, a vanished file), are printed as one clear
message (no traceback; ``--debug`` adds it) with exit code 2. Engine errors and warnings word their fix
for every caller; the CLI adds its own flag for it (:mod:`pfmseg_engine.commands.hints`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .commands.hints import FlagHints, flag_hint
from .errors import PfmsegError
from .storage import describe_os_error

COMMANDS: tuple[str, ...] = ("models", "train", "evaluate", "infer", "demo", "benchmark", "compare",
                             "features", "suggest")


def available_commands() -> list[str]:
    """Command modules that are installed (all of :data:`COMMANDS` in a complete install)."""
    found = []
    for name in COMMANDS:
        try:
            importlib.import_module(f"pfmseg_engine.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pfmseg_engine.commands.{name}":
                raise
            continue
        found.append(name)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pfmseg_engine",
        description="Segment histopathology images and whole slides with pathology foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"pfmseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error, and dask's INFO logs on a cluster")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in available_commands():
        importlib.import_module(f"pfmseg_engine.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    dests = vars(args)
    handler = logging.StreamHandler()
    handler.addFilter(FlagHints(dests))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except PfmsegError as exc:
        return _fail(f"{exc}{flag_hint(exc, dests)}", args.debug)
    except OSError as exc:  # a fault no engine code wrapped: still one sentence, never a traceback
        return _fail(describe_os_error(exc, action="accessing"), args.debug)
    except KeyboardInterrupt:
        print("interrupted: completed work is kept; run the same command again to resume.", file=sys.stderr)
        return 130


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
