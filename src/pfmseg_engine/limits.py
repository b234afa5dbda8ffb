"""The pixel limit: how many pixels a file may claim before anything of it is decoded whole.

A file's size comes from its header, which costs a few bytes to forge: a 0.5 MB TIFF can claim
10^12 pixels, a 100 KB PNG 30,000 x 30,000. Whatever is decoded whole (an image or mask, a PNG/JPEG
slide, one tile or strip of a slide, a slide level shown without a pyramid, the tissue thumbnail) is
checked against one budget, from the header, before a single pixel is decoded:

* ``PFMSEG_MAX_PIXELS``, an environment variable, is the one setting (default :data:`DEFAULT_MAX_PIXELS`,
  2^28 = 268 million pixels: a 16,384 x 16,384 image, 0.8 GB as RGB). It is read at every check, so
  dask workers, the napari plugin and the command line follow the same value, and a genuine larger
  file needs no code change.
* Pyramid levels are read tile by tile and may have any size. Tissue detection on a slide without a
  level near its resolution scans one level whole (in bounded memory, block by block), up to
  :data:`SCAN_FACTOR` times the budget.

Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, process-wide) is never changed for longer than Pillow
takes to parse a header: :func:`open_image` lifts it under a lock for ``Image.open`` only (which
reads the header and decodes nothing), restores it, and checks the size against this budget before
the caller decodes anything.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError, ImagePixelLimitError, PixelLimitError

#: The environment variable that sets the pixel limit.
MAX_PIXELS_ENV = "PFMSEG_MAX_PIXELS"
#: Pixels decoded at once without ``PFMSEG_MAX_PIXELS``: 2^28, a 16,384 x 16,384 image.
DEFAULT_MAX_PIXELS = 1 << 28
#: Tissue detection may scan a level of up to this many times the limit (read block by block, never
#: held whole): 2^36 px by default, a 262,144 x 262,144 level, more than any real slide's level 0.
SCAN_FACTOR = 256

_PIL_LOCK = threading.Lock()


def max_pixels() -> int:
    """The pixel limit: ``PFMSEG_MAX_PIXELS`` when set (a positive integer, ``1e9`` style allowed), else the default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw) if raw.isdigit() else int(float(raw))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive number of pixels; set it to e.g. "
                          f"{DEFAULT_MAX_PIXELS * 4} or unset it for the default ({DEFAULT_MAX_PIXELS}).")
    return value


def check_pixels(height: int, width: int, source: str, *, error: type[PixelLimitError] = ImagePixelLimitError,
                 remedy: str = "", fix_with: Sequence[str] = (), scale: int = 1) -> None:
    """Raise ``error`` when ``height x width`` exceeds ``scale`` times the pixel limit.

    ``source`` starts the message ("Image 'a.png'"); ``remedy`` (a sentence) says what to do besides
    raising the limit, ``fix_with`` the settings it names (:attr:`~pfmseg_engine.errors.PfmsegError.fix_with`).
    The message names the size, the limit and the setting that raises it.
    """
    pixels = int(height) * int(width)
    budget = max_pixels()
    limit = budget * scale
    if pixels <= limit:
        return
    allowed = f"{limit:,} pixels ({scale} x {MAX_PIXELS_ENV}={budget:,})" if scale > 1 else \
        f"{limit:,} pixels ({MAX_PIXELS_ENV})"
    raise error(
        f"{source} is {int(width):,} x {int(height):,} px ({pixels:,} pixels), more than the {allowed} pfmseg "
        f"reads whole; refused before decoding anything (a header claiming this much is usually a corrupt "
        f"file or a decompression bomb). {remedy + ' ' if remedy else ''}If the size is genuine, set the "
        f"environment variable {MAX_PIXELS_ENV}={-(-pixels // scale)} (or more) and retry.",
        fix_with=fix_with,
    )


def _open_header(path: Path) -> Any:
    """``PIL.Image.open(path)``: the header parsed, no pixel decoded, whatever size it claims.

    Pillow refuses (or warns about) large images inside ``Image.open``, before the caller could read
    the size and say something useful; its limit is lifted for that call only and restored at once.
    """
    from PIL import Image

    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(height, width) an image file's header claims, without decoding it (no limit applies)."""
    with _open_header(Path(path)) as img:
        width, height = img.size
    return int(height), int(width)


@contextmanager
def open_image(path: str | Path, source: str, *, error: type[PixelLimitError] = ImagePixelLimitError,
               remedy: str = "") -> Iterator[Any]:
    """A lazily opened PIL image whose claimed size is within the pixel limit (else ``error``).

    Decode inside the ``with`` block (``convert``, ``np.asarray``); the file is closed on exit.
    Opening errors (not an image, truncated header) propagate as Pillow raises them.
    """
    img = _open_header(Path(path))
    try:
        width, height = img.size
        check_pixels(height, width, source, error=error, remedy=remedy)
        yield img
    finally:
        img.close()
