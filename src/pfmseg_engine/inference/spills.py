"""Spills: accumulated logits a chunk's windows leave in its right/lower neighbours, kept on disk.

A spill is a (C + 1, h, w) float32 array (weighted logit sums plus the weight sum) anchored at the
receiving chunk's top-left corner. Spills live on disk, not in memory, so memory stays flat however
wide the slide is; each is written atomically and deleted once its receiver is done, so at most
about one row of chunks' worth is ever stored. Because they are files, an interrupted run resumes
with exactly the numbers it would have used, which keeps resumed output byte-identical.

Writes happen behind the computation: :meth:`SpillStore.stage` keeps the spill in memory (on the
model's device, where the receiver will add it) and the run's writer thread saves it with
:meth:`SpillStore.save`, after which the memory copy is let go and :meth:`SpillStore.get` reads the
file. The writer saves a chunk's spills before it records the chunk as computed or done, so the
files a resumed run needs always exist.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..storage import writing

A = TypeVar("A", bound=Any)  # an accumulator: a device tensor, or an array

#: Where a sender's spill goes, relative to the sender: direction name as seen by the receiver.
OUTGOING = (("left", 0, 1), ("top", 1, 0), ("topleft", 1, 1))
#: A chunk computed before it can be finished keeps its own accumulator under this name.
SELF = "self"


class SpillStore:
    """Spill files in one folder, named ``<cy>_<cx>.<direction>.npy`` after the receiving chunk.

    ``load`` turns an array read back from disk into what :meth:`get` returns (e.g. a tensor on the
    model's device); by default the numpy array itself.
    """

    def __init__(self, folder: Path, load: Callable[[np.ndarray], Any] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.load = load or (lambda array: array)
        self._staged: dict[tuple[tuple[int, int], str], tuple[Any, Callable[[], np.ndarray]]] = {}
        self._lock = threading.Lock()

    def _path(self, target: tuple[int, int], direction: str) -> Path:
        return self.folder / f"{target[0]}_{target[1]}.{direction}.npy"

    def put(self, target: tuple[int, int], direction: str, array: np.ndarray) -> None:
        """Write a spill now (atomically)."""
        self._write(self._path(target, direction), array)

    def stage(self, target: tuple[int, int], direction: str, value: Any, host: Callable[[], np.ndarray]) -> None:
        """Hold a spill in memory (``value``, what :meth:`get` returns) until :meth:`save` writes ``host()``."""
        with self._lock:
            self._staged[(target, direction)] = (value, host)

    def save(self, target: tuple[int, int], direction: str) -> None:
        """Write a staged spill to disk, then let its memory copy go (the writer thread calls this)."""
        key = (target, direction)
        with self._lock:
            entry = self._staged.get(key)
        if entry is None:
            return
        self._write(self._path(target, direction), entry[1]())
        with self._lock:
            if self._staged.get(key) is entry:
                del self._staged[key]

    def _write(self, path: Path, array: np.ndarray) -> None:
        tmp = path.with_suffix(".tmp")
        with writing(path, "a spill of the partial output"):
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
            os.replace(tmp, path)

    def get(self, target: tuple[int, int], direction: str) -> Any:
        with self._lock:
            entry = self._staged.get((target, direction))
        if entry is not None:
            return entry[0]
        path = self._path(target, direction)
        if not path.exists():
            raise FileNotFoundError(
                f"Spill {path.name} is missing from {self.folder}; the partial output is inconsistent. "
                "Delete the '.partial' folder and run again."
            )
        return self.load(np.load(path, allow_pickle=False))

    def drop(self, target: tuple[int, int]) -> None:
        for direction in (*(d for d, _, _ in OUTGOING), SELF):
            with self._lock:
                self._staged.pop((target, direction), None)
            self._path(target, direction).unlink(missing_ok=True)


def split_accumulator(acc: A, chunk_hw: tuple[int, int]) -> dict[str, A]:
    """Cut the parts of an accumulator (a device tensor or an array) that lie beyond its chunk, keyed by the
    receiver's direction."""
    h, w = chunk_hw
    parts = {"left": acc[:, :h, w:], "top": acc[:, h:, :w], "topleft": acc[:, h:, w:]}
    return {direction: part for direction, part in parts.items() if part.shape[1] and part.shape[2]}
