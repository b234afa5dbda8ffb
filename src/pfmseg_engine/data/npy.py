"""Reading users' ``.npy`` files: plain numeric arrays only, never pickled objects.

An ``.npy`` file can hold Python objects (``dtype=object``), which numpy stores as a pickle; loading
one with ``allow_pickle=True`` runs whatever code the pickle names, and loading it without gives a
raw ``ValueError``. Masks and images are numbers, so the header is read first (no data), anything
that is not a bool, integer or float array is refused with a message naming the file, and the data
is then loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

#: dtype kinds an image or mask may hold: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"
_FIX = "save it with numpy.save from a numeric array (e.g. mask.astype(numpy.uint8))"


def npy_header(path: str | Path, what: str = "Array") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the ``.npy`` file ``path``, without reading its data.

    Raises a :class:`DataError` naming ``what`` and the file when it is not an ``.npy`` file or holds
    anything but numbers (objects, strings, records).
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            version = fmt.read_magic(handle)
            if version not in ((1, 0), (2, 0)):  # 3.0 only adds UTF-8 field names: records, never numbers
                raise ValueError(f"format version {version[0]}.{version[1]} is for arrays of records")
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _fortran, dtype = reader(handle)
    except (ValueError, EOFError, SyntaxError) as exc:
        raise DataError(f"{what} '{path}' is not a readable .npy file ({exc}); {_FIX}.") from exc
    if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
        raise DataError(f"{what} '{path}' holds {dtype} values, not numbers; only numeric arrays are read "
                        f"(Python objects would need unpickling, which can run code). {_FIX[0].upper()}{_FIX[1:]}.")
    return tuple(int(n) for n in shape), dtype


def load_npy(path: str | Path, what: str = "Array", mmap_mode: Any = None) -> np.ndarray:
    """The numeric array of the ``.npy`` file ``path`` (checked by :func:`npy_header`; never unpickled)."""
    npy_header(path, what)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # e.g. a file cut short: fewer bytes than the header promises
        raise DataError(f"{what} '{path}' is not a readable .npy file ({exc}); {_FIX}.") from exc
