"""From a configuration to a finished run: datasets, model and trainer wired together.

:func:`train_from_config` is what ``python -m pfmseg_engine train`` runs (seed JSON datasets);
:func:`train_on_annotations` is the same for in-memory images with napari-style sparse labels, and
:func:`build_annotation_trainer` is its first half (the trainer, not yet run), which the napari
plugin drives through ``Trainer.iter_fit``. Each takes ``model=`` to continue training an existing
model (more annotations, a loaded checkpoint) instead of building a new one.

With ``system.seeds`` set, :func:`train_from_config` runs :func:`train_seeds`: one complete run per
seed in ``<experiment>/seed_<s>/``, each run's checkpoint (selected on validation) scored on the
dataset's test split, and a summary (mean +- sd over seeds of every test metric, per class and
overall) in ``<experiment>/seeds_summary.csv`` and ``seeds_summary.json``. Without a labelled test
split the summary holds validation numbers, labelled as such (``split``), and a warning says so.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from .. import csvsafe
from ..data.augment import JointAugment
from ..data.dataset import ArrayImageSet, SegmentationDataset
from ..data.masks import sparse_to_targets
from ..data.seed_json import Sample, load_seed_json
from ..data.sparse import SparsePatchDataset, crop_boxes, split_annotations
from ..devices import resolve_device
from ..errors import ConfigError, DataError
from .callbacks import Callback, CancelToken
from .config import TrainConfig
from .evaluation import EvaluationReport, evaluate_model
from .history import atomic_write_text
from .outputs import claim_output_dir
from .state import seed_everything
from .trainer import Trainer, TrainEvent, TrainResult

log = logging.getLogger("pfmseg_engine.training")

Result = TypeVar("Result", bound=TrainResult)


def build_augmentation(config: TrainConfig, crop: bool = True) -> JointAugment:
    """The training augmentation a config describes (with the training crop unless ``crop=False``).

    The crop is native-resolution with zoom jitter (``zoom``) or the seed's area-scale crop (``scale``).
    """
    aug = config.training.augmentation
    return JointAugment(aug.transforms, crop_size=aug.RandomResizedCropSize if crop else None,
                        crop_scale=aug.scale, crop_ratio=aug.ratio, crop_zoom=aug.zoom,
                        ignore_index=config.dataset.ignore_index)


def build_datasets(config: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Training and validation datasets from ``dataset.json_file``; every mask is checked up front."""
    seed_json = load_seed_json(config.dataset.json_file)
    common: dict[str, Any] = {"num_classes": config.num_classes, "ignore_index": config.dataset.ignore_index,
              "class_colors": config.dataset.class_colors}
    train = SegmentationDataset(seed_json.split("train", require_masks=True), transform=build_augmentation(config),
                                seed=config.system.seed, length=config.training.samples_per_epoch, **common)
    train.validate()
    val = None
    if seed_json.splits.get("val"):
        val = SegmentationDataset(seed_json.split("val", require_masks=True), **common)
        val.validate()
    return train, val


def build_model_for(config: TrainConfig) -> Any:
    """The segmentation model a config describes (seeded, so a resumed run rebuilds the same one)."""
    from ..model import build_model

    seed_everything(config.system.seed)
    return build_model(config.model_config())


def check_model_matches(config: TrainConfig, model: Any) -> None:
    """Refuse to train ``model`` under a config that describes another model.

    Checkpoints of the run store the config, and the loss needs the model's class count, so a
    mismatch would fail late or write checkpoints that rebuild the wrong model.
    """
    wanted = config.model_config()
    have = model.config
    for what, a, b in (("backbone", have.backbone, wanted.backbone), ("num_classes", have.num_classes,
                                                                      wanted.num_classes)):
        if a != b:
            raise ConfigError(
                f"The model has {what} {a!r} but the training config says {b!r}; build the config from the "
                "model with TrainConfig.from_model_config(model.config, ...)."
            )


def model_or_new(config: TrainConfig, model: Any | None) -> Any:
    """``model`` after checking it fits ``config`` (and seeding, as a new build would), else a new one."""
    if model is None:
        return build_model_for(config)
    check_model_matches(config, model)
    seed_everything(config.system.seed)
    return model


def train_from_config(config: TrainConfig, *, model: Any | None = None, resume: str | Path | None = None,
                      device: str | None = None, callbacks: Iterable[Callback] = (),
                      cancel: CancelToken | None = None) -> TrainResult:
    """Train on the seed JSON dataset of ``config``; outputs go to ``log_dir/experiment_name``.

    ``model`` continues training an existing model instead of building the one ``config`` describes.
    With ``system.seeds`` this is :func:`train_seeds` (``resume`` then continues every seed's run).
    The run's folder is claimed first (:func:`~.outputs.claim_output_dir`: a new one for an unnamed run).
    """
    return _drain(iter_train_from_config(config, model=model, resume=resume, device=device, callbacks=callbacks,
                                         cancel=cancel))


def iter_train_from_config(config: TrainConfig, *, model: Any | None = None, resume: str | Path | None = None,
                           device: str | None = None, callbacks: Iterable[Callback] = (),
                           cancel: CancelToken | None = None) -> Generator[TrainEvent, None, TrainResult]:
    """:func:`train_from_config` as a generator of the trainer's events (every seed's, with ``system.seeds``)."""
    if config.system.seeds:
        series = SeedSeries(config, model=model, device=device, callbacks=callbacks, cancel=cancel)
        return (yield from series.iter_fit(resume))
    config = claim_output_dir(config, resume)
    train, val = build_datasets(config)
    trainer = Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                      cancel=cancel)
    return (yield from trainer.iter_fit(resume))


def _drain(events: Generator[TrainEvent, None, Result]) -> Result:
    while True:
        try:
            next(events)
        except StopIteration as done:
            result: Result = done.value
            return result


def build_annotation_trainer(config: TrainConfig, images: Sequence[Any], labels: Sequence[Any], *,
                             model: Any | None = None, val_images: Sequence[Any] | None = None,
                             val_labels: Sequence[Any] | None = None, validation_share: float | None = None,
                             validation_block: int | None = None, samples_per_epoch: int | None = None,
                             device: str | None = None, callbacks: Iterable[Callback] = (),
                             cancel: CancelToken | None = None, output_dir: str | Path | None = None) -> Trainer:
    """A :class:`Trainer` for sparse annotations (napari labels: 0 = not annotated, k = class k-1).

    Patches of ``RandomResizedCropSize`` pixels are drawn around annotated pixels of ``images``
    (numpy or dask arrays of any size). ``model`` continues from an existing model (retraining after
    more annotations) instead of building a new one. Validation scores whole ``val_images`` against
    ``val_labels`` at native resolution, unannotated pixels excluded; without them,
    ``validation_share`` holds out that share of each image's annotated squares of
    ``validation_block`` pixels (default twice the training window) with :func:`split_annotations`.
    Call ``fit()`` or iterate ``iter_fit()`` on the result.
    """
    images, labels = list(images), list(labels)
    n, ignore = config.num_classes, config.dataset.ignore_index
    if val_images is None and val_labels is None and validation_share:
        block = validation_block or 2 * config.crop_size
        val_images, val_labels, kept = [], [], []
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            train_labels, boxes = split_annotations(label, validation_share, block=block,
                                                    seed=config.system.seed + index)
            kept.append(train_labels)
            val_images += crop_boxes(image, boxes)
            val_labels += crop_boxes(label, boxes)
        labels = kept
    elif (val_images is None) != (val_labels is None):
        raise DataError("Give both val_images and val_labels (one label array per image), or neither.")
    elif val_images is not None and validation_share:
        raise ConfigError("Give either val_images/val_labels or validation_share, not both.")
    train = SparsePatchDataset(
        images, labels, patch_size=config.crop_size, num_classes=n,
        samples_per_epoch=samples_per_epoch or config.training.samples_per_epoch or 256,
        ignore_index=ignore, transform=build_augmentation(config, crop=False), seed=config.system.seed,
        zoom=config.training.augmentation.zoom,
    )
    val = None
    if val_images is not None and len(val_images):
        if val_labels is None:
            raise ConfigError("Validation images were given without their labels; give val_labels too, or neither "
                              "(validation_share then holds out part of the annotations).")
        masks = [sparse_to_targets(lab, n, ignore) for lab in val_labels]
        val = ArrayImageSet(list(val_images), masks)
    return Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                   cancel=cancel, output_dir=output_dir)


def train_on_annotations(config: TrainConfig, images: Sequence[Any], labels: Sequence[Any], *,
                         model: Any | None = None, val_images: Sequence[Any] | None = None,
                         val_labels: Sequence[Any] | None = None, validation_share: float | None = None,
                         samples_per_epoch: int | None = None, resume: str | Path | None = None,
                         device: str | None = None, callbacks: Iterable[Callback] = (),
                         cancel: CancelToken | None = None) -> TrainResult:
    """Train on sparse annotations: :func:`build_annotation_trainer` (same arguments), then ``fit``."""
    trainer = build_annotation_trainer(config, images, labels, model=model, val_images=val_images,
                                       val_labels=val_labels, validation_share=validation_share,
                                       samples_per_epoch=samples_per_epoch, device=device, callbacks=callbacks,
                                       cancel=cancel)
    return trainer.fit(resume=resume)


# --- repeated runs over seeds ---------------------------------------------------------------------------
#: What the numbers of a seeds summary are, by the split they come from (see :func:`reporting_split`).
SPLIT_NOTES = {
    "test": "test split: each seed's checkpoint selected on validation by the monitored metric, scored on the "
            "test images",
    "val": "validation split, NOT test results: each seed's best validation epoch, on the split that also chose "
           "that epoch (optimistic)",
    "train": "no scored split: the dataset has neither test masks nor validation images; training loss only",
}


@dataclass
class SeedsResult(TrainResult):
    """A :class:`TrainResult` for a run repeated over ``system.seeds``.

    ``output_dir`` is the experiment folder; ``runs`` maps each seed to its own result (its run folder is
    ``output_dir / f"seed_{seed}"``). ``split`` names where the reported numbers come from
    (:data:`SPLIT_NOTES`): ``"test"`` whenever the dataset's test split has masks, ``"val"`` or
    ``"train"`` only without them. ``scores`` maps each completed seed to its metrics on that split;
    ``summary`` maps each metric to ``{"mean", "sd", "n"}`` over those seeds; ``best_metric`` is the
    summary's mean of the monitored metric.
    """

    runs: dict[int, TrainResult] = field(default_factory=dict)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    split: str = "test"
    scores: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def summary_csv(self) -> Path:
        return self.output_dir / "seeds_summary.csv"

    @property
    def summary_json(self) -> Path:
        return self.output_dir / "seeds_summary.json"


def seed_configs(config: TrainConfig) -> dict[int, TrainConfig]:
    """One config per seed of ``system.seeds``: ``system.seed`` set, outputs in ``<experiment>/seed_<s>``.

    Each is a plain single run (``seeds`` null), so its ``config.yaml`` reproduces that run alone.
    """
    parent = config.output_dir
    return {seed: replace(config, system=replace(config.system, seed=seed, seeds=None),
                          logging=replace(config.logging, log_dir=str(parent), experiment_name=f"seed_{seed}"))
            for seed in config.system.seeds or ()}


def reporting_split(config: TrainConfig) -> tuple[str, tuple[Sample, ...]]:
    """Where repeated runs report from: ``("test", test samples)`` when any test image has a mask.

    Validation chose each run's checkpoint, so its numbers are biased upwards; they are reported
    (as ``"val"``, with a warning) only when the dataset gives no labelled test image, and ``"train"``
    (the training loss alone) when it has no validation images either.
    """
    seed_json = load_seed_json(config.dataset.json_file)
    test = tuple(seed_json.splits.get("test") or ())
    if any(sample.mask_path is not None for sample in test):
        return "test", test
    return ("val" if seed_json.splits.get("val") else "train"), ()


def selected_checkpoint(result: TrainResult) -> Path:
    """The checkpoint validation selected (``best.pt``: best monitored metric), else ``last.pt`` (no validation)."""
    return result.best_checkpoint if result.best_checkpoint.is_file() else result.last_checkpoint


def score_on_test(config: TrainConfig, result: TrainResult, samples: Sequence[Sample],
                  device: str | None = None) -> EvaluationReport:
    """``evaluate`` of ``result``'s selected checkpoint on the test ``samples`` (images without mask skipped).

    Predicted as validation predicts (``config.validation``'s mode, window, overlap and batch size), so
    test and selection numbers are comparable; the report is written where ``evaluate`` puts it by
    default, ``<run>/checkpoints/eval_test/``.
    """
    from ..checkpoint import load_checkpoint

    checkpoint = selected_checkpoint(result)
    target = resolve_device(device if device not in (None, "") else config.system.device)
    model = load_checkpoint(checkpoint, device=target)
    dataset = SegmentationDataset(samples, config.num_classes, config.dataset.ignore_index,
                                  class_colors=config.dataset.class_colors, cache=False)
    v = config.validation
    report = evaluate_model(model, dataset, split="test", window=config.window_size, mode=v.resize_or_windowslide,
                            overlap=v.overlap, batch_size=v.batch_size, device=target)
    report.write(checkpoint.parent / "eval_test")
    return report


def train_seeds(config: TrainConfig, *, resume: bool = False, device: str | None = None,
                callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None) -> SeedsResult:
    """Train once per seed of ``system.seeds``, score each run and summarise (see :class:`SeedsResult`).

    After each seed's training its selected checkpoint is scored on the test split
    (:func:`score_on_test`) and the summary rewritten, so a long series reports the seeds done so far.
    ``resume`` continues each seed's run from its ``last.pt`` where there is one (finished runs are
    only re-read and re-scored). A cancelled run stops the series unscored.
    """
    return _drain(iter_train_seeds(config, resume=resume, device=device, callbacks=callbacks, cancel=cancel))


class SeedSeries:
    """The runs of ``system.seeds`` driven like one :class:`~.trainer.Trainer`: :meth:`iter_fit` yields
    every seed's events in turn and returns the :class:`SeedsResult`, so a job runs a series and a
    single run the same way. It trains a new model per seed (``model`` is None: there is no one model)."""

    model = None
    val_source = None

    def __init__(self, config: TrainConfig, *, model: Any | None = None, device: str | None = None,
                 callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None):
        if model is not None:
            raise ConfigError("system.seeds trains a new model per seed; it cannot continue a given model= "
                              "(remove system.seeds, or model=).")
        self.config, self.device, self.callbacks, self.cancel = config, device, list(callbacks), cancel

    def iter_fit(self, resume: str | Path | None = None) -> Generator[TrainEvent, None, TrainResult]:
        """Claim the experiment folder, then train every seed (``resume``: continue each seed's run)."""
        config = claim_output_dir(self.config, resume)
        return (yield from iter_train_seeds(config, resume=bool(resume), device=self.device,
                                            callbacks=self.callbacks, cancel=self.cancel))


def iter_train_seeds(config: TrainConfig, *, resume: bool = False, device: str | None = None,
                     callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None,
                     ) -> Generator[TrainEvent, None, SeedsResult]:
    """:func:`train_seeds` as a generator of every seed's trainer events; returns the :class:`SeedsResult`."""
    if not config.system.seeds:
        raise ConfigError("system.seeds is not set; list the seeds to train with, e.g. system.seeds: [0, 1, 2].")
    parent = config.output_dir
    parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(parent / "config.yaml", config.to_yaml())
    split, test_samples = reporting_split(config)
    if split != "test":
        log.warning(_split_warning(config, split))
    callbacks = list(callbacks)
    result = SeedsResult(status="completed", epochs_completed=0, output_dir=parent, split=split)
    for seed, seed_config in seed_configs(config).items():
        last = seed_config.output_dir / "checkpoints" / "last.pt"
        log.info("Seed %d of %s -> %s", seed, list(config.system.seeds), seed_config.output_dir)
        run = yield from iter_train_from_config(seed_config, resume=last if resume and last.is_file() else None,
                                                device=device, callbacks=callbacks, cancel=cancel)
        result.runs[seed] = run
        if run.status != "completed":
            result.status = run.status
            break
        result.scores[seed] = (score_on_test(seed_config, run, test_samples, device).metrics if split == "test"
                               else _best_row_metrics(run))
        _update_summary(result, config)
    _update_summary(result, config)
    return result


def _update_summary(result: SeedsResult, config: TrainConfig) -> None:
    result.summary = summarize_seeds(result.scores)
    result.best_metric = result.summary.get(config.validation.monitor, {}).get("mean")
    result.epochs_completed = min((r.epochs_completed for r in result.runs.values()), default=0)
    write_seeds_summary(result, config)


def _split_warning(config: TrainConfig, split: str) -> str:
    if split == "val":
        return (f"Dataset '{config.dataset.json_file}' has no test image with a mask, so seeds_summary reports "
                "VALIDATION numbers (each seed's best epoch, chosen on that same split: an optimistic estimate, "
                "not a result). Add a test split with masks to report test results.")
    return (f"Dataset '{config.dataset.json_file}' has no test masks and no val split, so seeds_summary holds the "
            "training loss only. Add a test split with masks to report results.")


def _best_row(result: TrainResult) -> dict[str, Any]:
    rows = result.history
    if not rows:
        return {}
    best = [r for r in rows if r.get("epoch") == result.best_epoch]
    return best[0] if best else rows[-1]


def _best_row_metrics(result: TrainResult) -> dict[str, float]:
    """The numbers of ``result``'s best epoch (the last for a run without validation), bookkeeping left out."""
    skip = {"epoch", "lr", "seconds"}
    return {key: float(value) for key, value in _best_row(result).items()
            if key not in skip and isinstance(value, (int, float)) and not isinstance(value, bool)}


def summarize_seeds(scores: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation and count over the seeds of every metric in ``scores``.

    ``sd`` is 0 for a single seed. A metric undefined for a seed (None or NaN, e.g. the Dice of a class
    absent from its images and predictions) is left out of that metric's count.
    """
    values: dict[str, list[float]] = {}
    for metrics in scores.values():
        for key, value in metrics.items():
            if value is not None and not math.isnan(float(value)):
                values.setdefault(key, []).append(float(value))
    summary = {}
    for key, vals in values.items():
        n = len(vals)
        mean = sum(vals) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        summary[key] = {"mean": mean, "sd": sd, "n": n}
    return summary


def _class_of(metric: str, class_names: Sequence[str]) -> str:
    """``Dice_Class_1`` -> the name of class 1; '' for metrics over all classes."""
    if "_Class_" not in metric:
        return ""
    index = int(metric.rsplit("_", 1)[1])
    return class_names[index] if index < len(class_names) else ""


def write_seeds_summary(result: SeedsResult, config: TrainConfig) -> None:
    """``seeds_summary.csv`` and ``seeds_summary.json`` in ``result.output_dir``, every number labelled by split.

    CSV: one row per metric (``class`` names the class of per-class metrics) with its ``split``, mean,
    sd, n and one column per seed. JSON: the same summary plus, per seed, its status, the checkpoint
    validation selected (``selection``: split, monitor, epoch, value) and its metrics on ``split``.
    """
    seeds, split, names = list(result.runs), result.split, config.class_names
    buffer = io.StringIO()
    writer = csvsafe.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "class", "split", "mean", "sd", "n", *[f"seed_{s}" for s in seeds]])
    for key, stats in result.summary.items():
        per_seed = [result.scores.get(s, {}).get(key) for s in seeds]
        writer.writerow([key, _class_of(key, names), split, f"{stats['mean']:.6g}", f"{stats['sd']:.6g}", stats["n"],
                         *["" if v is None else f"{float(v):.6g}" for v in per_seed]])
    atomic_write_text(result.output_dir / "seeds_summary.csv", buffer.getvalue())
    monitor = config.validation.monitor
    payload = {
        "split": split,
        "reported": SPLIT_NOTES[split],
        "warning": None if split == "test" else _split_warning(config, split),
        "seeds": seeds,
        "monitor": monitor,
        "class_names": list(names),
        "runs": {str(seed): {
            "status": run.status, "epochs_completed": run.epochs_completed, "output_dir": str(run.output_dir),
            "selection": {"split": "val", "monitor": monitor, "epoch": run.best_epoch, "value": run.best_metric}
            if run.best_epoch is not None else None,
            "checkpoint": str(selected_checkpoint(run)) if split == "test" and seed in result.scores else None,
            "split": split, "metrics": result.scores.get(seed)}
            for seed, run in result.runs.items()},
        "summary": result.summary,
    }
    atomic_write_text(result.output_dir / "seeds_summary.json", json.dumps(payload, indent=2, allow_nan=True))
