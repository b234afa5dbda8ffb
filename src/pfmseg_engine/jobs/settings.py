"""``with_overrides`` for the jobs' settings dataclasses: one place for defaults, callers change only what
they were given.

A front end collects what its user set (CLI flags that default to None, form fields left at "model's")
and overlays it: ``None`` means "not given" and keeps the default, so no front end restates one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ..errors import ConfigError

S = TypeVar("S")


def overlay(settings: S, changes: dict[str, Any], what: str) -> S:
    """``settings`` (a dataclass instance) with the non-None ``changes`` applied; an unknown name is a
    :class:`~pfmseg_engine.errors.ConfigError` that lists the valid ones."""
    names = [f.name for f in dataclasses.fields(settings)]  # type: ignore[arg-type]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ConfigError(f"Unknown {what} setting '{unknown[0]}'; settings are {', '.join(names)}.")
    given = {name: value for name, value in changes.items() if value is not None}
    return dataclasses.replace(settings, **given) if given else settings  # type: ignore[type-var]


__all__ = ["overlay"]
