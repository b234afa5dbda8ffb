"""The training configuration: the seed YAML's sections and keys, typed and validated.

Sections and key names are the seed framework's (``dataset``, ``system``, ``model``, ``training``,
``validation``, ``logging``, ``visualization``; ``pfm_name``, ``finetune_mode``,
``RandomResizedCropSize``, ``ResizedSize`` ...), so a seed config loads unchanged. A few keys are
added (documented in ``docs/config.md``); every key has a default so a config only states what it
changes. Validation happens once, here, before any model is built:

* unknown keys are errors naming the full dotted key and the closest valid key;
* ``emb_dim`` is derived from the backbone; a contradicting value is an error giving the right value;
* crop/window sizes that are not multiples of the backbone's patch size are errors naming the
  nearest valid sizes;
* ``num_classes`` in ``dataset``, ``model`` and the dataset JSON must agree;
* the model the ``model`` keys describe is checked by :class:`~pfmseg_engine.model.ModelConfig`
  itself (strategy/head pairings, tuning ranges), with errors naming the seed keys;
* training crops and validation see the same magnification (see :func:`_check_magnification`).

The ``model`` keys are not declared here: :mod:`.seed_keys` maps each seed key onto a
ModelConfig/TuningConfig field, whose type and default it takes. A top-level ``protocol`` applies
a preset of :mod:`.protocols` before the config's own keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..classes import default_class_names
from ..errors import ConfigError, closest
from ..paths import check_input_path
from .protocols import PROTOCOLS, apply_protocol
from .schema import from_dict, merge, set_dotted, to_dict
from .seed_keys import ModelSection, field_type_and_default, model_fields, seed_key_names, seed_values

if TYPE_CHECKING:  # generated from the seed key table at import: its fields exist at run time only
    ModelSectionType = Any
else:  # the real class, so that from_dict reads the section's fields from the annotation
    ModelSectionType = ModelSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSection:
    json_file: str = ""
    num_classes: int | None = None
    ignore_index: int = 255
    class_names: list[str] | None = None
    class_colors: list[list[int]] | None = None


@dataclass(frozen=True)
class SystemSection:
    num_workers: int = 2
    pin_memory: bool = True
    seed: int = 42
    device: str = "auto"
    seeds: list[int] | None = None  # one run per seed into <experiment>/seed_<s>/, plus seeds_summary.csv/json


def _default_transforms() -> dict[str, Any]:
    from ..data.augment import DEFAULT_TRANSFORMS

    return {k: dict(v) for k, v in DEFAULT_TRANSFORMS.items()}


@dataclass(frozen=True)
class AugmentationSection:
    """``transforms`` entries merge into the defaults (``p: 0`` switches one off; null = none at all)."""

    RandomResizedCropSize: int = field_type_and_default("input_size")[1]
    scale: tuple[float, float] | None = None  # the seed's area-scale RandomResizedCrop; None: native resolution
    ratio: tuple[float, float] = (0.75, 1.33)
    zoom: tuple[float, float] | None = (0.8, 1.25)  # native-resolution crops, zoomed log-uniformly in this range
    transforms: dict[str, Any] | None = field(default_factory=_default_transforms)

    def __post_init__(self) -> None:
        merged = _default_transforms()
        if self.transforms is None:  # no augmentation: every transform switched off (round-trips through YAML)
            object.__setattr__(self, "transforms", {name: {**params, "p": 0.0} for name, params in merged.items()})
            return
        for name, params in self.transforms.items():
            if params is not None and not isinstance(params, dict):
                raise ConfigError(f"'training.augmentation.transforms.{name}' must be a mapping such as {{p: 0.5}}.")
            merged[name] = {**merged.get(name, {}), **(params or {})} if params is not None else {"p": 0.0}
        object.__setattr__(self, "transforms", merged)


@dataclass(frozen=True)
class OptimizerSection:
    type: str = "Adam"
    momentum: float = 0.9
    nesterov: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | None = None  # overrides training.weight_decay when set


@dataclass(frozen=True)
class SchedulerSection:
    type: str | None = "cosine"
    style: str = "pfmseg"  # "seed": the seed framework's per-epoch rules (schedulers.py)
    warmup_epochs: float = 2.0
    min_lr: float = 0.0
    T_max: int | None = None
    step_size: int = 30
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=lambda: [60, 80])
    T_0: int = 10
    T_mult: int = 1
    power: float = 0.9


@dataclass(frozen=True)
class LossSection:
    type: str = "cross_entropy"
    class_weights: list[float] | None = None
    dice_smooth: float = 1e-5
    iou_smooth: float = 1e-5
    absent_classes: str = "skip"  # Dice/IoU: classes absent from targets and predictions of a batch
    overlap_pooling: str = "batch"  # Dice/IoU: per class over the batch, or per image ("image", the seed's)
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    ohem_base_loss: str = "ce"
    ce_weight: float = 1.0
    dice_weight: float = 1.0


@dataclass(frozen=True)
class TrainingSection:
    batch_size: int = 8
    epochs: int = 100
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    use_amp: bool = True
    amp_dtype: str = "auto"
    accumulate_grad_batches: int = 1
    clip_grad_norm: float | None = 5.0
    samples_per_epoch: int | None = None
    augmentation: AugmentationSection = field(default_factory=AugmentationSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    loss: LossSection = field(default_factory=LossSection)


@dataclass(frozen=True)
class ValidationAugmentationSection:
    ResizedSize: int | None = None


@dataclass(frozen=True)
class ValidationSection:
    eval_interval: int = 1
    batch_size: int = 8
    augmentation: ValidationAugmentationSection = field(default_factory=ValidationAugmentationSection)
    resize_or_windowslide: str = "windowslide"
    overlap: float = 0.25
    monitor: str = "mIoU"


@dataclass(frozen=True)
class LoggingSection:
    log_dir: str = "logs"
    experiment_name: str | None = None  # None: every run gets a new folder (training.outputs.new_run_dir)
    plot_history: bool = True  # training_history.png after every epoch (false: a GUI draws its own curve)
    overwrite: bool = False  # train over a folder that holds a run (its old outputs are removed first)


@dataclass(frozen=True)
class VisualizationSection:
    save_interval: int = 10
    num_vis_samples: int = 8
    save_predictions: bool = True


VALIDATION_MODES = ("windowslide", "resize")
AMP_DTYPES = ("auto", "float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """All settings of a training run. Build with :func:`load_config` or :func:`config_from_dict`.

    ``protocol`` names the preset (:data:`~.protocols.PROTOCOLS`) whose settings were applied before
    the config's own keys; the sections hold the resolved values.
    """

    protocol: str | None = None
    dataset: DatasetSection = field(default_factory=DatasetSection)
    system: SystemSection = field(default_factory=SystemSection)
    model: ModelSectionType = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    visualization: VisualizationSection = field(default_factory=VisualizationSection)

    def __post_init__(self) -> None:
        _check_ranges(self)
        _check_names(self)
        _check_backbone(self)
        _check_classes(self)
        _check_model(self)
        _check_magnification(self)

    # --- derived values ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        value = self.dataset.num_classes or self.model.num_classes
        if value is None:
            raise ConfigError("num_classes is unknown: set dataset.num_classes or dataset.json_file.")
        return value

    @property
    def crop_size(self) -> int:
        return self.training.augmentation.RandomResizedCropSize

    @property
    def window_size(self) -> int:
        """Validation window (``validation.augmentation.ResizedSize``, default: the training crop)."""
        return self.validation.augmentation.ResizedSize or self.crop_size

    @property
    def output_dir(self) -> Path:
        """``log_dir/experiment_name``; an unnamed run's folder is chosen when it starts
        (:func:`~.outputs.claim_output_dir`), so asking before is an error."""
        if self.logging.experiment_name is None:
            raise ConfigError("logging.experiment_name is not set, so the run's folder is chosen when training starts "
                              "(a new log_dir/run-YYYYmmdd-HHMMSS-NNN); set it to name the folder.")
        name = Path(self.logging.experiment_name)
        if not name.parts or name.is_absolute() or ".." in name.parts or str(name) == ".":
            raise ConfigError(f"logging.experiment_name '{self.logging.experiment_name}' must name a folder inside "
                              "logging.log_dir (e.g. 'my_run'), not the log folder itself, a parent or an absolute "
                              "path: change experiment_name, or log_dir to choose where runs go.")
        return Path(self.logging.log_dir).expanduser() / name

    @property
    def class_names(self) -> tuple[str, ...]:
        names = self.dataset.class_names
        return tuple(names) if names else default_class_names(self.num_classes)

    def embed_dim(self) -> int | None:
        """The backbone's token width (what the seed's ``emb_dim`` had to repeat by hand); None for ``unet``."""
        return _derived_emb_dim(self.model.pfm_name, self.model.tiny)

    def model_config(self, num_classes: int | None = None) -> Any:
        """The :class:`~pfmseg_engine.model.ModelConfig` this training config describes.

        Fields are read from the seed keys through :data:`~.seed_keys.SEED_KEYS`; ``num_classes``
        (default: :attr:`num_classes`) and the class names come from the dataset, ``input_size`` is
        the training crop.
        """
        from ..model import ModelConfig

        n = self.num_classes if num_classes is None else num_classes
        names = self.class_names if num_classes is None else ()
        derived = {"num_classes": n, "class_names": names, "input_size": self.crop_size}
        return ModelConfig.from_dict(model_fields(self, derived))

    @classmethod
    def from_model_config(cls, model_config: Any, *, protocol: str | None = None,
                          **sections: dict[str, Any]) -> TrainConfig:
        """The training config of an existing model: the inverse of :meth:`model_config`.

        Retraining a model (more annotations, a loaded checkpoint) needs a config whose ``model`` and
        class settings describe that model exactly, so checkpoints written by the run rebuild it.
        ``sections`` are mappings merged into the named sections, e.g.
        ``from_model_config(mc, training={"epochs": 5}, system={"device": "cpu"})``; they are
        validated like a YAML file (unknown keys are errors naming the closest valid key).
        ``protocol`` applies a preset first; the model's own settings and ``sections`` override it.
        """
        data = seed_values(model_config)
        for name, values in sections.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"'{name}' must be a mapping of settings, got {values!r}.")
            data[name] = merge(data.get(name, {}), values or {})
        if protocol is not None:
            data["protocol"] = protocol
        return config_from_dict(data, check_dataset=False)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --- checks ----------------------------------------------------------------------------------------
def _positive(value: float | int | None, key: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _check_ranges(cfg: TrainConfig) -> None:
    t, v = cfg.training, cfg.validation
    for key, value in (("training.batch_size", t.batch_size), ("training.epochs", t.epochs),
                       ("training.learning_rate", t.learning_rate),
                       ("training.accumulate_grad_batches", t.accumulate_grad_batches),
                       ("training.samples_per_epoch", t.samples_per_epoch),
                       ("validation.eval_interval", v.eval_interval), ("validation.batch_size", v.batch_size),
                       ("visualization.save_interval", cfg.visualization.save_interval),
                       ("training.augmentation.RandomResizedCropSize", t.augmentation.RandomResizedCropSize),
                       ("validation.augmentation.ResizedSize", v.augmentation.ResizedSize)):
        _positive(value, key)
    for key, value in (("training.weight_decay", t.weight_decay), ("system.num_workers", cfg.system.num_workers),
                       ("training.clip_grad_norm", t.clip_grad_norm),
                       ("training.scheduler.warmup_epochs", t.scheduler.warmup_epochs),
                       ("training.scheduler.min_lr", t.scheduler.min_lr),
                       ("visualization.num_vis_samples", cfg.visualization.num_vis_samples)):
        _positive(value, key, allow_zero=True)
    if not 0.0 <= v.overlap < 1.0:
        raise ConfigError(f"'validation.overlap' must be in [0, 1), got {v.overlap}.")
    lo, hi = t.augmentation.scale or (1.0, 1.0)
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"'training.augmentation.scale' must satisfy 0 < min <= max <= 1, got {[lo, hi]}.")
    lo, hi = t.augmentation.zoom or (1.0, 1.0)
    if not 0 < lo <= hi:
        raise ConfigError(f"'training.augmentation.zoom' must satisfy 0 < min <= max, got {[lo, hi]}.")
    seeds = cfg.system.seeds
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"'system.seeds' must list distinct seeds (e.g. [0, 1, 2]) or be null, got {seeds}.")
    if 0 <= cfg.dataset.ignore_index < (cfg.dataset.num_classes or cfg.model.num_classes or 0):
        raise ConfigError(
            f"'dataset.ignore_index' {cfg.dataset.ignore_index} collides with the class indices; use 255."
        )


def _choice(value: str | None, choices, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' is '{value}'.{closest(str(value), choices)} Choose one of: {', '.join(choices)}.")


def _check_names(cfg: TrainConfig) -> None:
    from ..data.augment import JointAugment
    from ..heads import HEADS
    from ..metrics import MONITOR_METRICS
    from ..tuning import STRATEGIES
    from .losses import ABSENT_CLASSES, LOSSES, OVERLAP_POOLING
    from .optim import OPTIMIZERS
    from .schedulers import SCHEDULERS, make_schedule

    t = cfg.training
    if cfg.protocol is not None:
        _choice(cfg.protocol, PROTOCOLS, "protocol")
    _choice(cfg.model.finetune_mode.type, STRATEGIES, "model.finetune_mode.type")
    _choice(cfg.model.head, HEADS, "model.head")
    _choice(t.loss.type.lower(), LOSSES, "training.loss.type")
    _choice(t.loss.absent_classes, ABSENT_CLASSES, "training.loss.absent_classes")
    _choice(t.loss.overlap_pooling, OVERLAP_POOLING, "training.loss.overlap_pooling")
    _choice(t.optimizer.type.lower(), OPTIMIZERS, "training.optimizer.type")
    _choice(str(t.scheduler.type).lower(), SCHEDULERS, "training.scheduler.type")
    make_schedule(t.scheduler, t.learning_rate, t.epochs, steps_per_epoch=1)  # style, and type/T_max under it
    _choice(t.amp_dtype, AMP_DTYPES, "training.amp_dtype")
    _choice(cfg.validation.resize_or_windowslide, VALIDATION_MODES, "validation.resize_or_windowslide")
    _choice(cfg.validation.monitor, MONITOR_METRICS, "validation.monitor")
    JointAugment(t.augmentation.transforms, crop_size=None)  # raises ConfigError on unknown names/params
    weights = t.loss.class_weights
    if weights is not None and cfg.dataset.num_classes and len(weights) != cfg.dataset.num_classes:
        raise ConfigError(
            f"'training.loss.class_weights' has {len(weights)} values for {cfg.dataset.num_classes} classes; "
            "give one weight per class."
        )


def _derived_emb_dim(name: str, tiny: bool) -> int | None:
    """The backbone's token width; None for backbone-free models (``unet``), which have no tokens."""
    from ..backbones.registry import get_spec

    spec = get_spec(name)
    if spec.embed_dim is None:
        return None
    return int(spec.build_kwargs(tiny).get("embed_dim", spec.embed_dim)) if tiny else spec.embed_dim


def _check_size(size: int | None, key: str, spec) -> None:
    from ..model import nearest_valid_sizes

    if size is None:
        return
    if spec.fixed_input_size and size != spec.fixed_input_size:
        raise ConfigError(f"'{key}' is {size} but {spec.name} only accepts {spec.fixed_input_size}x"
                          f"{spec.fixed_input_size} inputs; set it to {spec.fixed_input_size}.")
    if size % spec.patch_size:
        raise ConfigError(
            f"'{key}' is {size}, not a multiple of {spec.name}'s patch size {spec.patch_size}; "
            f"nearest valid sizes: {nearest_valid_sizes(size, spec.patch_size)}."
        )


def _check_backbone(cfg: TrainConfig) -> None:
    from ..backbones.registry import get_spec

    try:
        spec = get_spec(cfg.model.pfm_name)
    except ConfigError as exc:
        raise ConfigError(f"model.pfm_name: {exc}") from exc
    derived = _derived_emb_dim(spec.name, cfg.model.tiny)
    m = cfg.model
    if m.emb_dim is not None and derived is None:
        raise ConfigError(f"model.emb_dim is {m.emb_dim} but {spec.name} has no token embedding; remove emb_dim.")
    if m.emb_dim is not None and m.emb_dim != derived:
        raise ConfigError(
            f"model.emb_dim is {m.emb_dim} but {spec.name}{' (tiny)' if m.tiny else ''} has "
            f"embedding dimension {derived}; set emb_dim: {derived} or remove it (it is derived from pfm_name)."
        )
    # the seed's UNet keys (configs/unet.yaml): accepted where they describe the model that is built
    if m.model_type not in (None, "", "unet") or (m.model_type == "unet" and spec.name != "unet"):
        raise ConfigError(f"model.model_type is '{m.model_type}'; the backbone is chosen by model.pfm_name "
                          "(pfm_name: unet for the UNet baseline), so remove model_type or set pfm_name: unet.")
    if m.n_channels != 3:
        raise ConfigError(f"model.n_channels is {m.n_channels}; models read RGB images, so it must be 3.")
    if not m.bilinear:
        raise ConfigError("model.bilinear is false, but pfmseg's UNet is the seed's bilinear variant "
                          "(transposed-convolution up-sampling is not available); remove it or set it to true.")
    _check_size(cfg.training.augmentation.RandomResizedCropSize, "training.augmentation.RandomResizedCropSize", spec)
    _check_size(cfg.validation.augmentation.ResizedSize, "validation.augmentation.ResizedSize", spec)


def _check_classes(cfg: TrainConfig) -> None:
    d, m = cfg.dataset.num_classes, cfg.model.num_classes
    if d is not None and m is not None and d != m:
        raise ConfigError(f"dataset.num_classes is {d} but model.num_classes is {m}; they must be equal.")
    n = d or m
    if n is not None and n < 1:
        raise ConfigError(f"num_classes must be >= 1, got {n}.")
    names = cfg.dataset.class_names
    if names is not None and n is not None and len(names) != n:
        raise ConfigError(f"dataset.class_names lists {len(names)} names for {n} classes; give one per class.")
    colours = cfg.dataset.class_colors
    if colours is not None and n is not None and len(colours) != n:
        raise ConfigError(f"dataset.class_colors lists {len(colours)} colours for {n} classes; give one per class.")


def _check_model(cfg: TrainConfig) -> None:
    """Build the ModelConfig once (without weights or modules): its own rules (strategy/head pairings,
    tuning ranges, backbone-specific rules) fail here, at load time, named by their seed keys."""
    names = cfg.dataset.class_names
    n = cfg.dataset.num_classes or cfg.model.num_classes or (len(names) if names else 1)
    try:
        cfg.model_config(num_classes=n)
    except ConfigError as exc:
        raise ConfigError(seed_key_names(str(exc))) from exc


def _check_magnification(cfg: TrainConfig) -> None:
    """Training crops must show tissue at the magnification validation (and inference) will use."""
    aug, mode = cfg.training.augmentation, cfg.validation.resize_or_windowslide
    if aug.scale is not None and aug.zoom is not None:
        raise ConfigError(
            f"'training.augmentation.scale' ({list(aug.scale)}, the seed's area-scale crops) and "
            f"'training.augmentation.zoom' ({list(aug.zoom)}, native-resolution crops with zoom jitter) are two "
            "ways of choosing the training magnification; set one of them to null."
        )
    if aug.scale is not None and mode != "resize":
        raise ConfigError(
            f"'training.augmentation.scale' {list(aug.scale)} crops {aug.scale[0]:g}-{aug.scale[1]:g} of each image's "
            "area and resizes it to the crop, so training sees whole images shrunk (a 1024 px tile at crop 224 is "
            "seen 3.2-4.6x smaller than at native resolution) while validation.resize_or_windowslide: "
            f"{mode} and slide inference run at native resolution. Either keep native-resolution crops "
            "(scale: null; zoom: [0.8, 1.25] adds mild zoom jitter) or validate as the seed does, resizing each "
            "image to the window (validation.resize_or_windowslide: resize; protocol: densebench sets both)."
        )
    if aug.scale is None and mode == "resize":
        log.warning(
            "validation.resize_or_windowslide is 'resize': each validation image is shrunk to the %d px window, "
            "but training crops are at native resolution (training.augmentation.scale is null), so validation "
            "sees another magnification than training and slide inference; use 'windowslide', or the seed's "
            "area-scale crops (protocol: densebench).", cfg.window_size)


# --- loading ---------------------------------------------------------------------------------------
def parse_options(options: list[str] | None) -> list[tuple[str, Any]]:
    """``["training.epochs=3", "model.tiny=true"]`` -> ``[("training.epochs", 3), ("model.tiny", True)]``.

    Values are parsed as YAML scalars/flow collections, as in the seed's ``--options``.
    """
    parsed = []
    for option in options or []:
        if "=" not in option:
            raise ConfigError(f"Option '{option}' is not in key=value form (e.g. training.epochs=3).")
        key, raw = option.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _resolve_input_paths(data: dict[str, Any], base_dir: Path | None) -> None:
    """Relative input files (json_file, pfm_weights_path) resolve against the config file's folder."""
    if base_dir is None:
        return
    for section, key in (("dataset", "json_file"), ("model", "pfm_weights_path")):
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and value and not value.startswith("hf-hub:") and not Path(value).is_absolute():
            data[section][key] = str((base_dir / value).resolve())


def apply_dataset_json(cfg: TrainConfig) -> TrainConfig:
    """Check the config against its dataset JSON and fill num_classes / class names / colours from it."""
    from ..data.seed_json import load_seed_json

    dataset = load_seed_json(cfg.dataset.json_file)
    for key, value in (("dataset.num_classes", cfg.dataset.num_classes), ("model.num_classes", cfg.model.num_classes)):
        if value is not None and value != dataset.num_classes:
            raise ConfigError(
                f"{key} is {value} but dataset JSON '{dataset.path}' has num_classes {dataset.num_classes}; "
                "they must agree."
            )
    d = cfg.dataset
    new = replace(
        d, num_classes=dataset.num_classes,
        class_names=d.class_names or list(dataset.class_names),
        class_colors=d.class_colors or ([list(c) for c in dataset.class_colors] if dataset.class_colors else None),
    )
    return replace(cfg, dataset=new)


def config_from_dict(data: dict[str, Any], base_dir: str | Path | None = None,
                     options: list[str] | None = None, check_dataset: bool = True) -> TrainConfig:
    """Validated :class:`TrainConfig` from a nested dict (plus dotted ``key=value`` overrides).

    A top-level ``protocol: NAME`` applies that preset (:data:`~.protocols.PROTOCOLS`) before the
    dict's own keys and the overrides, which change it key by key.
    """
    data = _deep_copy(data or {})
    if not isinstance(data, dict):
        raise ConfigError("A config must be a mapping of sections (dataset, system, model, ...).")
    for key, value in parse_options(options):
        set_dotted(data, key, value)
    data = apply_protocol(data)  # the preset's settings first; every key the config states overrides them
    _resolve_input_paths(data, Path(base_dir) if base_dir else None)
    cfg = from_dict(TrainConfig, data)
    if check_dataset:
        if not cfg.dataset.json_file:
            raise ConfigError("dataset.json_file is not set; point it at the dataset JSON (seed format).")
        cfg = apply_dataset_json(cfg)
    return cfg


def load_config(path: str | Path, options: list[str] | None = None, check_dataset: bool = True) -> TrainConfig:
    """Read a seed-style YAML config, apply ``--options`` overrides and validate everything."""
    path = Path(path).expanduser()
    check_input_path(path, "Config file", error=ConfigError)  # missing, a folder, a pipe, a link loop
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections, not {type(data).__name__}.")
    return config_from_dict(data, base_dir=path.resolve().parent, options=options, check_dataset=check_dataset)


def default_config_path() -> Path:
    """The packaged, fully documented example config."""
    return Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
