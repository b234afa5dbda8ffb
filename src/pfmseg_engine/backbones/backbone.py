"""Building a registered backbone as a timm model and exposing one feature API for all of them."""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError
from .layouts import converter_for
from .positions import RUNTIME_RESAMPLED_LAYOUTS, checkpoint_position_grid, use_vendor_resampling
from .registry import get_spec
from .specs import BackboneSpec
from .weights import read_state_dict, resolve_weights_file

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

log = logging.getLogger(__name__)


class RandomWeightsWarning(UserWarning):
    """A backbone runs with random weights, so its features carry no pathology knowledge."""


def _symbol_table() -> dict[str, dict[str, Any]]:
    from timm.layers import SwiGLUPacked

    return {
        "mlp_layer": {"swiglu_packed": SwiGLUPacked},
        "act_layer": {"silu": nn.SiLU, "gelu": nn.GELU},
    }


def resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace the table's symbolic names by the classes timm expects."""
    symbols = _symbol_table()
    resolved: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "norm_eps":
            resolved["norm_layer"] = partial(nn.LayerNorm, eps=value)
        elif key in symbols and isinstance(value, str):
            resolved[key] = symbols[key][value]
        else:
            resolved[key] = value
    return resolved


def create_vit(spec: BackboneSpec, tiny: bool = False, overrides: dict[str, Any] | None = None) -> VisionTransformer:
    """Create the timm model of ``spec`` (random weights, never a download).

    The model resamples its position table at run time with the kernel of the checkpoint's vendor
    (see :mod:`.positions`), so a converted transformers checkpoint computes what its vendor does.
    """
    import timm

    kwargs = spec.build_kwargs(tiny)
    kwargs.update(overrides or {})
    vit = timm.create_model(spec.timm_arch, pretrained=False, **resolve_kwargs(kwargs))
    return cast("VisionTransformer", use_vendor_resampling(vit, spec.checkpoint_layout))  # every spec is a timm ViT


def default_feature_indices(depth: int, levels: int = 4) -> tuple[int, ...]:
    """``levels`` evenly spaced block indices ending at the last block (e.g. 5, 11, 17, 23 for 24)."""
    levels = max(1, min(levels, depth))
    return tuple(sorted({round(depth * (i + 1) / levels) - 1 for i in range(levels)}))


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the ``meta`` device)."""
    return sum(p.numel() for p in module.parameters())


class Backbone(nn.Module):
    """A timm ViT plus what segmentation needs to know about it.

    ``features`` returns the token grids of the tapped blocks as NCHW tensors (prefix tokens
    dropped), padding the input up to the patch multiple so any height and width are accepted.
    """

    def __init__(self, spec: BackboneSpec, vit: VisionTransformer, feature_indices: Sequence[int] | None = None):
        super().__init__()
        self.spec = spec
        self.vit = vit
        depth = len(vit.blocks)
        indices = tuple(feature_indices) if feature_indices else default_feature_indices(depth)
        bad = [i for i in indices if not -depth <= i < depth]
        if bad:
            raise ConfigError(
                f"Feature indices {bad} are outside the {depth} blocks of {spec.name}; "
                f"use values in 0..{depth - 1}."
            )
        self.feature_indices = tuple(i % depth for i in indices)
        self.keeps_final_norm = False

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def position_grid(self) -> tuple[int, int]:
        """The patch grid the position table is stored at (resampled from it to each input's grid)."""
        return tuple(self.vit.patch_embed.grid_size)

    def use_position_grid(self, grid: Sequence[int]) -> None:
        """Rebuild the position table at ``grid`` (the model's nominal input size follows)."""
        if tuple(grid) != self.position_grid:
            self.vit.set_input_size(img_size=(grid[0] * self.patch_size, grid[1] * self.patch_size))

    def pad_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right so height and width are multiples of the patch size."""
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def features(self, x: torch.Tensor, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Token grids (N, C, ceil(H/p), ceil(W/p)) of the tapped blocks for normalised input ``x``."""
        x = self.pad_to_patch_multiple(x)
        grids = self.vit.forward_intermediates(
            x,
            indices=list(indices or self.feature_indices),
            output_fmt="NCHW",
            intermediates_only=True,
        )
        return cast("list[torch.Tensor]", grids)  # intermediates_only: the grids alone

    def features_and_tokens(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``features(x)`` plus the whole token sequence (prefix tokens first) of the last tapped block.

        What a Transformer adapter and the final norm work on: the class and register tokens are part
        of the sequence the encoder's last block produced, so they are kept here (raw, before any norm).
        """
        x = self.pad_to_patch_multiple(x)
        # intermediates_only: a list of (grid, prefix tokens) per tapped block, or of grids
        outs = cast("list[Any]", self.vit.forward_intermediates(
            x,
            indices=list(self.feature_indices),
            return_prefix_tokens=True,
            output_fmt="NCHW",
            intermediates_only=True,
        ))
        if not isinstance(outs[0], tuple):  # a ViT without prefix tokens returns bare grids
            return list(outs), outs[-1].flatten(2).transpose(1, 2)
        grids = [grid for grid, _ in outs]
        grid, prefix = outs[-1]
        return grids, torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)

    def tokens_to_grid(self, tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        """(N, prefix + h*w, C) tokens -> (N, C, h, w) patch grid (prefix tokens dropped)."""
        h, w = grid_size
        patches = tokens[:, tokens.shape[1] - h * w:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.features(x)

    def prune_unused(self, keep_final_norm: bool = False) -> None:
        """Drop blocks after the last tapped one, the classifier head and (unless kept) the final norm.

        They never contribute to the tapped grids, so keeping them would waste compute and, under
        full fine-tuning, store parameters that can never change. Done after weights are loaded so
        strict loading still sees the complete published architecture. ``keep_final_norm`` keeps the
        ViT's final LayerNorm for consumers of the encoder's normalised output (the ``cup`` head, the
        Transformer adapter); the other heads read raw block outputs and drop it, so their checkpoints
        (``full`` fine-tunes store the whole backbone) keep their keys.
        """
        self.vit.prune_intermediate_layers(list(self.feature_indices), prune_norm=not keep_final_norm,
                                           prune_head=True)
        self.keeps_final_norm = keep_final_norm and not isinstance(self.vit.norm, nn.Identity)


def _seed_for(name: str) -> int:
    return zlib.crc32(name.encode())


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    tiny: bool = False,
    strict: bool = True,
    feature_indices: Sequence[int] | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    keep_final_norm: bool = False,
) -> Backbone:
    """Build backbone ``name`` in the architecture of its published checkpoint and load weights.

    ``weights`` is a local file or ``hf-hub:[repo]``. ``keep_final_norm``: see
    :meth:`Backbone.prune_unused`. Without weights the backbone is initialised
    randomly, reproducibly per name (so a checkpoint trained on a random backbone can be reloaded),
    and a :class:`RandomWeightsWarning` says that its features are meaningless.
    """
    spec = get_spec(name)
    if spec.kind != "vit":
        raise ConfigError(
            f"'{spec.name}' is a backbone-free model, not a foundation-model backbone; build it with "
            f"build_model(ModelConfig(backbone='{spec.name}', num_classes=...))."
        )
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return Backbone(spec, create_vit(spec, tiny, overrides), feature_indices)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed_for(spec.name + (":tiny" if tiny else "")))
        vit = create_vit(spec, tiny, overrides)
    backbone = Backbone(spec, vit, feature_indices)
    if weights:
        # an explicit img_size is the caller's build grid; otherwise the checkpoint's own grid is kept
        load_backbone_weights(backbone, weights, strict=strict, adopt_grid="img_size" not in (overrides or {}))
        backbone.prune_unused(keep_final_norm)
    else:
        backbone.prune_unused(keep_final_norm)
        message = (
            f"Backbone '{spec.name}' has no pretrained weights and is randomly initialised: its "
            "features carry no pathology knowledge and results are meaningless for real use. Pass the "
            f"published checkpoint ({spec.weights_source}) as weights / 'pfm_weights_path'."
        )
        log.warning(message)
        warnings.warn(message, RandomWeightsWarning, stacklevel=2)
    return backbone.to(device) if device is not None else backbone


def adopt_checkpoint_grid(backbone: Backbone, state: dict[str, torch.Tensor]) -> None:
    """Build the position table at the checkpoint's grid so it is resampled once, not twice.

    With ``dynamic_img_size`` the model resamples its table to the run grid on every forward, with the
    vendor's kernel (:mod:`.positions`). Resampling the checkpoint's table to the spec's build grid at
    load time first would make that two bicubic interpolations (checkpoint grid -> build grid -> run
    grid; e.g. a UNI fine-tuned at 448 px, 28x28, squeezed to 14x14 and then stretched to 32x32 for
    512 px inputs), losing detail and departing from the vendor model. Keeping the checkpoint's grid
    makes the one run-time resample exactly the vendor's computation at every input size.
    """
    if backbone.spec.checkpoint_layout not in RUNTIME_RESAMPLED_LAYOUTS:
        return
    grid = checkpoint_position_grid(state, backbone.vit)
    if grid is None or grid == backbone.position_grid:
        return
    log.info("%s: keeping the checkpoint's %dx%d position grid (build default %s); it is resampled to each "
             "input size with the vendor's kernel", backbone.spec.name, grid[0], grid[1], backbone.position_grid)
    backbone.use_position_grid(grid)


def load_backbone_weights(backbone: Backbone, source: str | Path, strict: bool = True,
                          adopt_grid: bool = True) -> None:
    """Load a published checkpoint into ``backbone``, converting its layout; refuse partial loads.

    ``adopt_grid``: build the position table at the checkpoint's own grid (see
    :func:`adopt_checkpoint_grid`); off when the caller fixed the build size explicitly.
    """
    spec = backbone.spec
    path = resolve_weights_file(source, spec.hf_hub_id, spec.hf_filenames)
    state = read_state_dict(path)
    if adopt_grid:
        adopt_checkpoint_grid(backbone, state)
    state = converter_for(spec.checkpoint_layout)(state, backbone.vit)
    own = backbone.vit.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs expected {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    architecture = (
        f"{spec.name} = {spec.timm_arch} (dim {backbone.embed_dim}, depth {backbone.depth}, "
        f"patch {spec.patch_size}, layout '{spec.checkpoint_layout}')"
    )
    if wrong_shape:
        raise WeightsError(
            f"Weights file '{path}' does not fit {architecture}: {len(wrong_shape)} tensors have the "
            f"wrong shape, first: {'; '.join(wrong_shape[:3])}. Is this the checkpoint of {spec.name}?"
        )
    if (missing or unexpected) and strict:
        raise WeightsError(
            f"Weights file '{path}' does not fit {architecture}: {len(missing)} missing keys "
            f"(first: {', '.join(missing[:5]) or '-'}), {len(unexpected)} unexpected keys "
            f"(first: {', '.join(unexpected[:5]) or '-'}). Check that the file is the checkpoint of "
            f"{spec.name}; to load the matching part anyway set strict_weights=False "
            "(config: model.strict_weights: false)."
        )
    if missing or unexpected:
        log.warning(
            "Non-strict load of '%s' into %s: %d missing keys (%s), %d unexpected keys (%s)",
            path, spec.name, len(missing), ", ".join(missing[:5]), len(unexpected), ", ".join(unexpected[:5]),
        )
    backbone.vit.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
