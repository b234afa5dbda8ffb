"""Helpers of the cohort tests (no tests here): a stand-in model that cluster workers import, and slides.

Worker processes import this module by name (the tests folder is on their ``PYTHONPATH``), so the
model loader passed to them is pickled by reference: ``load("delay=0.25", None, "cpu")`` gives a
:class:`CohortModel` that sleeps that long per batch (to catch a worker mid-slide). The delay is not
part of the model's weights, so slow and fast runs write byte-identical outputs.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from test_wsi_support import PixelModel
from testdata import CMU, TCGA

TESTS = Path(__file__).resolve().parent
#: Settings that make a slide region quick to predict with the stand-in model.
CONFIG = {"window": 128, "overlap": 0.25, "chunk": 256, "tissue": False, "batch_size": 4}


class CohortModel(PixelModel):
    """PixelModel that can be slowed down (``delay`` seconds per batch; not a weight)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = float(delay)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return super().forward(x)


def load(checkpoint: str, weights: str | None, device: str) -> CohortModel:
    """A model loader for predict_job: the checkpoint string "delay=S" slows the model down."""
    return CohortModel(float(str(checkpoint).partition("delay=")[2] or 0.0))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def outputs(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every finished output in ``folder``, file by file."""
    return {p.name: tree(p) for p in sorted(folder.glob("*.ome.zarr"))}


def slide_folder(root: Path) -> dict[str, Path]:
    """Copies of the shipped slides, plus a truncated (corrupt) copy of the CMU slide."""
    folder = root / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    cmu = Path(shutil.copy(CMU, folder / CMU.name))
    tcga = Path(shutil.copy(TCGA, folder / TCGA.name))
    broken = folder / "broken.svs"
    data = CMU.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    return {"cmu": cmu, "tcga": tcga, "broken": broken}


def manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    """A manifest CSV with the given rows (columns: the union of the rows' keys, slide_path first)."""
    import csv

    columns = ["slide_path", *sorted({k for row in rows for k in row} - {"slide_path"})]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of ``folder/summary.csv``."""
    import csv

    return list(csv.DictReader((folder / "summary.csv").read_text().splitlines()))
