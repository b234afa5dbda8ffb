"""Fine-tuning as one job: a trainer built from one data source, its events, and the model it leaves.

:class:`FineTune` trains on sparse annotations (napari labels; :meth:`FineTune.on_annotations`), on the
seed JSON dataset a config names (:meth:`FineTune.from_config`, the CLI's ``train``) or on whole slides
and their QuPath/napari annotations (:meth:`FineTune.on_slides`, ``train --slides``). The interactive
defaults live in :class:`FineTuneSettings`; a YAML config carries its own. :meth:`FineTune.iter_run`
yields typed events (:class:`Status`, :class:`ModelReady`, :class:`Step`, :class:`Epoch`) and returns a
:class:`FineTuneOutcome`; :meth:`FineTune.cancel`, :meth:`FineTune.pause` and :meth:`FineTune.resume` act
between batches. When the run ends the model holds the best checkpoint's weights (else the last completed
epoch's, else the weights it started from), so what is left behind is always a consistent model.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .settings import overlay

if TYPE_CHECKING:
    from ..training.callbacks import Callback, EpochInfo, StepInfo
    from ..training.config import TrainConfig
    from ..training.trainer import TrainEvent, TrainResult


@dataclass(frozen=True)
class FineTuneSettings:
    """Interactive fine-tuning on annotations: ``epochs``, ``batch_size``, ``learning_rate``,
    ``samples_per_epoch`` (patches drawn around annotated pixels per epoch), ``val_fraction`` (share of the
    annotated squares held out for validation), ``seed`` and ``device`` (None: CUDA, else MPS, else CPU)."""

    epochs: int = 5
    batch_size: int = 4
    learning_rate: float = 1e-3
    samples_per_epoch: int = 64
    val_fraction: float = 0.2
    seed: int = 42
    device: str | None = None

    def with_overrides(self, **changes: Any) -> FineTuneSettings:
        """These settings with the given fields changed (None values keep the current value)."""
        return overlay(self, changes, "fine-tuning")

    def sections(self, output_dir: str | Path, device: str) -> dict[str, dict[str, Any]]:
        """These settings as config sections, merged over a model's own config.

        Data loading stays in the training thread (``num_workers=0``): worker processes forked from a GUI
        application are unsafe, and the patches come from in-memory readers anyway. The per-epoch
        matplotlib curve is off: it holds the GIL long enough to freeze a viewer, which draws its own.
        """
        output_dir = Path(output_dir)
        return {
            "system": {"num_workers": 0, "pin_memory": False, "seed": self.seed, "device": device},
            "training": {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                         "samples_per_epoch": self.samples_per_epoch,
                         "scheduler": {"type": "cosine", "warmup_epochs": min(1.0, self.epochs / 4)}},
            "validation": {"eval_interval": 1, "batch_size": self.batch_size},
            "logging": {"log_dir": str(output_dir.parent), "experiment_name": output_dir.name,
                        "plot_history": False},
            "visualization": {"save_predictions": False, "num_vis_samples": 0},
        }


# ---- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    """What the job is doing, for people ("building the model", "training (3 validation regions)")."""

    text: str


@dataclass(frozen=True)
class ModelReady:
    """The model being trained (built by the job when it was not given)."""

    model: Any


@dataclass(frozen=True)
class Step:
    """A batch was trained."""

    info: StepInfo


@dataclass(frozen=True)
class Epoch:
    """An epoch ended (its checkpoints are written)."""

    info: EpochInfo


FineTuneEvent = Status | ModelReady | Step | Epoch


@dataclass
class FineTuneOutcome:
    """How a run ended: ``status`` "completed" or "cancelled"; ``model`` holds the weights ``restored``
    describes; ``result`` is the trainer's :class:`~pfmseg_engine.training.TrainResult`."""

    status: str
    model: Any
    result: TrainResult
    restored: str
    epochs: int
    best_metric: float | None
    best_epoch: int | None
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)


class TrainingRun(Protocol):
    """What a job drives: a :class:`~pfmseg_engine.training.Trainer`, or the runs of ``system.seeds``
    (:class:`~pfmseg_engine.training.runner.SeedSeries`, whose ``model`` is None: one model per seed)."""

    model: Any
    val_source: Any

    def iter_fit(self, resume: str | Path | None = None) -> Generator[TrainEvent, None, TrainResult]: ...


TrainerFactory = Callable[[Any, Any], TrainingRun]  # (model or None, cancel token) -> the run


class FineTune:
    """A training run; build it with :meth:`on_annotations`, :meth:`from_config` or :meth:`on_slides`."""

    def __init__(self, trainer: TrainerFactory, *, model: Any = None, build: Callable[[], Any] | None = None,
                 resume: str | Path | None = None, restore: bool = True,
                 preparing: str = "preparing the training data"):
        from ..training.callbacks import CancelToken

        self._factory, self.model, self._build, self.resume_from, self.restore = trainer, model, build, resume, restore
        self.preparing = preparing
        self.token = CancelToken()
        self.outcome: FineTuneOutcome | None = None

    # -- sources --
    @classmethod
    def on_annotations(cls, model: Any, images: Sequence[Any], labels: Sequence[Any],
                       settings: FineTuneSettings | None = None, *, output_dir: str | Path,
                       build: Callable[[], Any] | None = None, model_config: Any = None) -> FineTune:
        """Train ``model`` (or the one ``build()`` / ``model_config`` makes, in the worker) on sparse
        annotations: ``labels`` use 0 = not annotated, k = class k-1, one array per image."""
        from ..devices import resolve_device

        settings = settings or FineTuneSettings()
        images, labels = list(images), list(labels)
        if build is None and model is None:
            if model_config is None:
                from ..errors import ConfigError

                raise ConfigError("Fine-tuning needs a model, or the model config to build one.")
            from ..model import build_model

            def build() -> Any:
                return build_model(model_config)

        def trainer(model: Any, cancel: Any) -> TrainingRun:
            from ..training import TrainConfig, build_annotation_trainer

            device = str(resolve_device(settings.device))
            sections: dict[str, Any] = settings.sections(output_dir, device)
            config = TrainConfig.from_model_config(model.config, **sections)
            return build_annotation_trainer(config, images, labels, model=model,
                                            validation_share=settings.val_fraction, device=device, cancel=cancel)

        return cls(trainer, model=model, build=build, preparing="indexing annotations")

    @classmethod
    def from_config(cls, config: TrainConfig, *, model: Any = None, resume: str | Path | None = None,
                    device: str | None = None, callbacks: Iterable[Callback] = ()) -> FineTune:
        """Train on the seed JSON dataset of ``config`` (outputs in ``log_dir/experiment_name``);
        ``model`` continues an existing model instead of building the one ``config`` describes. The model
        keeps the weights of the last epoch (the checkpoints hold the best). With ``system.seeds`` the job
        trains a new model per seed and its outcome's ``result`` is the series'
        :class:`~pfmseg_engine.training.SeedsResult`."""
        callbacks = list(callbacks)
        if config.system.seeds:
            from ..training.runner import SeedSeries

            series = SeedSeries(config, model=model, device=device, callbacks=callbacks)  # refuses a model

            def seeds(model: Any, cancel: Any) -> TrainingRun:
                series.cancel = cancel
                return series

            return cls(seeds, resume=resume, restore=False, preparing=f"preparing {len(config.system.seeds)} runs")

        def trainer(model: Any, cancel: Any) -> TrainingRun:
            from ..training.runner import build_datasets, model_or_new
            from ..training.trainer import Trainer

            train, val = build_datasets(config)
            return Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                           cancel=cancel)

        return cls(trainer, model=model, resume=resume, restore=False)

    @classmethod
    def on_slides(cls, config: TrainConfig, slides: Sequence[Any], annotations: Sequence[Any], *,
                  model: Any = None, resume: str | Path | None = None, **options: Any) -> FineTune:
        """Train on whole slides and their annotations (options: those of
        :func:`~pfmseg_engine.training.slides.build_slide_trainer`)."""

        def trainer(model: Any, cancel: Any) -> TrainingRun:
            from ..training.slides import build_slide_trainer

            return build_slide_trainer(config, slides, annotations, model=model, cancel=cancel, **options)

        return cls(trainer, model=model, resume=resume, restore=False)

    # -- control (thread-safe) --
    def cancel(self) -> None:
        """Stop before the next batch; the last completed epoch's checkpoints are kept."""
        self.token.cancel()

    def pause(self) -> None:
        """Hold before the next batch (no CPU used while paused)."""
        self.token.pause()

    def resume(self) -> None:
        """Go on after :meth:`pause`."""
        self.token.resume()

    @property
    def paused(self) -> bool:
        return self.token.paused

    # -- running --
    def run(self, callback: Callable[[FineTuneEvent], Any] | None = None) -> FineTuneOutcome:
        """:meth:`iter_run` to the end; ``callback`` sees every event."""
        events = self.iter_run()
        try:
            while True:
                event = next(events)
                if callback is not None:
                    callback(event)
        except StopIteration as stop:
            outcome: FineTuneOutcome = stop.value
            return outcome
        finally:
            events.close()

    def iter_run(self) -> Generator[FineTuneEvent, None, FineTuneOutcome]:
        """Build (the model and) the trainer, train, then restore the weights to keep; returns the outcome."""
        model = self.model
        if model is None and self._build is not None:
            yield Status("building the model")
            model = self._build()
        yield Status(self.preparing)
        start_state = model.trainable_state_dict() if self.restore and model is not None else None
        trainer = self._factory(model, self.token)
        if model is None:  # built by the trainer from its config (a series of seeds builds one per seed)
            model = trainer.model
        self.model = model
        if model is not None:
            yield ModelReady(model)
        source = trainer.val_source
        held = source.num_images() if source is not None else 0
        yield Status(f"training ({held} validation region{'s' * (held != 1)})" if model is not None else "training")
        events = trainer.iter_fit(self.resume_from) if self.resume_from else trainer.iter_fit()
        try:
            while True:
                try:
                    kind, info = next(events)
                except StopIteration as stop:
                    result: TrainResult = stop.value
                    break
                yield Step(info) if kind == "step" else Epoch(info)  # type: ignore[arg-type]
        finally:
            events.close()
        restored = self._restore(model, result, start_state) if self.restore else "final weights"
        if hasattr(model, "eval"):
            model.eval()
        self.outcome = FineTuneOutcome(result.status, model, result, restored, result.epochs_completed,
                                       result.best_metric, result.best_epoch, result.output_dir, list(result.history))
        return self.outcome

    @staticmethod
    def _restore(model: Any, result: TrainResult, start_state: dict[str, Any] | None) -> str:
        from ..checkpoint import load_into, read_checkpoint

        if result.best_checkpoint.is_file():
            load_into(model, read_checkpoint(result.best_checkpoint), source="best checkpoint")
            return f"best epoch {result.best_epoch}"
        if result.status == "cancelled":
            if result.last_checkpoint.is_file():
                load_into(model, read_checkpoint(result.last_checkpoint), source="last checkpoint")
                return f"last completed epoch {result.epochs_completed}"
            if start_state is not None:
                model.load_trainable_state_dict(start_state)
                return "weights from before this run"
        return "final weights"


__all__ = ["Epoch", "FineTune", "FineTuneEvent", "FineTuneOutcome", "FineTuneSettings", "ModelReady", "Status",
           "Step"]
