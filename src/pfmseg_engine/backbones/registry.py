"""Name lookup over the backbone tables in :mod:`pfmseg_engine.backbones.specs` (PFMs and baselines)."""

from __future__ import annotations

from ..errors import UnknownBackboneError, closest
from .specs import ALL_SPECS, BackboneSpec

_BY_NAME: dict[str, BackboneSpec] = {spec.name: spec for spec in ALL_SPECS}
_ALIASES: dict[str, str] = {}
for _spec in ALL_SPECS:
    for _alias in (_spec.name, *_spec.aliases):
        _ALIASES[_alias.lower()] = _spec.name


def list_backbones() -> list[str]:
    """Names of every registered backbone, in table order (PFMs, then from-scratch baselines)."""
    return [spec.name for spec in ALL_SPECS]


def get_spec(name: str) -> BackboneSpec:
    """The spec for ``name`` (seed config names and listed aliases, case-insensitive)."""
    canonical = _ALIASES.get(str(name).lower())
    if canonical is None:
        raise UnknownBackboneError(
            f"Unknown backbone '{name}'.{closest(str(name), _ALIASES)} "
            f"Run 'python -m pfmseg_engine models' to list the {len(ALL_SPECS)} available backbones."
        )
    return _BY_NAME[canonical]
