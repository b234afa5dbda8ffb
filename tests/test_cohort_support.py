"""Helpers of the cohort tests (no tests here): a stand-in model that cluster workers import, and slides.

Worker processes import this module by name (the tests folder is on their ``PYTHONPATH``), so the
model loader passed to them is pickled by reference: ``load("hold=PORT:FOLDER", None, "cpu")`` gives
the stand-in model and makes the first worker that records a finished chunk report its PID over a
socket and stop there (:func:`hold_first_finished_chunk`), so a test kills a worker mid-slide at a
known point, never a guessed moment. The hold is not part of the model, so held and plain runs write
byte-identical outputs.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

from test_wsi_support import PixelModel
from testdata import CMU, TCGA

TESTS = Path(__file__).resolve().parent
#: Settings that make a slide region quick to predict with the stand-in model.
CONFIG = {"window": 128, "overlap": 0.25, "chunk": 256, "tissue": False, "batch_size": 4}


class CohortModel(PixelModel):
    """The stand-in model of the cohort tests."""


def hold_first_finished_chunk(folder: Path, port: int) -> None:
    """In a worker process: the first process to record a finished chunk (``folder/claimed`` says which)
    sends its PID to ``port`` on this host and stops there, output lock held, until it is killed; every
    other process, and the retried job, goes on."""
    from pfmseg_engine.inference import slide as engine_slide

    mark_done = engine_slide._Output.mark_done
    if getattr(mark_done, "holds", False):
        return

    def held(self, index: tuple[int, int], nonempty: bool) -> None:
        mark_done(self, index, nonempty)
        try:
            os.close(os.open(folder / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(str(os.getpid()).encode())
        threading.Event().wait()  # until killed

    held.holds = True
    engine_slide._Output.mark_done = held


def load(checkpoint: str, weights: str | None, device: str) -> CohortModel:
    """A model loader for predict_job: the checkpoint string "hold=PORT:FOLDER" holds the first worker that
    finishes a chunk (:func:`hold_first_finished_chunk`); any other string gives the plain stand-in."""
    spec = str(checkpoint)
    if spec.startswith("hold="):
        port, _, folder = spec.removeprefix("hold=").partition(":")
        hold_first_finished_chunk(Path(folder), int(port))
    return CohortModel()


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
