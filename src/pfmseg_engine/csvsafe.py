"""CSV writers whose cells a spreadsheet never runs as formulas.

Slide, image and class names reach our CSV files from manifests, dataset JSON and annotations. A
spreadsheet that opens ``summary.csv`` runs a cell such as ``=HYPERLINK("http://...")`` as a formula
(CSV injection), so every text cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
gets a leading single quote, the OWASP rule: the spreadsheet then shows the text as it was written.
Numbers are never touched, neither numbers written as numbers nor numeric text such as ``-0.25`` or
``-inf`` (our writers format floats before writing them), so every column keeps reading as numbers.

Every CSV the engine writes goes through :func:`writer` or :class:`DictWriter`, drop-in replacements
of :func:`csv.writer` and :class:`csv.DictWriter`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: First characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)


def neutralise(value: Any) -> Any:
    """``value`` as a CSV cell that cannot run as a formula: text starting with a formula character gets
    a leading ``'``; numbers, numeric text and everything else are returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def restore(value: Any) -> Any:
    """The text :func:`neutralise` was given, for the engine reading back a CSV it wrote."""
    if isinstance(value, str) and value[:1] == "'" and value[1:].startswith(FORMULA_STARTS) \
            and not _NUMBER.fullmatch(value[1:]):
        return value[1:]
    return value


class _Writer:
    """:func:`csv.writer` with every cell passed through :func:`neutralise`."""

    def __init__(self, stream: Any, **kwargs: Any):
        self._writer = csv.writer(stream, **kwargs)
        self.dialect = self._writer.dialect

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([neutralise(cell) for cell in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(stream: Any, **kwargs: Any) -> _Writer:
    """A :func:`csv.writer` on ``stream`` (same arguments) that neutralises formula cells."""
    return _Writer(stream, **kwargs)


class DictWriter(csv.DictWriter):
    """:class:`csv.DictWriter` that neutralises formula cells (the header too: it is written as a row)."""

    def writerow(self, rowdict: Mapping[str, Any]) -> Any:
        return super().writerow({key: neutralise(value) for key, value in rowdict.items()})

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)
