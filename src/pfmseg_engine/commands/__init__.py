"""One module per CLI subcommand, each exposing ``register(subparsers)`` and ``run(args)``.

Every subcommand's ``--help`` shows a plain-text description and worked examples; :func:`add_command`
is the one place that lays them out, so no parser shows raw docstring markup.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_command(subparsers: argparse._SubParsersAction, name: str, *, summary: str, description: str,
                examples: Sequence[str]) -> argparse.ArgumentParser:
    """Add subcommand ``name``: ``summary`` in the command list, ``description`` and ``examples`` in its help."""
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    return subparsers.add_parser(name, help=summary, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
