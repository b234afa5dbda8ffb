"""The seed framework's UNet as a backbone-free baseline (``backbone: unet``, seed ``pfm_name: unet``).

No foundation model: a plain UNet trained from scratch through the same trainer, checkpoints, slide
inference and napari widgets, so every comparison can answer "does a foundation model help here at all?".

Architecture (the seed's ``models/unet.py``, itself milesial/Pytorch-UNet, with its default and the
seed's ``configs/unet.yaml`` setting ``bilinear: true``): ``DoubleConv`` = (3x3 conv without bias,
BatchNorm, ReLU) twice; an input DoubleConv to 64 channels and four max-pool downsamplings to 128, 256,
512 and 512 channels (the bottleneck is halved because up-sampling is bilinear); four bilinear x2
up-samplings (``align_corners=True``), each concatenating the skip and applying a DoubleConv whose
middle width is half its input (1024->512->256, 512->256->128, 256->128->64, 128->64->64); a 1x1
classifier. That is 17,262,912 + 65 x num_classes parameters (17,263,042 for two classes), exactly the
seed's. The seed normalises UNet inputs with ImageNet mean/std; so do we, inside the model. ``tiny``
shrinks the base width from 64 to 8 (about 270 k parameters) for tests.

It is expressed in the terms of :class:`~pfmseg_engine.model.SegmentationModel`, so nothing downstream
needs to know it is not a PFM:

- the contracting path is the model's backbone (``model.encoder.backbone``, with ``spec``,
  ``patch_size`` = 16 - the size multiple of four 2x poolings: inputs are padded to it and logits
  cropped back - ``pad_to_patch_multiple`` and ``features`` returning the five feature maps, finest first);
- the encoder (``model.encoder``: ``backbone``, no adapters) returns those maps as its grids;
- the tuning strategy is ``full``, and the strategy table's declaration of what ``full`` trains
  (everything under ``backbone.``) is what the model and the checkpoint writer read, as for a PFM: every
  weight and every BatchNorm statistic trains and is stored. A unet checkpoint is therefore complete
  and reloads without any weights file;
- the expanding path is the head, called ``head(grids, skips, out_size)`` like every head.

Module names inside follow the seed (``inc``, ``down1.maxpool_conv``, ``up1.conv.double_conv``,
``outc.conv``), under ``encoder.backbone.`` (contracting) and ``head.`` (expanding path).

Configuration rules, enforced when a :class:`~pfmseg_engine.model.ModelConfig` is made
(:func:`from_scratch_settings`): no ``weights`` and no ``feature_indices``; the tuning strategy is
``full`` - ``frozen`` (the default strategy, and a protocol preset's) becomes ``full``, since nothing
pretrained exists to freeze, and any other strategy is an error; ``head`` does not apply (the UNet's
expanding path is its decoder): it is stored as the default, so a preset's head never gets in the
way of ``pfm_name: unet``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.registry import get_spec
from .backbones.specs import BackboneSpec
from .errors import ConfigError
from .heads import DEFAULT_HEAD
from .tuning import STRATEGIES, EncoderOutput

if TYPE_CHECKING:  # the model builds the UNet from its config; this module never imports the model
    from .model import ModelConfig

log = logging.getLogger(__name__)


class DoubleConv(nn.Module):
    """(3x3 conv, BatchNorm, ReLU) x 2; the convolutions have no bias (BatchNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pooling, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """x2 up-sampling, concatenation with the skip (skip first), then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True):
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # never with inputs padded to the multiple of 16; kept for direct callers
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Module):
    """The 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def unet_widths(base_width: int, bilinear: bool = True) -> tuple[int, int, int, int, int]:
    """Channels of the five contracting levels (64, 128, 256, 512, 512 for the seed's UNet)."""
    factor = 2 if bilinear else 1
    return (base_width, 2 * base_width, 4 * base_width, 8 * base_width, 16 * base_width // factor)


class UNetBackbone(nn.Module):
    """The contracting path, in the place (and with the interface) of a PFM backbone."""

    def __init__(self, spec: BackboneSpec, base_width: int = 64, bilinear: bool = True):
        super().__init__()
        if base_width < 1:
            raise ConfigError(f"UNet base_width must be >= 1, got {base_width}.")
        self.spec = spec
        self.bilinear = bilinear
        w = unet_widths(base_width, bilinear)
        self.out_channels = w
        self.feature_indices = tuple(range(len(w)))
        self.inc = DoubleConv(3, w[0])
        self.down1 = Down(w[0], w[1])
        self.down2 = Down(w[1], w[2])
        self.down3 = Down(w[2], w[3])
        self.down4 = Down(w[3], w[4])

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def embed_dim(self) -> None:
        """A UNet has no token width; its levels have ``out_channels`` channels."""
        return None

    def pad_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right so height and width are multiples of 16 (four 2x poolings)."""
        p = self.patch_size
        pad_h, pad_w = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five feature maps at 1, 1/2, 1/4, 1/8 and 1/16 of the (padded) input size."""
        x1 = self.inc(self.pad_to_patch_multiple(x))
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        return [x1, x2, x3, x4, self.down4(x4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.features(x)


class UNetEncoder(nn.Module):
    """The encoder of a unet model: its contracting path as ``backbone``, no adapters, all trainable.

    Mirrors :class:`~pfmseg_engine.tuning.Encoder` (same attributes and output) without depending on
    what that class needs from a ViT.
    """

    cnn_adapter = None
    transformer_adapter = None

    def __init__(self, backbone: UNetBackbone):
        super().__init__()
        self.backbone = backbone
        backbone.requires_grad_(True)

    @property
    def grid_channels(self) -> list[int]:
        return list(self.backbone.out_channels)

    @property
    def skip_channels(self) -> list[int]:
        return []

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(grids=self.backbone.features(x), skips=[])


class UNetDecoder(nn.Module):
    """The expanding path and the 1x1 classifier, called like every head: ``(grids, skips, out_size)``."""

    def __init__(self, base_width: int, num_classes: int, bilinear: bool = True):
        super().__init__()
        w = unet_widths(base_width, bilinear=False)  # 64, 128, 256, 512, 1024
        factor = 2 if bilinear else 1
        self.up1 = Up(w[4], w[3] // factor, bilinear)
        self.up2 = Up(w[3], w[2] // factor, bilinear)
        self.up3 = Up(w[2], w[1] // factor, bilinear)
        self.up4 = Up(w[1], w[0], bilinear)
        self.outc = OutConv(w[0], num_classes)

    def forward(self, grids: Sequence[torch.Tensor], skips: Sequence[torch.Tensor] = (),
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        x1, x2, x3, x4, x5 = grids
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        logits = self.outc(self.up4(x, x1))
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits


def from_scratch_settings(config: ModelConfig) -> dict[str, Any]:
    """The fields a from-scratch baseline's config must hold (tuning becomes ``full``), or a
    :class:`ConfigError` naming the setting that does not apply and the fix."""
    name = config.backbone
    if config.weights:
        raise ConfigError(
            f"'{name}' is trained from scratch and has no backbone weights; remove weights / "
            f"'pfm_weights_path' (got '{config.weights}').",
            fix_with=("weights=None",),
        )
    if config.feature_indices is not None:
        raise ConfigError(
            f"'{name}' has no transformer blocks to tap; remove feature_indices (got {list(config.feature_indices)})."
        )
    if config.head != DEFAULT_HEAD:  # e.g. a protocol preset's head: the UNet decodes with its own path
        log.info("'%s' has its own decoder (the UNet's expanding path); head '%s' does not apply.", name, config.head)
    tuning = config.tuning
    if tuning.strategy == "frozen":  # the default (also a preset's): with nothing pretrained, all of it trains
        tuning = replace(tuning, strategy="full")
    if tuning.strategy != "full":
        raise ConfigError(
            f"'{name}' trains every weight from scratch, so its tuning strategy is 'full' (got "
            f"'{tuning.strategy}'); remove the strategy (finetune_mode.type) or set it to 'full'.",
            fix_with=("strategy='full'",),
        )
    return {"head": DEFAULT_HEAD, "tuning": tuning}


def build_unet_parts(config: ModelConfig) -> tuple[UNetEncoder, UNetDecoder]:
    """The seed's UNet (``tiny``: base width 8) as the encoder and head of a
    :class:`~pfmseg_engine.model.SegmentationModel`; every weight trains."""
    spec = get_spec(config.backbone)
    settings = spec.build_kwargs(config.tiny)
    base_width, bilinear = int(settings["base_width"]), bool(settings["bilinear"])
    if not STRATEGIES[config.tuning.strategy].backbone_trains:  # from_scratch_settings makes it 'full'
        raise ConfigError(f"'{spec.name}' trains every weight; its tuning strategy must be 'full'.")
    encoder = UNetEncoder(UNetBackbone(spec, base_width, bilinear))
    head = UNetDecoder(base_width, config.num_classes, bilinear)
    return encoder, head
