"""The training loop: one class that the CLI, the Python API and the napari plugin all drive.

What it guarantees, and why:

* **Checkpoints are never lost.** ``checkpoints/best.pt`` is written (atomically) the moment a new
  best validation score appears, ``checkpoints/last.pt`` after every completed epoch. Ctrl-C, a crash
  or a GUI cancel leaves the previous files intact (the seed kept its best model in memory until the
  end of training).
* **Exact resume.** ``last.pt`` holds optimizer, scheduler, AMP scaler and RNG states, the epoch and
  the history. Data order and augmentation depend only on (seed, epoch, index), so a resumed run
  reproduces the losses of an uninterrupted one.
* **Honest validation.** Every ``eval_interval`` epochs, whole validation images are predicted at
  native resolution (see :mod:`.validation`).
* **Checkpoints say what scale the model learnt.** The µm of tissue per model pixel training crops
  showed (:func:`training_scale_for`) is recorded in every checkpoint's metadata
  (``training_scale``) and carried by the model, so slide inference can warn when it runs at another
  resolution (area-scale crops train at several times the images' µm/px).
* **GUI-ready.** Progress goes through callbacks, and :meth:`Trainer.iter_fit` is the same loop as a
  generator of step/epoch events (``fit`` just drains it), so a napari ``thread_worker`` generator
  drives the trainer directly, without a helper thread. A :class:`~.callbacks.CancelToken` is checked
  between batches: it stops the run, or holds it while paused. Closing the generator early also
  stops the run; either way ``last.pt`` keeps the last completed epoch.

* **Loading hides behind compute.** Worker processes (``system.num_workers``, at most one per CPU core)
  outlive the epoch, keeping their decoded images and open slides, and each keeps
  :data:`PREFETCH_BATCHES` batches ready; every index they get carries its epoch, so a worker draws
  the same crops as a fresh one would. They end with the run.

* **A run never trains over another.** A folder holding checkpoints is refused unless the run
  resumes it or ``logging.overwrite`` clears it first; an unnamed run gets a new folder
  (:mod:`.outputs`).

Outputs under ``log_dir/experiment_name/``: ``config.yaml`` (resolved), ``training.log``,
``history.csv``/``history.json``, ``training_history.png`` (unless ``logging.plot_history`` is off),
``visualizations/`` and
``checkpoints/{best,last}.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import load_into, read_checkpoint, save_checkpoint
from ..data.augment import CropShrink, JointAugment, crop_shrink
from ..data.dataset import SegmentationDataset
from ..data.images import image_size
from ..data.sampler import EpochSampler
from ..data.sparse import SparsePatchDataset
from ..devices import resolve_device
from ..errors import CheckpointError, PfmsegError
from ..training_scale import TrainingScale, attach_training_scale
from .callbacks import Callback, CancelToken, EpochInfo, StepInfo
from .config import TrainConfig
from .history import History
from .losses import build_loss
from .optim import build_optimizer
from .outputs import RunLock, check_run_dir, claim_output_dir, run_folder_of
from .schedulers import build_scheduler
from .state import capture_rng, restore_rng
from .validation import ImageSource, validate
from .visualize import palette, save_panel

log = logging.getLogger("pfmseg_engine.training")

TrainEvent = tuple[str, StepInfo | EpochInfo]  # ("step", StepInfo) or ("epoch", EpochInfo)

__all__ = ["TrainEvent", "TrainResult", "Trainer", "TrainingError", "choose_amp_dtype", "resolve_amp",
           "resolve_device", "training_scale_for"]


class TrainingError(PfmsegError):
    """Training cannot continue (e.g. the loss became NaN)."""


@dataclass
class TrainResult:
    """How a run ended and where its outputs are."""

    status: str  # "completed" or "cancelled"
    epochs_completed: int
    output_dir: Path
    best_metric: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_checkpoint(self) -> Path:
        return self.output_dir / "checkpoints" / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.output_dir / "checkpoints" / "last.pt"


def resolve_amp(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``config`` on ``device``, or None for full precision (see :func:`choose_amp_dtype`)."""
    t = config.training
    if not t.use_amp:
        return None
    dtype = choose_amp_dtype(t.amp_dtype, device)
    if dtype is None:
        log.info("Mixed precision is off on %s (set training.amp_dtype: bfloat16 to use CPU bfloat16).", device)
    return dtype


def choose_amp_dtype(amp_dtype: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that ``training.amp_dtype`` means on ``device``.

    On CUDA ``auto`` is bfloat16 where the GPU supports it (Ampere and newer): it keeps float32's
    range, so large ViTs cannot overflow and no gradient scaler is needed; older GPUs get float16,
    which the trainer pairs with a gradient scaler. An explicit ``bfloat16`` on a GPU without it falls
    back to float16 (with a warning). Elsewhere (CPU, MPS) only bfloat16 is used, and only when
    ``amp_dtype: bfloat16`` asks for it: it is slower than float32 on many CPUs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if amp_dtype == "float16" or (amp_dtype == "auto" and not bf16):
            return torch.float16
        if not bf16:
            log.warning("training.amp_dtype is bfloat16 but %s does not support it; using float16.", device)
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if amp_dtype == "bfloat16" else None


def dataset_crop_shrink(dataset: Any) -> CropShrink | None:
    """How much the training crops of ``dataset`` shrink its images; None for a dataset of unknown kind.

    Seed JSON splits (:class:`SegmentationDataset`) crop with their :class:`JointAugment`, whose
    area-scale crop needs every image's size (read from the file headers, only then); patch samplers
    (:class:`SparsePatchDataset`: annotations, slides) cut ``patch_size`` squares with their own zoom.
    """
    if isinstance(dataset, SparsePatchDataset):
        return crop_shrink(dataset.patch_size, zoom=dataset.zoom)
    if isinstance(dataset, SegmentationDataset):
        augment = dataset.transform
        if augment is None:
            return crop_shrink(None)
        if not isinstance(augment, JointAugment):
            return None
        area = augment.crop_size is not None and augment.crop_scale is not None
        return augment.crop_shrink([image_size(s.image_path) for s in dataset.samples] if area else ())
    return None


def training_scale_for(config: TrainConfig, dataset: Any) -> TrainingScale | None:
    """The scale a run trains at: its images' µm/px (``model.mpp``) times the crops' median shrink.

    Slide training sets ``model.mpp`` to the resolution it reads the slides at, so the same rule holds
    there. With ``model.mpp`` unset only the shrink is recorded; for a dataset of unknown kind, nothing.
    """
    shrink = dataset_crop_shrink(dataset)
    if shrink is None:
        return None
    mpp = config.model.mpp
    return TrainingScale(shrink=shrink.median, data_mpp=float(mpp) if mpp else None,
                         shrink_range=(shrink.low, shrink.high), crop=shrink.crop)


#: Batches each loader worker keeps ready (torch's default is 2): enough to ride out a slow crop.
PREFETCH_BATCHES = 4


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Most worker processes chosen automatically: enough to feed a GPU with 512 px crops and their augmentation.
AUTO_WORKERS = 8


def loader_workers(requested: int | None) -> int:
    """Worker processes for ``system.num_workers``: 0 stays 0 (load in the training thread), never more than
    the CPU cores (more only queue for the same cores and each holds its own copy of the data); ``None``
    chooses one per core but the training thread's, at most :data:`AUTO_WORKERS`."""
    cpus = available_cpus()
    if requested is None:
        return max(1, min(AUTO_WORKERS, cpus - 1))
    return max(0, min(int(requested), cpus))


class TrainingData(Protocol):
    """What the trainer reads: a sized, indexable set of ``{"image", "label", ...}`` items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class EpochIndices(Sampler[tuple[int, int]]):
    """``sampler``'s indices paired with its epoch: (epoch, index).

    Worker processes that outlive an epoch never see the trainer's ``set_epoch`` on their copy of the
    dataset; the epoch travels with each index instead (:class:`EpochItems`).
    """

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


class EpochItems(Dataset):
    """``dataset`` indexed by (epoch, index): selects the epoch (``set_epoch``) before reading the item."""

    def __init__(self, dataset: TrainingData):
        self.dataset = dataset
        self.epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        return self.dataset[index]


def build_loader(dataset: TrainingData, sampler: EpochSampler, batch_size: int, num_workers: int | None,
                 pin_memory: bool) -> DataLoader:
    """The training loader: persistent workers prefetching :data:`PREFETCH_BATCHES` batches each."""
    workers = loader_workers(num_workers)
    extra: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": PREFETCH_BATCHES} if workers else {}
    return DataLoader(EpochItems(dataset), batch_size=batch_size, sampler=EpochIndices(sampler),
                      num_workers=workers, pin_memory=pin_memory, drop_last=False, **extra)


def stop_workers(loader: DataLoader) -> None:
    """End a loader's persistent worker processes now (they would otherwise live as long as the loader)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None  # torch's cache of the persistent iterator


class Trainer:
    """Train ``model`` on ``train_dataset`` (items ``{"image", "label"}``) and validate on ``val_source``."""

    def __init__(
        self,
        config: TrainConfig,
        model: Any,
        train_dataset: TrainingData,
        val_source: ImageSource | None = None,
        *,
        device: str | torch.device | None = None,
        callbacks: Iterable[Callback] = (),
        cancel: CancelToken | None = None,
        output_dir: str | Path | None = None,
        forward: Callable[[Any, dict[str, Any], torch.Tensor], torch.Tensor] | None = None,
    ):
        # an unnamed run: a new folder of its own, given back for the run's own folder if it resumes one
        self._fresh_folder: Path | None = None
        if not output_dir and config.logging.experiment_name is None:
            config = claim_output_dir(config)
            self._fresh_folder = config.output_dir
        self.config = config
        # forward(model, batch, images) -> logits replaces model(images) in training steps (the feature
        # cache of pfmseg_engine.compare reads precomputed backbone features from the batch); None: model(images)
        self.forward = forward
        t = config.training
        self.device = resolve_device(device if device not in (None, "") else config.system.device)
        self.model = model.to(self.device)
        self.train_dataset = train_dataset
        self.val_source = val_source
        self.callbacks = list(callbacks)
        self.cancel = cancel or CancelToken()
        self.output_dir = Path(output_dir) if output_dir else config.output_dir
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.epochs = t.epochs
        self.criterion = build_loss(t.loss, config.dataset.ignore_index).to(self.device)
        self.sampler = EpochSampler(len(train_dataset), seed=config.system.seed)
        self.loader = build_loader(train_dataset, self.sampler, t.batch_size, config.system.num_workers,
                                   pin_memory=config.system.pin_memory and self.device.type == "cuda")
        self.batches_per_epoch = len(self.loader)
        self.accumulate = t.accumulate_grad_batches
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable, t)
        self.scheduler = build_scheduler(self.optimizer, t.scheduler, t.learning_rate, t.epochs, self.steps_per_epoch)
        self.amp_dtype = resolve_amp(config, self.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda")
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.history = History()
        self._paused_seconds = 0.0  # of the epoch in progress
        self.colours = palette(config.num_classes, config.dataset.class_colors)
        self.training_scale = training_scale_for(config, train_dataset)
        # what slide training (:mod:`.slides`) prepared: each slide's image/labels pair and the class table
        self.slide_pairs: list[Any] = []
        self.class_table: Any = None
        attach_training_scale(self.model, self.training_scale)

    # --- public ----------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train until ``training.epochs`` (continuing from ``resume``'s ``last.pt`` if given)."""
        events = self.iter_fit(resume)
        while True:
            try:
                next(events)
            except StopIteration as done:
                return done.value

    def _continue_in_run_folder(self, resume: str | Path) -> None:
        """An unnamed run that resumes writes into the resumed run's folder, not the new one it was given."""
        folder = run_folder_of(resume)
        if self._fresh_folder is not None:
            with contextlib.suppress(OSError):
                self._fresh_folder.rmdir()  # only ever empty: nothing has been written yet
        self._fresh_folder = None
        self.config = replace(self.config, logging=replace(self.config.logging, log_dir=str(folder.parent),
                                                           experiment_name=folder.name))
        self.output_dir = folder
        self.checkpoint_dir = folder / "checkpoints"

    def iter_fit(self, resume: str | Path | None = None) -> Generator[TrainEvent, None, TrainResult]:
        """:meth:`fit` as a generator: yields ``("step", StepInfo)`` after every batch and
        ``("epoch", EpochInfo)`` after every epoch (once its checkpoints are written); returns the
        :class:`TrainResult`.

        Callbacks still run, before each event is yielded. Closing the generator early (``close()``,
        or dropping it) stops the run like a cancel: the epoch in progress is abandoned, ``last.pt``
        and ``best.pt`` keep the last completed epoch, the log file is released and ``on_train_end``
        sees a ``cancelled`` result.
        """
        if resume and self._fresh_folder is not None:
            self._continue_in_run_folder(resume)
        with RunLock(self.output_dir):  # a second run into this folder is refused until this one ends
            return (yield from self._iter_fit_locked(resume))

    def _iter_fit_locked(self, resume: str | Path | None) -> Generator[TrainEvent, None, TrainResult]:
        check_run_dir(self.output_dir, resume=bool(resume), overwrite=self.config.logging.overwrite)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        handler = self._attach_log_file()
        status = "completed"
        try:
            if resume:
                self.load_resume(resume)
            (self.output_dir / "config.yaml").write_text(self.config.to_yaml(), encoding="utf-8")
            self._log_start()
            self._emit("on_train_begin")
            for epoch in range(self.epoch, self.epochs):
                if not self._may_continue() or not (yield from self._run_epoch(epoch)):
                    status = "cancelled"
                    break
            if status == "cancelled":
                log.info("Training cancelled; last.pt holds the last completed epoch (%d).", self.epoch)
            else:
                log.info("Training finished: %d epochs, best %s %s (epoch %s).", self.epoch,
                         self.config.validation.monitor, _fmt(self.best_value), self.best_epoch)
        except GeneratorExit:  # the consumer stopped iterating: a cancel, not an error
            status = "cancelled"
            log.info("Training stopped by its caller; last.pt holds the last completed epoch (%d).", self.epoch)
        except KeyboardInterrupt:
            log.warning("Interrupted during epoch %d; %s keeps the last completed epoch (%d).",
                        self.epoch + 1, self.checkpoint_dir / "last.pt", self.epoch)
            raise
        finally:
            stop_workers(self.loader)
            logging.getLogger("pfmseg_engine").removeHandler(handler)
            handler.close()
        result = TrainResult(status, self.epoch, self.output_dir, self.best_value, self.best_epoch,
                             list(self.history.rows))
        self._emit("on_train_end", result)
        return result

    def load_resume(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, scaler, RNG, epoch and history from a ``last.pt``."""
        path = Path(path)
        if path.is_dir():
            candidates = [path / "checkpoints" / "last.pt", path / "last.pt"]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        payload = read_checkpoint(path)
        state = payload.get("training_state")
        if not state:
            raise CheckpointError(
                f"Checkpoint '{path}' has no training state to resume from (best.pt holds weights only); "
                "resume from checkpoints/last.pt."
            )
        load_into(self.model, payload, source=f"Checkpoint '{path}'", adopt_position_grid=False)
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler_state = dict(state["scheduler"])
        scheduler_state["lr_lambdas"] = [None] * len(self.scheduler.lr_lambdas)  # keep this run's schedule
        self.scheduler.load_state_dict(scheduler_state)
        for group, base, schedule in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                         self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_value = state.get("best_value")
        self.best_epoch = state.get("best_epoch")
        self.history = History(state.get("history"))
        log.info("Resumed from %s at epoch %d (step %d).", path, self.epoch, self.global_step)

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (weights-only loadable)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng(),
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "history": self.history.rows,
        }

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- one epoch -------------------------------------------------------------------------------
    def _may_continue(self) -> bool:
        """Wait here while paused (time not counted as epoch time); False once cancelled."""
        if not self.cancel.paused:
            return not self.cancel.cancelled
        start = time.perf_counter()
        log.info("Training paused at epoch %d, step %d.", self.epoch + 1, self.global_step)
        go_on = self.cancel.wait_while_paused()
        self._paused_seconds += time.perf_counter() - start
        if go_on:
            log.info("Training resumed.")
        return go_on

    def _run_epoch(self, epoch: int) -> Generator[TrainEvent, None, bool]:
        start = time.perf_counter()
        self._paused_seconds = 0.0
        self._emit("on_epoch_begin", epoch)
        lr_at_start = self.lr
        train_loss = yield from self._train_one_epoch(epoch)
        if train_loss is None:
            return False
        val_loss: float | None = None
        metrics: dict[str, float] = {}
        v = self.config.validation
        if self.val_source is not None and ((epoch + 1) % v.eval_interval == 0 or epoch + 1 == self.epochs):
            val_loss, metrics = self._validate(epoch)
        self.epoch = epoch + 1
        value = metrics.get(v.monitor)
        is_best = value is not None and not math.isnan(value) and (self.best_value is None or value > self.best_value)
        if value is not None and is_best:
            self.best_value, self.best_epoch = float(value), self.epoch
        seconds = time.perf_counter() - start - self._paused_seconds
        row = {"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr_at_start,
               "seconds": round(seconds, 3), **{k: metrics[k] for k in metrics if "_Class_" not in k},
               **{k: metrics[k] for k in metrics if "_Class_" in k}}
        self.history.append(row)
        self.history.write(self.output_dir)
        if self.config.logging.plot_history:
            self.history.plot(self.output_dir / "training_history.png")
        self._log_epoch(train_loss, val_loss, metrics)
        if is_best:
            self._save("best", metrics)
        self._save("last", metrics)
        info = EpochInfo(self.epoch, self.epochs, train_loss, lr_at_start, seconds, val_loss, metrics, is_best)
        self._emit("on_epoch_end", info)
        yield "epoch", info
        return True

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_one_epoch(self, epoch: int) -> Generator[TrainEvent, None, float | None]:
        """Yields a step event per batch; returns the epoch's mean batch loss, or None when cancelled part-way."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(epoch)
        self.loader.generator = torch.Generator().manual_seed(self.config.system.seed * 7919 + epoch)
        n, accumulate = self.batches_per_epoch, self.accumulate
        full_groups = n // accumulate
        losses: list[float] = []
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(self.loader):
            if not self._may_continue():
                return None
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True).long()
            with self._autocast():
                logits = self.model(images) if self.forward is None else self.forward(self.model, batch, images)
            loss = self.criterion(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"The loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}; lower "
                    "training.learning_rate, enable training.clip_grad_norm or check the masks."
                )
            group = accumulate if i // accumulate < full_groups else n - full_groups * accumulate
            self.scaler.scale(loss / group).backward()
            if (i + 1) % accumulate == 0 or i + 1 == n:
                self._optimizer_step()
            losses.append(float(loss.detach()))
            info = StepInfo(epoch, self.epochs, i, n, self.global_step, losses[-1], self.lr)
            self._emit("on_step_end", info)
            yield "step", info
        return float(np.mean(losses)) if losses else float("nan")

    def _optimizer_step(self) -> None:
        clip = self.config.training.clip_grad_norm
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1

    # --- validation ------------------------------------------------------------------------------
    def _validate(self, epoch: int) -> tuple[float, dict[str, float]]:
        if self.val_source is None:
            raise TrainingError("Validation was asked for but the trainer has no validation data.")
        source = self.val_source
        cfg, vis = self.config, self.config.visualization
        save_vis = vis.save_predictions and vis.num_vis_samples > 0 and (epoch + 1) % vis.save_interval == 0
        vis_dir = self.output_dir / "visualizations"

        def on_image(index: int, image: np.ndarray, mask: np.ndarray, prediction: np.ndarray) -> None:
            if save_vis and index < vis.num_vis_samples:
                save_panel(vis_dir / f"epoch_{epoch + 1:03d}_sample_{index:02d}.png", image, mask, prediction,
                           self.colours)

        result = validate(
            self.model, source, num_classes=cfg.num_classes, ignore_index=cfg.dataset.ignore_index,
            window=cfg.window_size, mode=cfg.validation.resize_or_windowslide, overlap=cfg.validation.overlap,
            batch_size=cfg.validation.batch_size, device=self.device, criterion=self.criterion, on_image=on_image,
        )
        self.model.train()
        self._emit("on_validation_end", epoch, result.metrics)
        return result.loss, result.metrics

    # --- outputs ---------------------------------------------------------------------------------
    def _save(self, kind: str, metrics: dict[str, float]) -> Path:
        path = self.checkpoint_dir / f"{kind}.pt"
        metadata = {"epoch": self.epoch, "kind": kind, "monitor": self.config.validation.monitor,
                    "train_config": self.config.to_dict(),
                    "training_scale": self.training_scale.to_dict() if self.training_scale else None}
        save_checkpoint(path, self.model, metrics=metrics,
                        training_state=self.training_state() if kind == "last" else None, metadata=metadata)
        if kind == "best":
            log.info("New best %s %.4f at epoch %d -> %s", self.config.validation.monitor, self.best_value,
                     self.epoch, path)
        self._emit("on_checkpoint", kind, path)
        return path

    def _attach_log_file(self) -> logging.Handler:
        handler = logging.FileHandler(self.output_dir / "training.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("pfmseg_engine")
        root.addHandler(handler)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        return handler

    def _log_start(self) -> None:
        m = self.model
        trainable = sum(p.numel() for p in self.trainable)
        total = sum(p.numel() for p in m.parameters())
        log.info("Output directory: %s", self.output_dir)
        log.info("Model: %s, strategy %s, head %s; %d of %d parameters train (%.2f%%).",
                 m.config.backbone, m.config.tuning.strategy, m.config.head, trainable, total,
                 100.0 * trainable / max(1, total))
        log.info("Device: %s, mixed precision: %s, epochs %d, %d batches/epoch, accumulate %d.",
                 self.device, self.amp_dtype or "off", self.epochs, self.batches_per_epoch, self.accumulate)
        if self.training_scale is not None:
            log.info("Training scale: %s.", self.training_scale.describe())

    def _log_epoch(self, train_loss: float, val_loss: float | None, metrics: dict[str, float]) -> None:
        monitor = self.config.validation.monitor
        if metrics:
            log.info("Epoch %d/%d - Train Loss: %.4f, Val Loss: %.4f, Val %s: %.4f, Mean_Dice: %.4f, Best %s: %s",
                     self.epoch, self.epochs, train_loss, val_loss if val_loss is not None else math.nan,
                     monitor, metrics.get(monitor, math.nan), metrics.get("Mean_Dice", math.nan), monitor,
                     _fmt(self.best_value))
        else:
            log.info("Epoch %d/%d - Train Loss: %.4f", self.epoch, self.epochs, train_loss)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
