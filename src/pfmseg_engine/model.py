"""SegmentationModel = backbone + tuning strategy + head, built from one serialisable config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backbones.backbone import build_backbone
from .backbones.positions import checkpoint_position_grid
from .backbones.registry import get_spec
from .backbones.specs import BackboneSpec
from .classes import default_class_names
from .errors import ConfigError, reject_unknown_keys
from .heads import DEFAULT_HEAD, HEADS, build_head, head_reads_final_tokens
from .tuning import STRATEGIES, Encoder, TuningConfig, apply_strategy

if TYPE_CHECKING:  # built only through build_model, which imports the UNet when a config asks for it
    from .unet import UNetEncoder


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored verbatim in every checkpoint.

    ``weights`` is the backbone checkpoint (local path or ``hf-hub:[repo]``); it is not needed to
    reload a ``full`` fine-tune, whose checkpoint holds the whole backbone. ``input_size`` is the
    training window (pixels) and ``mpp`` the training resolution, which whole-slide inference uses
    as its default target resolution.

    ``backbone="unet"`` is the from-scratch baseline (:mod:`pfmseg_engine.unet`): no ``weights`` or
    ``feature_indices``; the default ``tuning`` becomes ``full`` and any other strategy is an error;
    ``head`` must stay at its default, which the UNet ignores (its expanding path is its decoder).

    ``light_head_final_norm``: the ``light`` head decodes the encoder's final normalised output (the
    last tapped block after the ViT's final LayerNorm) instead of the raw block; other heads ignore it.
    Checkpoints written before it existed lack the key and so rebuild with their old behaviour (off).
    """

    backbone: str
    num_classes: int
    class_names: tuple[str, ...] = ()
    weights: str | None = None
    strict_weights: bool = True
    tiny: bool = False
    feature_indices: tuple[int, ...] | None = None
    tuning: TuningConfig = field(default_factory=TuningConfig)
    head: str = DEFAULT_HEAD
    light_head_final_norm: bool = False
    input_size: int = 224
    mpp: float | None = None

    def __post_init__(self) -> None:
        spec = get_spec(self.backbone)
        object.__setattr__(self, "backbone", spec.name)
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}.")
        names = tuple(self.class_names) or default_class_names(self.num_classes)
        if len(names) != self.num_classes:
            raise ConfigError(
                f"{len(names)} class names given ({', '.join(names)}) for num_classes={self.num_classes}; "
                "give one name per class."
            )
        object.__setattr__(self, "class_names", names)
        if self.feature_indices is not None:
            object.__setattr__(self, "feature_indices", tuple(int(i) for i in self.feature_indices))
        if isinstance(self.tuning, dict):
            object.__setattr__(self, "tuning", TuningConfig.from_dict(self.tuning))
        if spec.from_scratch:  # unet: no weights, strategy 'full', head left default (rules in unet.py)
            from .unet import from_scratch_settings

            for key, value in from_scratch_settings(self).items():
                object.__setattr__(self, key, value)
        if not spec.from_scratch:
            check_head_and_strategy(self.head, self.tuning.strategy)
        if spec.fixed_input_size and not self.tiny and self.input_size != spec.fixed_input_size:
            raise ConfigError(
                f"{spec.name} was trained with a fixed {spec.fixed_input_size}x{spec.fixed_input_size} position "
                f"table; set input_size to {spec.fixed_input_size} (got {self.input_size})."
            )
        if self.input_size % spec.patch_size:
            raise ConfigError(
                f"input_size {self.input_size} is not a multiple of {spec.name}'s patch size "
                f"{spec.patch_size}; nearest valid sizes: {nearest_valid_sizes(self.input_size, spec.patch_size)}."
            )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["feature_indices"] = list(self.feature_indices) if self.feature_indices else None
        data["tuning"] = self.tuning.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        reject_unknown_keys(data, (f.name for f in fields(cls)), "model setting")
        data = dict(data)
        data["tuning"] = TuningConfig.from_dict(data.get("tuning") or {})
        data["class_names"] = tuple(data.get("class_names") or ())
        return cls(**data)

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


def check_head_and_strategy(head: str, strategy: str) -> None:
    """Refuse pairings in which the strategy's trainable part could never train.

    A CNN adapter reaches the output only through its skips; a head that ignores skips (``light``)
    would leave it at its random initialisation while the optimizer and checkpoint carry it. Checked on
    the config, so the mistake surfaces before anything is built or loaded. Unknown heads are left to
    :func:`~pfmseg_engine.heads.build_head`, which names the valid ones.
    """
    head_cls = HEADS.get(head)
    if head_cls is None or not STRATEGIES[strategy].adds_skips or getattr(head_cls, "uses_skips", True):
        return
    skip_heads = [name for name, cls in HEADS.items() if getattr(cls, "uses_skips", True)]
    raise ConfigError(
        f"Head '{head}' ignores CNN-adapter skips, so strategy '{strategy}' would never train its adapter. "
        f"Use a head that reads skips ({', '.join(skip_heads)}), or another strategy with the '{head}' head "
        "(e.g. frozen or transformer_adapter)."
    )


def nearest_valid_sizes(size: int, patch: int) -> str:
    """The multiples of ``patch`` just below and above ``size`` (for error messages)."""
    below = max(patch, size // patch * patch)
    above = below + patch if below <= size else below
    return f"{below} or {above}" if below != above else str(below)


# Where a trained position table sits in a model's state (only strategies that train the backbone store it).
POSITION_TABLE_KEY = "encoder.backbone.vit.pos_embed"


class SegmentationModel(nn.Module):
    """Takes RGB in [0, 1] of any size, returns per-pixel class logits of the same size.

    Normalisation with the backbone's own mean/std happens inside, so callers (trainer, slide
    inference, napari) never need to know which PFM they drive. Inputs are padded to the patch
    multiple and logits cropped back.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ModelConfig, encoder: Encoder | UNetEncoder, head: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.head = head
        spec = encoder.backbone.spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def spec(self) -> BackboneSpec:
        return self.encoder.backbone.spec

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected RGB input of shape (N, 3, H, W), got {tuple(x.shape)}.")
        height, width = x.shape[-2:]
        x = (x - self.mean) / self.std
        x = self.encoder.backbone.pad_to_patch_multiple(x)
        features = self.encoder(x)
        logits = self.head(features.grids, features.skips, out_size=tuple(x.shape[-2:]))
        return logits[..., :height, :width]

    # --- what trains is what a checkpoint stores -------------------------------------------------
    def is_trainable_name(self, name: str) -> bool:
        """Whether parameter ``name`` trains under this model's strategy (the head always does)."""
        if name.startswith("head."):
            return True
        if name.startswith("encoder."):
            return STRATEGIES[self.config.tuning.strategy].is_trainable(name.removeprefix("encoder."))
        return False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights the strategy trains (plus buffers of those modules), detached on the CPU."""
        state = self.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items() if self.is_trainable_name(k)}

    def adopt_stored_position_grid(self, state: dict[str, torch.Tensor]) -> None:
        """Build the position table at the grid of a trained one in ``state`` (``full`` fine-tunes store it).

        A backbone keeps its weights file's grid (``adopt_checkpoint_grid``), so a trained table has that
        grid; reloading with other weights, none, or from an earlier pfmseg that used the spec's grid would
        otherwise meet a table of another shape. The stored table then replaces the rebuilt one.
        """
        table = state.get(POSITION_TABLE_KEY)
        backbone = getattr(self.encoder, "backbone", None)
        if table is None or backbone is None or getattr(backbone.vit, "pos_embed", None) is None:
            return
        grid = checkpoint_position_grid({"pos_embed": table}, backbone.vit)
        if grid is not None:
            backbone.use_position_grid(grid)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load exactly the trainable part; anything else is a mismatch, never silently ignored."""
        expected = set(self.trainable_state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        own = self.state_dict()
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                 for k in sorted(expected & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{len(missing)} missing (first: {', '.join(missing[:4]) or '-'}), "
                f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:4]) or '-'}), "
                f"{len(wrong)} wrong shapes (first: {'; '.join(wrong[:3]) or '-'})"
            )
        self.load_state_dict(state, strict=False)


def build_model(config: ModelConfig, *, weights: str | None = None,
                device: str | torch.device | None = None) -> SegmentationModel:
    """Build backbone, apply the tuning strategy, attach the head. ``weights`` overrides config's."""
    if get_spec(config.backbone).from_scratch:  # backbone-free baselines (unet) have their own builder
        from .unet import build_unet_parts

        if weights:
            config = config.with_changes(weights=weights)  # refused with the reason by ModelConfig
        model = SegmentationModel(config, *build_unet_parts(config))
        _check_declared_trainable(model)
        return model.to(device) if device is not None else model
    # the final norm stays only for consumers of the encoder's normalised output (cup head, light head with
    # final_norm, transformer adapter); the other heads read raw block outputs, so their checkpoints keep their keys
    options = head_options(config)
    keep_final_norm = (STRATEGIES[config.tuning.strategy].reads_final_tokens
                       or head_reads_final_tokens(config.head, **options))
    backbone = build_backbone(
        config.backbone,
        weights or config.weights,
        tiny=config.tiny,
        strict=config.strict_weights,
        feature_indices=config.feature_indices,
        keep_final_norm=keep_final_norm,
    )
    encoder = apply_strategy(backbone, config.tuning)
    head = build_head(config.head, encoder.grid_channels, encoder.skip_channels, config.num_classes,
                      patch_size=backbone.patch_size, **options)
    model = SegmentationModel(config, encoder, head)
    _check_declared_trainable(model)
    return model.to(device) if device is not None else model


def head_options(config: ModelConfig) -> dict[str, Any]:
    """The settings of ``config``'s head beyond those every head takes (only ``light`` has one)."""
    return {"final_norm": config.light_head_final_norm} if config.head == "light" else {}


def _check_declared_trainable(model: SegmentationModel) -> None:
    """The strategy's declaration and the actual requires_grad flags must agree exactly."""
    for name, param in model.named_parameters():
        if param.requires_grad != model.is_trainable_name(name):
            raise RuntimeError(
                f"Parameter '{name}' has requires_grad={param.requires_grad} but strategy "
                f"'{model.config.tuning.strategy}' declares otherwise."
            )


