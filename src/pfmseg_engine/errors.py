"""Exception types of the engine.

Every error a user can cause is raised as a :class:`PfmsegError` subclass whose message names the
offending value and says how to fix it, so the CLI can print the message alone (no traceback) and the
napari plugin can show it as a notification.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class PfmsegError(Exception):
    """Base class of every error the engine raises on purpose.

    The message words its fix for every caller (Python keywords, config keys, plain words), never in one
    front end's spelling. ``fix_with`` names the settings that fix it, each a setting's Python name,
    with the value that fixes it where the name alone does not say ("mpp", "tissue=False"), so a front
    end that spells settings its own way (the CLI's flags) can add its spelling to the message. The
    names travel with the exception when it is pickled (a cluster task's error).
    """

    def __init__(self, *args: object, fix_with: Iterable[str] = ()):
        super().__init__(*args)
        self.fix_with: tuple[str, ...] = tuple(fix_with)


class ConfigError(PfmsegError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class UnknownBackboneError(ConfigError, KeyError):
    """A backbone name is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(PfmsegError):
    """A weights file cannot be read or does not fit the architecture."""


class CheckpointError(PfmsegError):
    """A model checkpoint cannot be read or does not fit the model it is loaded into."""


class DataError(PfmsegError, ValueError):
    """Input images, masks or annotations are unusable."""


class SlideError(PfmsegError):
    """A slide cannot be opened or read."""


class StorageError(PfmsegError):
    """An output cannot be written (disk full, permissions, a file in the way, another writer)."""


class PixelLimitError(PfmsegError):
    """An input claims more pixels than may be decoded at once (``PFMSEG_MAX_PIXELS``, see
    :mod:`pfmseg_engine.limits`): a decompression bomb, a corrupt header, or a genuine file too large to read
    whole. Raised before anything is decoded, so a hostile file costs nothing."""


class SlidePixelLimitError(SlideError, PixelLimitError):
    """A slide (a PNG/JPEG slide, a tile, a level without a pyramid) is over the pixel limit."""


class ImagePixelLimitError(DataError, PixelLimitError):
    """A training or evaluation image, mask or tissue ROI image is over the pixel limit."""


class TrainingScaleWarning(UserWarning):
    """A slide is predicted at another resolution than its model was trained at.

    ``mismatch`` holds the comparison (:class:`~pfmseg_engine.training_scale.ScaleMismatch`), so a front
    end can word the fix in its own terms.
    """

    def __init__(self, message: str, mismatch: Any = None):
        super().__init__(message)
        self.mismatch = mismatch


def closest(name: str, choices: Iterable[str]) -> str:
    """Return a ' Did you mean ...?' hint for a mistyped name, or an empty string."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return f" Did you mean '{lowered[match[0]]}'?" if match else ""


def reject_unknown_keys(data: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise a :class:`ConfigError` naming the first key of ``data`` not in ``known`` and its closest match."""
    known = sorted(known)
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(
            f"Unknown {what} '{unknown[0]}'.{closest(unknown[0], known)} Valid: {', '.join(known)}."
        )
