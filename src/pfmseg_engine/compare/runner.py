"""Running a comparison: every backbone x strategy x seed trained, scored and ranked, resumably.

Layout of ``output_dir``::

    leaderboard.csv / .md / .json / .png     the ranking (rewritten as rows finish)
    runs/<pfm>__<strategy>/seed_<s>/         a complete training run (config.yaml, checkpoints/, history)
        result.json                          its scores: per-image confusion matrices, metrics, timings
        error.txt                            why it failed (a rerun tries again)
    feature_cache/                           frozen backbone features (``--cache_dir`` to share it)
    checkpoint_scores/<file>-<id>/result.json  the scores of a checkpoint ranked as it is (``checkpoints``)

**Resuming.** A run whose ``result.json`` matches its settings (the training config without output
paths, the data mode, the scoring images, the weights file's content hash and the time budget) is
reused without building a model; a run interrupted during training continues from its ``last.pt``
when that was written under the same config; anything else is trained afresh. Rerunning the same
command after an interruption or a failure therefore only does what is missing. A checkpoint's scores
are reused while the file's content (its SHA-256), the backbone weights given for it and the scoring
(images, window, overlap, classes) stay the same.

**Checkpoints.** Trained model files named in ``CompareSpec.checkpoints`` are loaded as they are and
scored before any training, on the same images by the same code (:func:`score_model`) as the trained
rows; each is a row named after its file, with no seeds (a fixed model has no seed spread, so its
intervals resample the images only) and a training time of 0. A checkpoint that predicts other classes
than the comparison scores is a :class:`~pfmseg_engine.errors.ConfigError` when the comparison is set up.

**Failures.** A run that fails (a missing weights file, a configuration that does not fit a backbone,
running out of memory ...) is recorded with its error (``error.txt`` and the leaderboard's ``error``
column); the combination's remaining seeds are skipped and the other combinations go on. A full,
over-quota or read-only output disk is the exception: every later run would fail the same way, so the
comparison stops at once with a one-line :class:`~pfmseg_engine.errors.StorageError`, after ranking the
runs that finished.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import time
import traceback
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, PfmsegError, StorageError
from ..training.callbacks import Callback, CancelToken, StepInfo
from .budget import Clock, Phase, RunToken, TimeBudget, TrainingDeadline
from .data import CompareData, CropSetDataset, cache_incompatibilities
from .leaderboard import Leaderboard, build_row, rank_rows
from .spec import Combination, CompareSpec, run_config

log = logging.getLogger("pfmseg_engine.compare")

RESULT_FORMAT = 1
CHECKPOINT_SCORES = "checkpoint_scores"

CompareEvent = tuple[str, Any]


@dataclass(frozen=True)
class RunStart:
    """A run begins: ``index`` of ``total`` runs (combination x seed)."""

    index: int
    total: int
    combination: Combination
    seed: int
    run_dir: Path


@dataclass(frozen=True)
class CheckpointRow:
    """A trained model file ranked as it is: its row ``name`` (the file's name, with as many parent folders as
    make it unique), its backbone and strategy (from its config) and the ``folder`` its scores are kept in."""

    name: str
    path: Path
    pfm: str
    strategy: str
    folder: Path


@dataclass
class CompareResult:
    """How a comparison ended (``completed`` or ``cancelled``), its leaderboard and files."""

    status: str
    leaderboard: Leaderboard
    output_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    runs: dict[tuple[Combination, int], dict[str, Any]] = field(default_factory=dict)
    trained: int = 0  # runs trained (not reused) by this call
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # row name -> scores

    @property
    def failed(self) -> bool:
        return bool(self.leaderboard.failed)

    @property
    def winner(self) -> Any:
        return self.leaderboard.winner


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PfmsegError):
        return str(exc)
    if isinstance(exc, OSError):
        from ..storage import describe_os_error

        return describe_os_error(exc, action="accessing")
    return f"{type(exc).__name__}: {exc}"


def _stop_on_storage_fault(exc: BaseException, where: str) -> None:
    """Raise ``exc`` as a one-line :class:`~pfmseg_engine.errors.StorageError` when the output disk is full,
    over quota or read-only (torch's wrapped write errors included): every later run would fail the same
    way, so the comparison stops there instead of recording each remaining run as failed."""
    from ..storage import storage_fault

    fault = storage_fault(exc)
    if fault is None:
        return
    log.debug("%s", traceback.format_exc())
    raise StorageError(f"{fault} The comparison stopped at {where} (finished runs are kept).") from exc


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _unique_names(paths: list[Path]) -> list[str]:
    """Each path's file name, with as many parent folders as tell it apart from the others
    (``a/best.pt``, ``b/best.pt``): checkpoints of different runs often share a file name."""
    resolved = [p.expanduser().resolve() for p in paths]
    for depth in range(1, max((len(r.parts) for r in resolved), default=1) + 1):
        names = ["/".join(r.parts[-depth:]) for r in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in resolved]


class Comparison:
    """Train and score every combination x seed of ``spec`` on ``data`` (default: ``config``'s dataset JSON).

    :meth:`iter_run` is the loop as a generator of ``(kind, value)`` events (``status``: str, ``run``:
    :class:`RunStart`, ``cache``: (done, total) windows, ``step``/``epoch``: the trainer's events,
    ``result``: a run's scores, ``leaderboard``: the ranking so far) returning a
    :class:`CompareResult`, so a GUI worker can drive it; :meth:`run` drains it. ``cancel`` stops after
    the current batch; finished runs are kept (and ranked) and the same call resumes the rest.
    """

    def __init__(self, config: Any, spec: CompareSpec, output_dir: str | Path, *, data: CompareData | None = None,
                 callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None,
                 config_path: str | Path | None = None, clock: Clock = time.perf_counter):
        from ..storage import ensure_output_dir

        self.config = config
        self.spec = spec
        self.output_dir = ensure_output_dir(output_dir, "comparison output folder")
        self.data = data if data is not None else CompareData.from_seed_json(config)
        self.callbacks = list(callbacks)
        self.cancel = cancel or CancelToken()
        self.config_path = config_path
        self.combinations = spec.combinations(config.model.finetune_mode.type)
        self.seeds = spec.seeds_for(config)
        self.cache_root = Path(spec.cache_dir).expanduser() if spec.cache_dir else self.output_dir / "feature_cache"
        reasons = cache_incompatibilities(config.training.augmentation)
        if self.data.train is None:  # whole slides: a fixed crop set would scan every slide
            reasons.append("the data are whole slides, sampled lazily around their annotations")
        if spec.feature_cache == "on" and reasons:
            raise ConfigError("feature_cache 'on' needs training inputs that repeat exactly (a fixed crop set with "
                              "flips/rotations only), but " + "; ".join(reasons) + ".")
        self.fixed_crops = spec.feature_cache != "off" and not reasons
        self.notes = list(self.data.notes)
        if self.combinations and self.fixed_crops:  # with checkpoints only, nothing trains: no training notes
            self.notes.append(
                f"Every {'trained row used' if spec.checkpoints else 'row trained on'} the same fixed crop set "
                f"(windows of the training crop size, stride {spec.crop_stride or 'half the crop'}, flips/rotations "
                "only)"
                + ("; rows with a frozen backbone read its features from the feature cache."
                   if spec.feature_cache != "off" else "."))
        elif self.combinations and spec.feature_cache == "auto":
            self.notes.append("No feature cache: the training augmentation is not limited to flips/rotations ("
                              + "; ".join(reasons) + ").")
        self.records: dict[tuple[Combination, int], dict[str, Any]] = {}
        self.errors: dict[Combination, str] = {}
        self._crop_sets: dict[tuple[int, int | None], CropSetDataset] = {}
        self.trained = 0
        self.clock = clock
        self.budget = TimeBudget(spec.budget_s, clock)
        self.not_run: dict[tuple[Combination, int], str] = {}  # runs the budget left out, and why
        self.earlier: list[Combination] = []  # rows of earlier calls into the same folder, kept in the ranking
        self._score_seconds = 0.0  # the last scoring's time, set aside from each run's training share
        self._pending: list[tuple[Combination, int]] = []
        self.checkpoints = self._checkpoint_rows()
        self.checkpoint_records: dict[str, dict[str, Any]] = {}
        self.checkpoint_errors: dict[str, str] = {}

    # --- public -----------------------------------------------------------------------------------
    def run(self) -> CompareResult:
        events = self.iter_run()
        while True:
            try:
                next(events)
            except StopIteration as done:
                return done.value

    def iter_run(self) -> Generator[CompareEvent, None, CompareResult]:
        total = len(self.combinations) * len(self.seeds)
        log.info("Comparing %d combination(s) x %d seed(s) on %s, scored on %s; outputs in %s",
                 len(self.combinations), len(self.seeds), self.data.description, self.data.eval_split, self.output_dir)
        status = "completed"
        index = 0
        self.budget = TimeBudget(self.spec.budget_s, self.clock)
        self.earlier = self._adopt_earlier_rows()
        self._pending = [(c, s) for c in self.combinations for s in self.seeds]
        try:
            if self.checkpoints:
                finished = yield from self._score_checkpoints()
                if not finished:
                    status = "cancelled"
            for combination in self.combinations if status == "completed" else ():
                for seed in self.seeds:
                    index += 1
                    self._pending.remove((combination, seed))
                    if combination in self.errors:
                        continue
                    run_dir = self.output_dir / "runs" / combination.name / f"seed_{seed}"
                    yield "run", RunStart(index, total, combination, seed, run_dir)
                    record = yield from self._run_one(combination, seed, run_dir)
                    if record is None:  # cancelled by the user
                        status = "cancelled"
                        break
                    if record["status"] == "ok":
                        self.records[(combination, seed)] = record
                    elif record["status"] == "not run":
                        self.not_run[(combination, seed)] = record["note"]
                    yield "result", record
                if status == "cancelled":
                    break
                board = self.leaderboard()
                board.write(self.output_dir, plot=False)
                yield "leaderboard", board
        except BaseException:  # an error, Ctrl-C or a closed generator: rank what finished, then pass it on
            self._write_what_finished()
            raise
        board = self.leaderboard()
        files = board.write(self.output_dir)
        yield "leaderboard", board
        return CompareResult(status, board, self.output_dir, files, dict(self.records), self.trained,
                             dict(self.checkpoint_records))

    def _write_what_finished(self) -> None:
        """Write the leaderboard of the runs finished before an interruption. A fault here (often the same
        full disk) is only logged, so that the error reported is the one that stopped the comparison."""
        try:
            self.leaderboard().write(self.output_dir)
        except Exception as exc:
            log.warning("The leaderboard could not be written: %s", _describe(exc))

    def leaderboard(self) -> Leaderboard:
        rows = []
        split = self.data.eval_split
        scored_on = split if " " in split else f"the {split} images"
        for combination in [*self.combinations, *self.earlier]:
            runs = [self.records[(combination, s)] for s in self.seeds if (combination, s) in self.records]
            skipped = [self.not_run[(combination, s)] for s in self.seeds if (combination, s) in self.not_run]
            rows.append(build_row(combination.pfm, combination.strategy, runs, self.data.class_names,
                                  n_bootstrap=self.spec.n_bootstrap, error=self.errors.get(combination, ""),
                                  expected_seeds=len(self.seeds) - len(skipped), groups=self.data.groups,
                                  group_unit=self.data.group_unit, scored_on=scored_on,
                                  note=skipped[0] if skipped else ""))
        for entry in self.checkpoints:
            record = self.checkpoint_records.get(entry.name)
            rows.append(build_row(entry.pfm, entry.strategy, [record] if record else [], self.data.class_names,
                                  n_bootstrap=self.spec.n_bootstrap, error=self.checkpoint_errors.get(entry.name, ""),
                                  groups=self.data.groups, group_unit=self.data.group_unit, scored_on=scored_on,
                                  note=f"checkpoint {entry.name}, not retrained", source=entry.name))
        rows = rank_rows(rows, self.spec.n_bootstrap)
        notes = list(self.notes)
        if any(row.random_weights for row in rows):
            notes.append("Rows marked with random weights (tiny test models or no weights) have meaningless scores: "
                         "they only show the format.")
        board = Leaderboard(rows, tuple(self.data.class_names), self.data.eval_split, self.spec.n_bootstrap, notes)
        board.next_steps = self._next_steps(board)
        return board

    # --- checkpoints ranked as they are ------------------------------------------------------------
    def _checkpoint_rows(self) -> list[CheckpointRow]:
        """The spec's checkpoints as rows, each checked to predict exactly the comparison's classes.

        Checked when the comparison is set up, so a wrong file fails before any training: its scores
        against other classes would rank nothing meaningful.
        """
        from ..checkpoint import read_checkpoint
        from ..model import ModelConfig

        paths = [Path(p) for p in self.spec.checkpoints]
        classes = tuple(self.data.class_names)
        rows = []
        for path, name in zip(paths, _unique_names(paths), strict=True):
            model_config = ModelConfig.from_dict(read_checkpoint(path)["config"])
            if tuple(model_config.class_names) != classes:
                raise ConfigError(
                    f"Checkpoint '{path}' predicts {len(model_config.class_names)} classes "
                    f"({', '.join(model_config.class_names)}) but the comparison scores {len(classes)} "
                    f"({', '.join(classes)}): rank only checkpoints trained on these classes, in this order.",
                    fix_with=("checkpoints",))
            folder_id = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
            safe = re.sub(r"[^\w.-]+", "_", name)
            folder = self.output_dir / CHECKPOINT_SCORES / f"{safe}-{folder_id}"
            rows.append(CheckpointRow(name, path, model_config.backbone, model_config.tuning.strategy, folder))
        return rows

    def _score_checkpoints(self) -> Generator[CompareEvent, None, bool]:
        """Score every checkpoint row (or reuse its scores); False when the user cancelled."""
        for entry in self.checkpoints:
            if self.cancel.cancelled:
                return False
            record = yield from self._score_checkpoint(entry)
            if record is None:
                return False
            if record["status"] == "ok":
                self.checkpoint_records[entry.name] = record
            yield "result", record
        board = self.leaderboard()
        board.write(self.output_dir, plot=False)
        yield "leaderboard", board
        return True

    def _checkpoint_fingerprint(self, entry: CheckpointRow, weights: str | None) -> str:
        from ..backbones.registry import get_spec
        from .cache import file_sha256, weights_identity

        config = self.config
        return _digest({
            "format": RESULT_FORMAT,
            "checkpoint": "sha256:" + file_sha256(entry.path, self.output_dir / CHECKPOINT_SCORES / "sha256.json"),
            "weights": weights_identity(weights, get_spec(entry.pfm), self.cache_root / "weights_sha256.json")
            if weights else None,
            "scoring": {"validation": config.to_dict().get("validation"), "window": config.window_size,
                        "classes": list(self.data.class_names), "ignore_index": self.data.ignore_index,
                        "eval": self.data.eval_split,
                        "images": [self.data.test.name(i) for i in range(self.data.test.num_images())]},
        })

    def _score_checkpoint(self, entry: CheckpointRow) -> Generator[CompareEvent, None, dict[str, Any] | None]:
        """One checkpoint's ``result.json`` payload, scored like a trained run's best checkpoint; None when
        cancelled. A file that fails to load or score is a failed row (the comparison goes on)."""
        result_path, error_path = entry.folder / "result.json", entry.folder / "error.txt"
        base = {"pfm": entry.pfm, "strategy": entry.strategy, "seed": None, "source": entry.name}
        try:
            weights = self.spec.weights.get(entry.pfm) or None  # a backbone file moved since training
            fingerprint = self._checkpoint_fingerprint(entry, weights)
            previous = _read_json(result_path)
            if previous and previous.get("fingerprint") == fingerprint and previous.get("status") == "ok":
                log.info("Checkpoint %s: already scored (%s); reused.", entry.name, result_path)
                return previous
            from ..backbones.registry import get_spec
            from ..checkpoint import load_checkpoint
            from ..devices import resolve_device

            yield "status", f"checkpoint {entry.name}: loading"
            device = resolve_device(self.spec.device or self.config.system.device)
            model = load_checkpoint(entry.path, weights=weights, device=device)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            yield "status", f"checkpoint {entry.name}: scoring on {self.data.eval_split}"
            scoring_started = self.clock()
            scoring = _iter_score(model, self.data.test, self.config, device=device)
            while True:
                try:
                    event = next(scoring)
                except StopIteration as done:
                    scores = done.value
                    break
                yield event
                if self.cancel.cancelled:
                    return None
            self._score_seconds = self.clock() - scoring_started  # what a trained run's scoring will take
            speed = self._throughput(model, self.config, device)
            from_scratch = get_spec(entry.pfm).from_scratch
            record = {
                **base, "format": RESULT_FORMAT, "status": "ok", "fingerprint": fingerprint,
                "head": "own" if from_scratch else model.config.head, "eval_split": self.data.eval_split,
                "metrics": scores["metrics"], "image_names": scores["names"], "confusions": scores["confusions"],
                "trainable_params": trainable, "train_seconds": 0.0, "cache_seconds": 0.0,
                "feature_cache": "no (checkpoint scored as it is)", "windows_per_second": speed,
                "checkpoint": str(entry.path), "random_weights": not model.config.weights and not from_scratch,
            }
            from ..training.history import atomic_write_text

            entry.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(result_path, json.dumps(record, indent=None, allow_nan=True))
            error_path.unlink(missing_ok=True)
            return record
        except Exception as exc:  # a checkpoint that cannot be scored is a failed row, as a failing run is
            _stop_on_storage_fault(exc, f"checkpoint {entry.name}")
            message = _describe(exc)
            log.error("Checkpoint %s failed: %s", entry.name, message, extra={"fix_with": getattr(exc, "fix_with", ())})
            log.debug("%s", traceback.format_exc())
            self.checkpoint_errors[entry.name] = message
            try:
                entry.folder.mkdir(parents=True, exist_ok=True)
                error_path.write_text(message + "\n\n" + traceback.format_exc(), encoding="utf-8")
            except OSError:
                pass
            return {**base, "status": "failed", "error": message}

    # --- one run ----------------------------------------------------------------------------------
    def _reads_cache(self, combination: Combination) -> bool:
        """Whether a run of ``combination`` would read cached features (decided from the tables, before building)."""
        from ..backbones.registry import get_spec
        from ..tuning import STRATEGIES

        strategy = STRATEGIES[combination.strategy]
        trains_backbone = any(p.startswith(r"backbone\.") for p in strategy.trainable)
        return (self.fixed_crops and self.spec.feature_cache != "off" and not get_spec(combination.pfm).from_scratch
                and not strategy.reads_final_tokens and not trains_backbone)

    def _fingerprint(self, config: Any, weights_id: str, combination: Combination) -> str:
        settings = config.to_dict()
        settings.pop("logging", None)
        settings.pop("visualization", None)
        for key in ("device", "num_workers", "pin_memory"):
            settings["system"].pop(key, None)
        return _digest({
            "format": RESULT_FORMAT, "config": settings, "weights": weights_id,
            "data": {"fixed_crops": self.fixed_crops, "stride": self.spec.crop_stride,
                     "cache_dtype": self.spec.cache_dtype if self._reads_cache(combination) else None,
                     "eval": self.data.eval_split,
                     "images": [self.data.test.name(i) for i in range(self.data.test.num_images())]},
            "time_budget_s": self.spec.time_budget_s,
        })

    def _run_one(self, combination: Combination, seed: int, run_dir: Path
                 ) -> Generator[CompareEvent, None, dict[str, Any] | None]:
        result_path, error_path = run_dir / "result.json", run_dir / "error.txt"
        try:
            weights = self.spec.weights_for(combination.pfm, self.config)
            config = run_config(self.config, combination, seed, run_dir, weights=weights, tiny=self.spec.tiny)
            from ..backbones.registry import get_spec
            from .cache import weights_identity

            weights_id = weights_identity(weights, get_spec(combination.pfm), self.cache_root / "weights_sha256.json")
            fingerprint = self._fingerprint(config, weights_id, combination)
            previous = _read_json(result_path)
            if previous and previous.get("fingerprint") == fingerprint and previous.get("status") == "ok":
                log.info("%s seed %d: already done (%s); reused.", combination, seed, result_path)
                return previous
            if previous:
                log.info("%s seed %d: settings changed since %s; training again.", combination, seed, result_path)
            if self.budget.spent():
                note = (f"not run: the comparison's time budget ({self.budget.describe()}) was used up before it "
                        "started; run again to add it")
                log.info("%s seed %d: %s.", combination, seed, note)
                return {"status": "not run", "pfm": combination.pfm, "strategy": combination.strategy,
                        "seed": seed, "note": note}
            record = yield from self._train_and_score(combination, seed, run_dir, config, fingerprint, weights_id)
            if record is None:
                return None
            resolved = weights_identity(weights, get_spec(combination.pfm), self.cache_root / "weights_sha256.json")
            if resolved != weights_id:  # a hub model downloaded by this run: key its result by the file's hash
                record.update(weights=resolved, fingerprint=self._fingerprint(config, resolved, combination))
            from ..training.history import atomic_write_text

            atomic_write_text(result_path, json.dumps(record, indent=None, allow_nan=True))
            error_path.unlink(missing_ok=True)
            self.trained += 1
            return record
        except Exception as exc:  # one failing combination never stops the others ...
            _stop_on_storage_fault(exc, f"{combination} seed {seed}")  # ... unless the disk fails every later one too
            message = _describe(exc)
            log.error("%s seed %d failed: %s", combination, seed, message,
                      extra={"fix_with": getattr(exc, "fix_with", ())})
            log.debug("%s", traceback.format_exc())
            self.errors[combination] = message
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.txt").write_text(message + "\n\n" + traceback.format_exc(), encoding="utf-8")
            except OSError:
                pass
            return {"status": "failed", "pfm": combination.pfm, "strategy": combination.strategy, "seed": seed,
                    "error": message}

    def _adopt_earlier_rows(self) -> list[Combination]:
        """Rows trained into this folder by earlier calls with other backbones or strategies, which this
        call would reuse as they are (the resume rule: a ``result.json`` whose fingerprint matches the
        settings this comparison would train it with). They join the ranking; nothing is retrained."""
        from ..backbones.registry import get_spec
        from .cache import weights_identity

        runs = self.output_dir / "runs"
        found: list[Combination] = []
        if not runs.is_dir():
            return found
        for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
            for seed in self.seeds:
                record = _read_json(folder / f"seed_{seed}" / "result.json")
                if not record or record.get("status") != "ok":
                    continue
                try:
                    combination = Combination(get_spec(str(record["pfm"])).name, str(record["strategy"]))
                    if combination in self.combinations or folder.name != combination.name:
                        continue
                    weights = self.spec.weights_for(combination.pfm, self.config)
                    config = run_config(self.config, combination, seed, folder / f"seed_{seed}", weights=weights,
                                        tiny=self.spec.tiny)
                    weights_id = weights_identity(weights, get_spec(combination.pfm),
                                                  self.cache_root / "weights_sha256.json")
                except (PfmsegError, KeyError, OSError):
                    continue  # a backbone, strategy or weights file this comparison cannot name: not comparable
                if record.get("fingerprint") != self._fingerprint(config, weights_id, combination):
                    continue
                self.records[(combination, seed)] = record
                if combination not in found:
                    found.append(combination)
        if found:
            log.info("Ranked with %d row(s) from earlier comparisons in %s: %s", len(found), self.output_dir,
                     ", ".join(map(str, found)))
        return found

    def _crop_set(self, config: Any) -> CropSetDataset:
        key = (config.crop_size, self.spec.crop_stride)
        if key not in self._crop_sets:
            self._crop_sets[key] = CropSetDataset(
                self.data.train, crop=config.crop_size, stride=self.spec.crop_stride,
                transforms=config.training.augmentation.transforms, seed=config.system.seed,
                ignore_index=self.data.ignore_index)
        from .data import exact_probabilities, reachable_ops

        dataset = copy.copy(self._crop_sets[key])  # the windows are shared; seed, ops and length are the run's
        dataset.probabilities = exact_probabilities(config.training.augmentation.transforms)
        dataset.ops = reachable_ops(dataset.probabilities)
        dataset.seed, dataset.epoch, dataset.features = config.system.seed, 0, None
        dataset.length = config.training.samples_per_epoch or len(dataset.boxes)
        return dataset

    def _train_and_score(self, combination: Combination, seed: int, run_dir: Path, config: Any, fingerprint: str,
                         weights_id: str) -> Generator[CompareEvent, None, dict[str, Any] | None]:
        from ..checkpoint import load_into, read_checkpoint
        from ..training.runner import build_model_for
        from ..training.trainer import Trainer
        from .cache import cache_refusal, cached_forward

        device = self.spec.device or None
        run_started = self.clock()
        share = self.budget.share(len(self._pending) + 1)  # this run's equal part of what is left
        yield "status", f"{combination} seed {seed}: building the model"
        model = build_model_for(config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        token = RunToken(self.cancel)
        callbacks = list(self.callbacks)
        forward, cache_note, cache_seconds = None, "off", 0.0
        if self.fixed_crops:
            dataset: Any = self._crop_set(config)
            refusal = cache_refusal(model) if self.spec.feature_cache != "off" else "feature cache off"
            cache_note = f"no ({refusal})" if refusal else "yes"
            if refusal is None:
                started = self.clock()
                use, cache_note = yield from self._use_cache(combination, model, config, dataset, token, device,
                                                             share)
                cache_seconds = self.clock() - started
                if token.user_cancelled:
                    return None
                if use:
                    forward = cached_forward
        else:
            dataset = self.data.default_train_dataset(config)
        if self.spec.time_budget_s or self.budget.limited:
            deadline = (run_started + share - self._score_seconds) if self.budget.limited else None
            callbacks.append(TrainingDeadline(token, self.clock, seconds=self.spec.time_budget_s, deadline=deadline))
        trainer = Trainer(config, model, dataset, self.data.val, device=device, callbacks=callbacks, cancel=token,
                          forward=forward)
        resume = _resumable(run_dir, config)
        yield "status", f"{combination} seed {seed}: training" + (" (resumed)" if resume else "")
        training = trainer.iter_fit(resume=resume)
        while True:
            try:
                kind, value = next(training)
            except StopIteration as finished:
                result = finished.value
                break
            yield kind, value
            if isinstance(value, StepInfo):
                yield "phase", Phase("train", value.epoch * value.batches + value.batch + 1,
                                           value.epochs * value.batches)
        if token.user_cancelled:
            return None
        best = result.best_checkpoint if result.best_checkpoint.is_file() else result.last_checkpoint
        load_into(model, read_checkpoint(best), source=f"checkpoint '{best}'")
        model.eval()
        scoring_started = self.clock()
        yield "status", f"{combination} seed {seed}: scoring on {self.data.eval_split}"
        scores = yield from _iter_score(model, self.data.test, config, device=trainer.device)
        speed = self._throughput(model, config, trainer.device)
        self._score_seconds = self.clock() - scoring_started
        train_seconds = float(sum(float(r.get("seconds") or 0.0) for r in result.history))
        return {
            "format": RESULT_FORMAT, "status": "ok", "fingerprint": fingerprint, "pfm": combination.pfm,
            "strategy": combination.strategy, "head": model.config.head if not model.spec.from_scratch else "own",
            "seed": seed, "eval_split": self.data.eval_split, "metrics": scores["metrics"],
            "image_names": scores["names"], "confusions": scores["confusions"], "trainable_params": trainable,
            "train_seconds": train_seconds, "cache_seconds": cache_seconds, "feature_cache": cache_note,
            "windows_per_second": speed, "epochs": result.epochs_completed, "best_epoch": result.best_epoch,
            "stopped_by_time_budget": token.stopped, "checkpoint": str(best), "weights": weights_id,
            "random_weights": weights_id == "random-init" and not model.spec.from_scratch,
        }

    def _use_cache(self, combination: Combination, model: Any, config: Any, dataset: CropSetDataset,
                   token: RunToken, device: Any, share: float) -> Generator[CompareEvent, None, tuple[bool, str]]:
        """Fill the backbone's feature cache when it pays and attach it to ``dataset``; returns (used, note).

        ``auto`` fills only when fewer windows are missing than the live backbone passes the cache
        replaces (this call's remaining runs of the backbone that read it), and, with a budget, stops a
        fill whose first batches say it would not end within those runs' share of it; the runs then
        train live on the same crops (what is cached stays for next time). ``on`` always fills.
        """
        from ..devices import resolve_device
        from .cache import FeatureCache

        cache = FeatureCache(self.cache_root, model, crop=config.crop_size, dtype=self.spec.cache_dtype)
        missing = cache.missing_windows(dataset)
        readers = 1 + sum(1 for c, _ in self._pending if c.pfm == combination.pfm and self._reads_cache(c))
        live = readers * config.training.epochs * (config.training.samples_per_epoch or len(dataset.boxes))
        auto = self.spec.feature_cache == "auto"
        if auto and missing > live:
            note = f"no (filling {missing} windows costs more than the {live} live backbone passes it replaces)"
            log.info("%s: feature cache %s.", combination, note)
            return False, note
        allowed = share * readers if self.budget.limited and auto else math.inf
        model.to(resolve_device(device or config.system.device))
        started = self.clock()
        too_slow = False

        def should_stop(done: int, total: int) -> bool:
            nonlocal too_slow
            if token.cancelled:
                return True
            elapsed = self.clock() - started
            # the fill's own pace says it will not fit, or the comparison's time is up
            too_slow = bool(done and elapsed / done * total > allowed) or self.budget.spent()
            return too_slow

        filling = cache.iter_fill(dataset, device=next(model.parameters()).device,
                                  batch_size=config.validation.batch_size, should_stop=None)
        computed = 0
        while True:
            try:
                computed, total = next(filling)
            except StopIteration:
                break
            yield "phase", Phase("cache", computed, total)
            if should_stop(computed, total):
                filling.close()
                break
        if token.user_cancelled:
            return False, "no (cancelled)"
        if too_slow:
            note = (f"no (filling {missing} windows would not fit the time budget; {computed} cached for the next "
                    "comparison)")
            if not auto:
                raise ConfigError(f"The feature cache of {combination.pfm} could not be filled within the time "
                                  f"budget ({computed} of {missing} windows); raise the budget or set the feature "
                                  "cache to auto.")
            log.info("%s: feature cache %s.", combination, note)
            return False, note
        dataset.attach_features(cache.store(dataset))
        return True, "yes (built)" if computed else "yes"

    def _throughput(self, model: Any, config: Any, device: Any) -> float | None:
        if not self.spec.throughput_steps:
            return None
        from ..benchmarking import measure_throughput

        try:
            result = measure_throughput(model, config.window_size, config.validation.batch_size,
                                        steps=self.spec.throughput_steps, warmup=1, device=device)
        finally:
            model.eval()
        return result.images_per_second

    def _next_steps(self, board: Leaderboard) -> list[str]:
        winner = board.winner
        if winner is None:
            return []
        if winner.source:
            return ["# predict whole slides with the winning checkpoint",
                    f"python -m pfmseg_engine infer --checkpoint {winner.checkpoint} --slide SLIDE.svs "
                    "--output_dir preds"]
        config = str(self.config_path) if self.config_path else "YOUR_CONFIG.yaml"
        options = [f"model.pfm_name={winner.pfm}", f"model.finetune_mode.type={winner.strategy}"]
        weights = self.spec.weights_for(winner.pfm, self.config)
        if weights:
            options.append(f"model.pfm_weights_path={weights}")
        if self.spec.tiny:
            options.append("model.tiny=true")
        return [
            f"# train the winner with the full schedule ({winner.pfm} / {winner.strategy})",
            f"python -m pfmseg_engine train --config {config} --options {' '.join(options)}",
            "# or predict whole slides with the compared checkpoint right away",
            f"python -m pfmseg_engine infer --checkpoint {winner.checkpoint} --slide SLIDE.svs --output_dir preds",
        ]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _resumable(run_dir: Path, config: Any) -> Path | None:
    """``last.pt`` of an interrupted run trained under exactly ``config``, else None."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    try:
        from ..checkpoint import read_checkpoint

        payload = read_checkpoint(last)
    except Exception:
        return None
    stored = (payload.get("metadata") or {}).get("train_config")
    return last if stored == config.to_dict() and payload.get("training_state") else None


def _iter_score(model: Any, source: Any, config: Any, *, device: Any = None
                ) -> Generator[CompareEvent, None, dict[str, Any]]:
    """:func:`score_model` yielding ``("phase", Phase("score", done, total))`` after each image."""
    from ..metrics import ConfusionMeter
    from ..training.validation import iterate_predictions

    meter = ConfusionMeter(config.num_classes, config.dataset.ignore_index)
    names = []
    total = source.num_images()
    for done, (index, _image, mask, probs) in enumerate(iterate_predictions(
            model, source, window=config.window_size, mode=config.validation.resize_or_windowslide,
            overlap=config.validation.overlap, batch_size=config.validation.batch_size, device=device), 1):
        yield "phase", Phase("score", done, total)
        if mask is None:
            continue
        meter.update(probs.argmax(0), mask)
        names.append(source.name(index))
    if not names:
        raise ConfigError("No scoring image has a mask.")
    metrics = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in meter.compute().items()}
    return {"metrics": metrics, "names": names,
            "confusions": [np.asarray(cm, dtype=np.int64).tolist() for cm in meter.per_image]}


def score_model(model: Any, source: Any, config: Any, *, device: Any = None) -> dict[str, Any]:
    """Per-image confusion matrices and pooled metrics of ``model`` on every image of ``source`` with a mask.

    Predicted like validation: native resolution, ``validation.resize_or_windowslide`` with the config's
    window, overlap and batch size.
    """
    scoring = _iter_score(model, source, config, device=device)
    while True:
        try:
            next(scoring)
        except StopIteration as done:
            return done.value


def compare_models(config: Any, spec: CompareSpec, output_dir: str | Path, **kwargs: Any) -> CompareResult:
    """Run a :class:`Comparison` to the end (same arguments) and return its :class:`CompareResult`."""
    return Comparison(config, spec, output_dir, **kwargs).run()
