"""Spills: accumulated logits a chunk's windows leave in its right/lower neighbours, kept on disk.

A spill is a (C + 1, h, w) float32 array (weighted logit sums plus the weight sum) anchored at the
receiving chunk's top-left corner. Spills live on disk, not in memory, so memory stays flat however
wide the slide is; each is written atomically and deleted once its receiver is done, so at most
about one row of chunks' worth is ever stored. Because they are files, an interrupted run resumes
with exactly the numbers it would have used, which keeps resumed output byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..storage import writing

#: Where a sender's spill goes, relative to the sender: direction name as seen by the receiver.
OUTGOING = (("left", 0, 1), ("top", 1, 0), ("topleft", 1, 1))
#: A chunk computed before it can be finished keeps its own accumulator under this name.
SELF = "self"


class SpillStore:
    """Spill files in one folder, named ``<cy>_<cx>.<direction>.npy`` after the receiving chunk."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, target: tuple[int, int], direction: str) -> Path:
        return self.folder / f"{target[0]}_{target[1]}.{direction}.npy"

    def put(self, target: tuple[int, int], direction: str, array: np.ndarray) -> None:
        path = self._path(target, direction)
        tmp = path.with_suffix(".tmp")
        with writing(path, "a spill of the partial output"):
            with open(tmp, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
            os.replace(tmp, path)

    def get(self, target: tuple[int, int], direction: str) -> np.ndarray:
        path = self._path(target, direction)
        if not path.exists():
            raise FileNotFoundError(
                f"Spill {path.name} is missing from {self.folder}; the partial output is inconsistent. "
                "Delete the '.partial' folder and run again."
            )
        return np.load(path)

    def drop(self, target: tuple[int, int]) -> None:
        for direction in (*(d for d, _, _ in OUTGOING), SELF):
            self._path(target, direction).unlink(missing_ok=True)


def split_accumulator(acc: np.ndarray, chunk_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Cut the parts of an accumulator that lie beyond its chunk, keyed by the receiver's direction."""
    h, w = chunk_hw
    parts = {"left": acc[:, :h, w:], "top": acc[:, h:, :w], "topleft": acc[:, h:, w:]}
    return {direction: part for direction, part in parts.items() if part.shape[1] and part.shape[2]}
