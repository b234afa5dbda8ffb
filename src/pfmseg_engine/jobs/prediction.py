"""Slide prediction as one job: plan -> execute -> export -> measure, with one settings object.

:class:`SlidePrediction` is the single place a slide run is put together; the CLI (``infer --slide``),
the cluster task (:func:`pfmseg_engine.distributed.jobs.predict_job`) and the napari Predict widget only
build its :class:`PredictionSettings` and read its events. The settings extend the planner's
:class:`~pfmseg_engine.inference.plan.SlideInferenceConfig` (their plan fields and defaults are its own), so
the same slide and model plan the same windows and get the same output fingerprint from every front end,
and each reuses or resumes the others' output.

:meth:`SlidePrediction.plan` is torch-free and cheap (a viewer calls it on its GUI thread to lay out the
output layer); :meth:`SlidePrediction.iter_run` runs the plan and yields typed events (:class:`Planned`,
:class:`ChunkDone`, :class:`Stage`), returning a :class:`PredictionOutcome`; :meth:`SlidePrediction.cancel`
stops it after the current chunk, leaving the ``.partial`` output resumable.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..inference.plan import SUFFIX, ModelInfo, SlideInferenceConfig, SlidePlan, plan_slide
from .settings import overlay

if TYPE_CHECKING:
    from ..colors import ClassColors
    from ..inference.slide import ChunkResult, SlideResult
    from ..slides import Slide
    from ..training_scale import ScaleMismatch

#: Export kinds and the file each writes beside ``<name>.ome.zarr``.
EXPORT_FILES: dict[str, str] = {"ome-tiff": "{name}.labels.ome.tif", "geojson": "{name}.geojson"}
EXPORTS: tuple[str, ...] = tuple(EXPORT_FILES)


@dataclass(frozen=True)
class PredictionSettings(SlideInferenceConfig):
    """Everything a slide prediction can be told; the defaults of every front end.

    Plan fields are :class:`~pfmseg_engine.inference.plan.SlideInferenceConfig`'s. Run fields:
    ``device`` (None/"auto": CUDA, else MPS, else CPU), ``mpp`` and ``reader`` (how a slide given as a path
    is opened: level-0 µm/px when the file lacks it, and the reader), ``overwrite`` (recompute a complete
    output), ``wait`` (seconds to wait for another process writing the same output; None: as long as it
    takes), ``exports`` (kinds of :data:`EXPORTS` written beside the store; ``geojson_options`` go to
    :func:`~pfmseg_engine.inference.geojson_export.export_geojson`), ``measure`` (write
    ``<name>_measurements.csv`` and read its rows into the outcome).
    """

    device: str | None = None
    mpp: float | None = None
    reader: str = "auto"
    overwrite: bool = False
    wait: float | None = 0.0
    exports: tuple[str, ...] = ()
    geojson_options: Mapping[str, Any] = field(default_factory=dict)
    measure: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "exports", tuple(self.exports or ()))
        unknown = [kind for kind in self.exports if kind not in EXPORT_FILES]
        if unknown:
            raise ConfigError(f"Unknown export '{unknown[0]}'; exports are {', '.join(EXPORTS)}.")

    def with_overrides(self, **changes: Any) -> PredictionSettings:
        """These settings with the given fields changed (None values keep the current value)."""
        return overlay(self, changes, "prediction")

    @classmethod
    def of(cls, config: SlideInferenceConfig | Mapping[str, Any] | None = None, **changes: Any) -> PredictionSettings:
        """Settings from a :class:`PredictionSettings`, a ``SlideInferenceConfig`` or its dict, with ``changes``."""
        if isinstance(config, PredictionSettings):
            base = config
        elif isinstance(config, SlideInferenceConfig):
            base = cls(**config.to_dict())
        else:
            base = overlay(cls(), dict(config or {}), "prediction")
        return base.with_overrides(**changes)


# ---- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    """The run's plan, before any chunk is computed (the first event)."""

    plan: SlidePlan


@dataclass(frozen=True)
class ChunkDone:
    """A finished output chunk, in the store (see :class:`~pfmseg_engine.inference.slide.ChunkResult`)."""

    chunk: ChunkResult


@dataclass(frozen=True)
class Stage:
    """A step after the store is complete begins: ``"export"`` or ``"measure"``."""

    name: str


PredictionEvent = Planned | ChunkDone | Stage


@dataclass
class PredictionOutcome:
    """How a slide prediction ended and what it wrote.

    ``status``: "done" (computed, or resumed, in this run), "reused" (the output was complete already) or
    "cancelled" (the ``.partial`` output is kept and resumes). ``result`` is the executor's
    :class:`~pfmseg_engine.inference.slide.SlideResult` (None when cancelled); ``plan`` is None once the
    outcome left the process that planned it (it holds the open slide).
    """

    status: str
    path: Path
    name: str
    plan: SlidePlan | None = field(default=None, repr=False)
    result: SlideResult | None = None
    plan_summary: str = ""
    tissue_mm2: float | None = None
    exports: tuple[Path, ...] = ()
    measurements: Path | None = None
    measurement_rows: tuple[dict[str, Any], ...] = ()
    chunks_run: int = 0
    seconds: float = 0.0
    worker: str = ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["plan"] = None
        if self.result is not None and self.result.slide_plan is not None:
            import dataclasses

            state["result"] = dataclasses.replace(self.result, slide_plan=None)
        return state


def worker_id() -> str:
    """host:pid of this process (where a slide ran)."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---- the job -------------------------------------------------------------------------------------
class SlidePrediction:
    """Predict one slide (or a region of it) into ``<output_dir>/<name>.ome.zarr``.

    ``model`` is the model to run, or just its :class:`~pfmseg_engine.inference.plan.ModelInfo` to plan
    without one (a dry run).
    ``slide`` is an open :class:`~pfmseg_engine.slides.Slide` (the caller keeps it) or a path (opened with
    ``settings.mpp``/``settings.reader`` and closed when the run ends). ``region`` and ``priority_box`` are
    (x, y, width, height) in slide level-0 pixels: only that part is predicted, or that part is finished
    first. ``new_name`` never reuses or overwrites a finished output: the name gets ``-2``, ``-3``...
    ``class_colors`` (list by class, or class name -> RGB) go into the image-label metadata.
    """

    def __init__(self, model: Any, slide: Slide | str | Path, output_dir: str | Path,
                 settings: PredictionSettings | None = None, *,
                 region: tuple[float, float, float, float] | None = None,
                 priority_box: tuple[float, float, float, float] | None = None, name: str | None = None,
                 new_name: bool = False, class_colors: ClassColors | None = None):
        self.model = model
        self.settings = settings if settings is not None else PredictionSettings()
        self.output_dir = Path(output_dir).expanduser()
        self.region, self.priority_box, self.name = region, priority_box, name
        self.new_name, self.class_colors = new_name, class_colors
        self.outcome: PredictionOutcome | None = None
        self._slide_source = slide
        self._slide: Slide | None = None
        self._plan: SlidePlan | None = None
        self._cancel = threading.Event()

    # -- planning (torch-free) --
    def plan(self) -> SlidePlan:
        """The run's plan (made once; tissue detection happens when the run first needs it)."""
        if self._plan is None:
            slide = self._open()
            info = self.model if isinstance(self.model, ModelInfo) else ModelInfo.from_model(self.model)
            plan = plan_slide(slide, info, self.settings, region=self.region, priority_box=self.priority_box,
                              output_dir=self.output_dir, name=self.name)
            if self.new_name:
                free = free_name(self.output_dir, plan.name)
                if free != plan.name:
                    plan = plan_slide(slide, info, self.settings, region=self.region,
                                      priority_box=self.priority_box, output_dir=self.output_dir, name=free)
            self._plan = plan
        return self._plan

    def scale_mismatch(self) -> ScaleMismatch | None:
        """How far the planned resolution is from the scale the model was trained at (None: close enough
        or unknown); front ends word it for their users."""
        from ..training_scale import check_training_scale, training_scale_of

        scale = self.model.training_scale if isinstance(self.model, ModelInfo) else training_scale_of(self.model)
        return check_training_scale(scale, self.plan().mpp)

    def _open(self) -> Slide:
        if self._slide is None:
            from ..slides import Slide, open_slide

            source = self._slide_source
            self._slide = source if isinstance(source, Slide) else open_slide(
                source, mpp=self.settings.mpp, reader=self.settings.reader)
        return self._slide

    def close(self) -> None:
        """Close the slide if the job opened it (a run closes it when it ends)."""
        from ..slides import Slide

        if self._slide is not None and not isinstance(self._slide_source, Slide):
            self._slide.close()
            self._slide, self._plan = None, None

    # -- control --
    def cancel(self) -> None:
        """Stop after the current chunk (thread-safe); the finished chunks stay and the run resumes later."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- running --
    def run(self, callback: Callable[[PredictionEvent], Any] | None = None) -> PredictionOutcome:
        """:meth:`iter_run` to the end; ``callback`` sees every event (an exception it raises stops the run,
        which then resumes on the next call)."""
        events = self.iter_run()
        try:
            while True:
                event = next(events)
                if callback is not None:
                    callback(event)
        except StopIteration as stop:
            outcome: PredictionOutcome = stop.value
            return outcome
        finally:
            events.close()

    def iter_run(self) -> Generator[PredictionEvent, None, PredictionOutcome]:
        """Plan, execute, export and measure, yielding events; returns (and keeps in :attr:`outcome`) the outcome."""
        from ..devices import resolve_device
        from ..inference.slide import iter_execute_plan

        start = time.perf_counter()
        settings = self.settings
        try:
            device = str(resolve_device(settings.device))
            plan = self.plan()
            yield Planned(plan)
            reused = plan.final.exists() and not settings.overwrite
            chunks_run = 0
            execution = iter_execute_plan(plan, self.model, device=device, overwrite=settings.overwrite,
                                          class_colors=self.class_colors, wait=settings.wait)
            try:
                while True:
                    try:
                        chunk = next(execution)
                    except StopIteration as stop:
                        result: SlideResult = stop.value
                        break
                    chunks_run += int(chunk.computed)
                    yield ChunkDone(chunk)
                    if self._cancel.is_set():
                        return self._finish(PredictionOutcome(
                            "cancelled", plan.final, plan.name, plan=plan, plan_summary=plan.summary(),
                            chunks_run=chunks_run, worker=worker_id()), start)
            finally:
                execution.close()
            outcome = PredictionOutcome("reused" if reused else "done", result.path, result.name, plan=plan,
                                        result=result, plan_summary=plan.summary(),
                                        tissue_mm2=plan.tissue_area_mm2(), chunks_run=result.chunks_run,
                                        worker=worker_id())
            if settings.exports:
                yield Stage("export")
                outcome.exports = tuple(export(result.path, settings.exports, only_missing=reused,
                                               geojson_options=settings.geojson_options))
            if settings.measure:
                from ..annotations.measurements import read_measurements

                yield Stage("measure")
                outcome.measurements = measure(result.path, only_missing=reused)
                outcome.measurement_rows = tuple(read_measurements(outcome.measurements))
            return self._finish(outcome, start)
        finally:
            self.close()

    def _finish(self, outcome: PredictionOutcome, start: float) -> PredictionOutcome:
        outcome.seconds = time.perf_counter() - start
        self.outcome = outcome
        return outcome


# ---- what a finished output gets -----------------------------------------------------------------
def export(store: Path, kinds: Sequence[str], only_missing: bool = False,
           geojson_options: Mapping[str, Any] | None = None) -> list[Path]:
    """Write the requested exports of a finished output (keeping existing ones when ``only_missing``)."""
    from ..inference.export_tiff import export_ome_tiff
    from ..inference.geojson_export import export_geojson

    exporters: dict[str, Callable[[Path], Any]] = {
        "ome-tiff": export_ome_tiff, "geojson": lambda path: export_geojson(path, **dict(geojson_options or {}))}
    name = store.name.removesuffix(SUFFIX)
    written = []
    for kind in kinds or ():
        target = store.with_name(EXPORT_FILES[kind].format(name=name))
        if only_missing and target.exists():
            written.append(target)
            continue
        written.append(Path(exporters[kind](store)))
    return written


def measure(store: Path, only_missing: bool = False) -> Path:
    """The output's ``<name>_measurements.csv`` (area per class, regions, nucleus counts), written beside it."""
    from ..annotations.measurements import measurements_path, write_measurements

    target = measurements_path(store)
    return target if only_missing and target.exists() else write_measurements(store)


def free_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... so a finished output is never overwritten or reused."""
    candidate, n = name, 1
    while (folder / f"{candidate}{SUFFIX}").exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


__all__ = ["EXPORTS", "EXPORT_FILES", "ChunkDone", "Planned", "PredictionEvent", "PredictionOutcome",
           "PredictionSettings", "SlidePrediction", "Stage", "export", "free_name", "measure", "worker_id"]
