"""Training crops see the magnification that validation and inference use.

Magnification is measured, not read from parameters: images carry their own pixel coordinates as
colour ramps (red = x, green = y), so the Jacobian of the coordinates in whatever the model receives
gives the source pixels per model pixel, whatever mix of crops, zooms, flips and warps produced it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from pfmseg_engine.data import SparsePatchDataset
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training.config import config_from_dict
from pfmseg_engine.training.runner import build_augmentation
from pfmseg_engine.training.validation import predict_probabilities

GEOMETRIC = ("hflip", "vflip", "rot90", "transpose", "affine")  # kept; photometric ones would blur the ramps


def ramp_image(height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32: red = x / (W - 1), green = y / (H - 1)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([x / (width - 1), y / (height - 1), np.full_like(x, 0.5)], axis=-1)


def source_pixels_per_model_pixel(image: torch.Tensor, valid: torch.Tensor, height: int, width: int) -> float:
    """sqrt(|det J|) of source coordinates per model pixel, median over valid interior pixels."""
    xs = image[0].double() * (width - 1)
    ys = image[1].double() * (height - 1)
    dx_u, dy_u = xs[:-1, 1:] - xs[:-1, :-1], ys[:-1, 1:] - ys[:-1, :-1]
    dx_v, dy_v = xs[1:, :-1] - xs[:-1, :-1], ys[1:, :-1] - ys[:-1, :-1]
    det = (dx_u * dy_v - dx_v * dy_u).abs()
    ok = valid[:-1, :-1] & valid[1:, :-1] & valid[:-1, 1:] & valid[1:, 1:]
    return float(det[ok].median().sqrt())


def geometric_only(config_data: dict) -> dict:
    from pfmseg_engine.data.augment import TRANSFORMS

    transforms = {name: ({} if name in GEOMETRIC else {"p": 0.0}) for name in TRANSFORMS}
    config_data.setdefault("training", {}).setdefault("augmentation", {})["transforms"] = transforms
    return config_data


def training_scales(config, size: int = 1000, samples: int = 200) -> np.ndarray:
    """Source pixels per model pixel of ``samples`` training crops of a ``size`` x ``size`` image."""
    augment = build_augmentation(config)
    image = torch.from_numpy(ramp_image(size, size)).permute(2, 0, 1).contiguous()
    mask = torch.zeros(size, size, dtype=torch.long)
    scales = []
    for seed in range(samples):
        out, labels = augment(image, mask, seed=seed)
        scales.append(source_pixels_per_model_pixel(out, labels != 255, size, size))
    return np.array(scales)


class Recorder(nn.Module):
    """Records what the model is given; predicts nothing in particular."""

    num_classes, patch_size = 2, 16

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.extend(x.detach().cpu())
        return torch.zeros(x.shape[0], 2, *x.shape[-2:])


def validation_scales(config, size: int = 1000) -> list[float]:
    """Source pixels per model pixel of every window validation feeds the model for a ``size`` px image."""
    model = Recorder()
    image = ramp_image(size, size)
    predict_probabilities(model, image, window=config.window_size, mode=config.validation.resize_or_windowslide,
                          overlap=config.validation.overlap, batch_size=4, device="cpu")
    full = torch.ones(config.window_size, config.window_size, dtype=torch.bool)
    return [source_pixels_per_model_pixel(x, full, size, size) for x in model.inputs]


def test_default_training_crops_match_native_validation_windows():
    config = config_from_dict(geometric_only({"dataset": {"num_classes": 2}}), check_dataset=False)
    assert config.training.augmentation.scale is None and config.training.augmentation.zoom == (0.8, 1.25)
    train = training_scales(config)
    val = validation_scales(config)
    assert val and all(v == pytest.approx(1.0, abs=1e-3) for v in val)  # windowslide: native resolution
    assert train.mean() == pytest.approx(1.0, rel=0.10)  # the same pixels per model pixel, within 10 %
    assert train.min() > 0.78 and train.max() < 1.30  # mild zoom jitter, nothing like the old 2.5-4.5x
    assert train.std() > 0.05  # jitter is there


@pytest.mark.parametrize("crop", [224, 256])
def test_densebench_training_crops_and_resized_validation_see_the_same_tissue_scale(crop):
    config = config_from_dict(geometric_only({"protocol": "densebench", "dataset": {"num_classes": 2},
                                              "training": {"augmentation": {"RandomResizedCropSize": crop}}}),
                              check_dataset=False)
    assert config.validation.resize_or_windowslide == "resize" and config.window_size == crop
    train = training_scales(config, samples=150)
    (val,) = validation_scales(config)
    assert val == pytest.approx(1000 / crop, rel=0.01)  # the whole 1000 px image shrunk to the window
    # The seed's crop covers 50-100 % of the area, so its side is sqrt(0.5..1) of the image and training
    # sees 0.71-1.0x the pixels per model pixel that validation sees (mean sqrt(s) = 0.86 for s ~ U(0.5, 1);
    # 0.83 measured, as RandomResizedCrop redraws crops that do not fit): a 15 % offset inside the seed's own
    # protocol, which no +-10 % test can pass while staying faithful (docs/faithfulness.md). What this checks:
    # both shrink the image the same way and validation lies inside the training range, not 3.9-4.5x off it.
    ratio = train / val
    assert ratio.min() > 0.68 and ratio.max() < 1.02
    assert ratio.mean() == pytest.approx(0.85, abs=0.05)
    # without the preset's resize validation the same crops would be 3.9-4.5x off native windows
    assert train.mean() > 3.0


def test_sparse_annotation_patches_use_the_same_zoom():
    image = ramp_image(600, 600)  # float in [0, 1], as napari float layers
    labels = np.ones((600, 600), dtype=np.uint8)
    dataset = SparsePatchDataset([image], [labels], patch_size=64, num_classes=1, samples_per_epoch=120,
                                 zoom=(0.8, 1.25))
    scales = []
    for i in range(len(dataset)):
        item = dataset[i]
        scales.append(source_pixels_per_model_pixel(item["image"], item["label"] != 255, 600, 600))
    assert np.mean(scales) == pytest.approx(1.0, rel=0.10) and np.std(scales) > 0.05
    native = SparsePatchDataset([image], [labels], patch_size=64, num_classes=1, samples_per_epoch=4)[0]
    assert native["image"].shape == (3, 64, 64)
    assert source_pixels_per_model_pixel(native["image"], native["label"] != 255, 600, 600) == pytest.approx(1.0)


def test_area_scale_crops_need_resize_validation():
    with pytest.raises(ConfigError, match=r"training.augmentation.scale.*native resolution.*resize_or_windowslide"):
        config_from_dict({"training": {"augmentation": {"scale": [0.5, 1.0], "zoom": None}}}, check_dataset=False)
    with pytest.raises(ConfigError, match="set one of them to null"):
        config_from_dict({"training": {"augmentation": {"scale": [0.5, 1.0]}},
                          "validation": {"resize_or_windowslide": "resize"}}, check_dataset=False)
    ok = config_from_dict({"training": {"augmentation": {"scale": [0.5, 1.0], "zoom": None}},
                           "validation": {"resize_or_windowslide": "resize"}}, check_dataset=False)
    assert ok.training.augmentation.scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="zoom"):
        config_from_dict({"training": {"augmentation": {"zoom": [1.2, 0.8]}}}, check_dataset=False)


def test_resize_validation_with_native_crops_warns(caplog):
    with caplog.at_level(logging.WARNING):
        config_from_dict({"validation": {"resize_or_windowslide": "resize"}}, check_dataset=False)
    assert "another magnification" in caplog.text
