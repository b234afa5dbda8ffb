"""The run summary of a cohort: one :class:`SlideRecord` per slide, written as CSV, JSON and Markdown.

Status of a slide: ``done`` (computed in this run, ``resumed`` when a ``.partial`` output was
continued), ``reused`` (its output was complete already), ``failed`` (with the error after every
retry) or ``pending`` (the run was interrupted first). ``summary.csv`` (one row per slide, for
spreadsheets and pandas), ``summary.json`` (the same plus the run's settings and counts) and
``summary.md`` (a table for people, failures listed with their errors) go to the output folder,
each written atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import csvsafe
from ..errors import PfmsegError
from ..storage import describe_os_error, writing

if TYPE_CHECKING:
    from ..inference.slide import SlideResult
    from ..jobs.prediction import PredictionOutcome

STATUSES = ("done", "reused", "failed", "pending")
COLUMNS = ("slide", "name", "status", "seconds", "tissue_mm2", "chunks_run", "chunks_total", "windows",
           "windows_per_s", "resumed", "output", "worker", "error")
FILES = ("summary.csv", "summary.json", "summary.md")


def describe_error(exc: BaseException) -> str:
    """One line for the summary: the engine's own message, else the exception's type and text."""
    if isinstance(exc, PfmsegError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = describe_os_error(exc, action="accessing")
    elif type(exc).__name__ == "KilledWorker":
        text = (f"the worker process running it died repeatedly ({exc}); the slide may crash its reader or "
                "exhaust memory")
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


@dataclass
class SlideRecord:
    """What happened to one slide (``result``/``exception`` stay in memory; the rest is written)."""

    slide: str
    name: str
    status: str
    seconds: float | None = None
    tissue_mm2: float | None = None
    chunks_run: int | None = None
    chunks_total: int | None = None
    windows: int | None = None
    windows_per_s: float | None = None
    resumed: bool = False
    output: str | None = None
    worker: str | None = None
    error: str | None = None
    exports: list[str] = field(default_factory=list)
    outcome: PredictionOutcome | None = field(default=None, repr=False, compare=False)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def result(self) -> SlideResult | None:
        """The executor's result of a slide that finished (None when it failed or is pending)."""
        return self.outcome.result if self.outcome is not None else None

    @classmethod
    def from_outcome(cls, slide: str, outcome: PredictionOutcome) -> SlideRecord:
        """The record of a slide that finished (``outcome``: from :func:`~.jobs.predict_job`)."""
        result = outcome.result
        run_seconds = result.seconds if result is not None else 0.0
        windows = result.windows_run if result is not None else 0
        rate = windows / run_seconds if windows and run_seconds else None
        return cls(slide=slide, name=outcome.name, status=outcome.status, seconds=outcome.seconds,
                   tissue_mm2=outcome.tissue_mm2, chunks_run=outcome.chunks_run,
                   chunks_total=result.chunks_total if result is not None else None, windows=windows,
                   windows_per_s=rate, resumed=bool(result is not None and result.resumed),
                   output=str(outcome.path), worker=outcome.worker, exports=[str(p) for p in outcome.exports],
                   outcome=outcome)

    @classmethod
    def from_error(cls, slide: str, name: str, exc: BaseException, seconds: float | None = None,
                   worker: str | None = None) -> SlideRecord:
        return cls(slide=slide, name=name, status="failed", seconds=seconds, worker=worker,
                   error=describe_error(exc), exception=exc)

    def row(self) -> dict[str, Any]:
        """The written fields, rounded for people."""
        return {"slide": self.slide, "name": self.name, "status": self.status, "seconds": _round(self.seconds, 2),
                "tissue_mm2": _round(self.tissue_mm2, 4), "chunks_run": self.chunks_run,
                "chunks_total": self.chunks_total, "windows": self.windows,
                "windows_per_s": _round(self.windows_per_s, 1), "resumed": self.resumed, "output": self.output,
                "worker": self.worker, "error": self.error}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass
class CohortSummary:
    """All records of a run, in input order, and how to write them."""

    records: list[SlideRecord]
    output_dir: Path
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(r.status for r in self.records)
        return {status: counted.get(status, 0) for status in STATUSES}

    @property
    def failed(self) -> list[SlideRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """Every slide is done or reused."""
        return all(r.status in ("done", "reused") for r in self.records)

    def line(self) -> str:
        counts = self.counts
        parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("done", "failed")]
        return f"{len(self.records)} slides: {', '.join(parts)} in {self.seconds:.1f} s"

    # ---- writing ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {"pfmseg": __version__, "output_dir": str(self.output_dir), "seconds": round(self.seconds, 2),
                "counts": self.counts, "settings": self.settings,
                "slides": [{**r.row(), "exports": r.exports} for r in self.records]}

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csvsafe.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow({k: "" if v is None else v for k, v in record.row().items()})
        return buffer.getvalue()

    def markdown(self) -> str:
        lines = ["# pfmseg cohort run", "", f"{self.line()}; outputs in `{self.output_dir}`.", "",
                 "| slide | status | seconds | tissue mm² | chunks | windows/s |",
                 "|---|---|---:|---:|---:|---:|"]
        for r in self.records:
            chunks = "" if r.chunks_total is None else f"{r.chunks_run}/{r.chunks_total}"
            status = r.status + (" (resumed)" if r.resumed else "")
            cells = [_md(r.name), status, _fmt(r.seconds, ".1f"), _fmt(r.tissue_mm2, ".2f"), chunks,
                     _fmt(r.windows_per_s, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
        if self.failed:
            lines += ["", "## Failed", ""]
            lines += [f"- **{_md(r.name)}** (`{r.slide}`): {_md(r.error or '')}" for r in self.failed]
            lines += ["", "Run the same cohort again to retry them; finished slides are reused."]
        return "\n".join(lines) + "\n"

    def write(self) -> dict[str, Path]:
        """Write summary.csv, summary.json and summary.md into the output folder (atomically)."""
        texts = {"summary.csv": self.csv_text(), "summary.json": json.dumps(self.to_dict(), indent=1) + "\n",
                 "summary.md": self.markdown()}
        paths = {}
        for name, text in texts.items():
            path = Path(self.output_dir) / name
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            with writing(path, "the run summary"):
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            paths[name] = path
        return paths


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = ["COLUMNS", "FILES", "STATUSES", "CohortSummary", "SlideRecord", "describe_error"]
