"""Checkpoints record the scale their model was trained at, and slide inference warns when it runs elsewhere.

The scale is µm of tissue per model pixel: the training images' µm/px times how many source pixels the
training crop squeezes into one model pixel (the "shrink"). Area-scale crops (the seed's RandomResizedCrop,
``protocol: densebench``) shrink tiles several times, so such a model must be run over slides at several
times the tiles' µm/px.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pfmseg_engine.backbones.backbone import RandomWeightsWarning
from pfmseg_engine.checkpoint import (
    checkpoint_training_scale,
    load_checkpoint,
    read_checkpoint,
    read_training_scale,
    save_checkpoint,
)
from pfmseg_engine.cli import main
from pfmseg_engine.data import SegmentationDataset, load_seed_json
from pfmseg_engine.data.augment import crop_shrink
from pfmseg_engine.data.sparse import SparsePatchDataset
from pfmseg_engine.errors import TrainingScaleWarning
from pfmseg_engine.inference.plan import ModelInfo, SlideInferenceConfig, plan_slide
from pfmseg_engine.model import ModelConfig, build_model
from pfmseg_engine.slides import open_slide
from pfmseg_engine.training import config_from_dict, train_from_config
from pfmseg_engine.training.runner import build_augmentation
from pfmseg_engine.training.slides import config_for_classes
from pfmseg_engine.training.trainer import training_scale_for
from pfmseg_engine.training_scale import (
    ScaleMismatch,
    TrainingScale,
    attach_training_scale,
    check_training_scale,
    training_scale_of,
    warn_training_scale,
)
from testdata import CMU

# Hand derivation of the seed's crop on a 1024 x 1024 tile cut to 224 (torchvision's RandomResizedCrop,
# scale (0.5, 1.0), ratio (0.75, 1.33)), rounding ignored:
#   a draw takes the area share s ~ U(0.5, 1) and aspect r with ln r ~ U(ln 0.75, ln 1.33), box
#   1024√(s r) x 1024√(s / r); it fits the tile iff s r <= 1 and s / r <= 1, i.e. s <= m = exp(-|ln r|).
#   E[m] = ((1 - 0.75) + (1 - 1/1.33)) / (ln 1.33 - ln 0.75) = 0.498120 / 0.572861 = 0.869531, so a draw
#   fits with p = P(s <= m) = (E[m] - 0.5) / 0.5 = 0.739061 (10 misses in a row, the centre-crop fallback:
#   0.26^10 = 1.5e-6, negligible). Every s <= 0.75 fits (m >= 0.75), so the accepted s is uniform on
#   [0.5, 0.75] with mass 0.5 per unit of U(0.5, 1), more than half of p: the median accepted share is
#   0.5 + (p / 2) * 0.5 = 0.684765. The box area is 1024² s, so a model pixel spans √(1024² s) / 224 source
#   pixels per side: median 1024 √0.684765 / 224 = 3.78288 (3.23 at s = 0.5, 4.57 at s = 1).
DENSEBENCH_1024_SHRINK = 1024 * math.sqrt(0.5 + (2 * ((0.25 + (1 - 1 / 1.33)) / math.log(1.33 / 0.75)) - 1) / 4) / 224
CLASSES = ("background", "tissue")


def write_tiles(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A seed JSON dataset of flat tiles of the given (height, width) (two classes, left / right halves)."""
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    entries = []
    for i, (height, width) in enumerate(sizes):
        image = np.full((height, width, 3), 40 * (i + 1), dtype=np.uint8)
        image[:, width // 2:] = 200
        mask = (np.arange(width)[None, :] >= width // 2).repeat(height, 0).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "msk" / f"{i}.png")
        entries.append({"image_path": f"img/{i}.png", "mask_path": f"msk/{i}.png"})
    data = {"num_classes": 2, "class_names": list(CLASSES),
            "data": {"train": entries[:-1], "val": entries[-1:]}}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def train_config(json_file: Path, crop: int, augmentation: dict, mpp: float | None, tmp_path: Path, **validation):
    return config_from_dict({
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seed": 0},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "mpp": mpp, "finetune_mode": {"type": "frozen"},
                  "head": "fast"},
        "training": {"batch_size": 2, "epochs": 1, "augmentation": {"RandomResizedCropSize": crop, **augmentation}},
        "validation": {"augmentation": {"ResizedSize": crop}, **validation},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "run", "plot_history": False},
        "visualization": {"num_vis_samples": 0},
    })


def train_split(config) -> SegmentationDataset:
    seed_json = load_seed_json(config.dataset.json_file)
    return SegmentationDataset(seed_json.split("train"), num_classes=2, transform=build_augmentation(config))


def measured_area_crop_median(size: tuple[int, int], crop: int, scale, ratio=(0.75, 1.33), draws=4000) -> float:
    """Median source pixels per model pixel of torchvision's own RandomResizedCrop parameter draws."""
    transform = v2.RandomResizedCrop(crop, scale=scale, ratio=ratio)
    image = torch.empty(3, *size)
    torch.manual_seed(0)
    shrinks = []
    for _ in range(draws):
        box = transform.make_params([image])
        shrinks.append(math.sqrt(box["height"] * box["width"]) / crop)
    return float(np.median(shrinks))


def small_model(scale: TrainingScale | None = None, mpp: float | None = 0.5):
    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, class_names=CLASSES, input_size=64,
                         mpp=mpp)
    with warnings.catch_warnings():  # a random-weight stand-in is the point here
        warnings.simplefilter("ignore", RandomWeightsWarning)
        model = build_model(config)
    attach_training_scale(model, scale)
    return model


# --- (a) no area-scale crop ----------------------------------------------------------------------------
def test_native_resolution_crops_train_at_the_images_mpp(tmp_path):
    json_file = write_tiles(tmp_path / "data", [(96, 96), (96, 96), (96, 96)])
    plain = train_config(json_file, 64, {"zoom": None}, 0.5, tmp_path)
    scale = training_scale_for(plain, train_split(plain))
    assert (scale.shrink, scale.shrink_range, scale.crop, scale.mpp) == (1.0, (1.0, 1.0), "native", 0.5)
    # the default zoom jitter is log-uniform in [0.8, 1.25]: its median zoom is √(0.8 · 1.25) = 1, native
    jitter = train_config(json_file, 64, {}, 0.5, tmp_path)
    scale = training_scale_for(jitter, train_split(jitter))
    assert scale.crop == "zoom" and scale.mpp == pytest.approx(0.5)
    assert scale.shrink_range == (round(64 / 1.25) / 64, round(64 / 0.8) / 64)  # 51 / 64 and 80 / 64
    # a zoom range off 1: median zoom √0.5, so round(64 / 0.7071) = 91 source pixels become 64
    zoomed = train_config(json_file, 64, {"zoom": [0.5, 1.0]}, 0.5, tmp_path)
    assert training_scale_for(zoomed, train_split(zoomed)).mpp == pytest.approx(0.5 * 91 / 64)


# --- (b) the seed's area-scale crop ----------------------------------------------------------------------
def test_densebench_crop_on_1024_tiles_matches_the_hand_derivation_and_torchvision():
    shrink = crop_shrink(224, scale=(0.5, 1.0), ratio=(0.75, 1.33), image_sizes=[(1024, 1024)])
    assert round(DENSEBENCH_1024_SHRINK, 5) == 3.78288
    assert shrink.median == pytest.approx(DENSEBENCH_1024_SHRINK, rel=1e-3)
    assert (shrink.low, shrink.high) == (pytest.approx(1024 * math.sqrt(0.5) / 224, rel=2e-3), 1024 / 224)
    assert shrink.median == pytest.approx(measured_area_crop_median((1024, 1024), 224, (0.5, 1.0)), rel=5e-3)
    # the naive √(mean share) would say 3.96: redrawn boxes that do not fit pull the median down
    assert shrink.median < 0.96 * 1024 * math.sqrt(0.75) / 224


def test_area_crop_of_the_whole_image_is_a_plain_resize():
    # scale [1, 1]: every box of another aspect sticks out of a square tile, so after 10 misses torchvision
    # takes the centre crop, the whole tile: 1024 px seen as 224
    shrink = crop_shrink(224, scale=(1.0, 1.0), image_sizes=[(1024, 1024)])
    assert shrink.median == pytest.approx(1024 / 224, rel=1e-3)
    assert shrink.median == pytest.approx(measured_area_crop_median((1024, 1024), 224, (1.0, 1.0), draws=500), rel=1e-3)


def test_densebench_preset_on_1024_tiles_records_the_effective_mpp(tmp_path):
    json_file = write_tiles(tmp_path / "data", [(1024, 1024), (1024, 1024), (300, 300)])
    config = config_from_dict({"protocol": "densebench", "dataset": {"json_file": str(json_file)},
                               "model": {"pfm_name": "kaiko-vits16", "tiny": True, "mpp": 0.5}})
    scale = training_scale_for(config, train_split(config))
    assert scale.crop == "area" and scale.data_mpp == 0.5
    assert scale.mpp == pytest.approx(0.5 * DENSEBENCH_1024_SHRINK, rel=1e-3)  # 1.89 µm per model pixel


def test_images_of_several_sizes_pool_their_crops():
    one = crop_shrink(224, scale=(0.5, 1.0), image_sizes=[(1024, 1024)]).median
    two = crop_shrink(224, scale=(0.5, 1.0), image_sizes=[(512, 512)]).median
    pooled = crop_shrink(224, scale=(0.5, 1.0), image_sizes=[(1024, 1024), (512, 512)])
    assert two < pooled.median < one and pooled.low == pytest.approx(512 * math.sqrt(0.5) / 224, rel=5e-3)


# --- (c) unknown mpp; slide training -----------------------------------------------------------------------
def test_unknown_mpp_records_the_shrink_alone(tmp_path):
    json_file = write_tiles(tmp_path / "data", [(1024, 1024), (1024, 1024), (300, 300)])
    config = config_from_dict({"protocol": "densebench", "dataset": {"json_file": str(json_file)},
                               "model": {"pfm_name": "kaiko-vits16", "tiny": True}})
    scale = training_scale_for(config, train_split(config))
    assert scale.data_mpp is None and scale.mpp is None
    assert scale.shrink == pytest.approx(DENSEBENCH_1024_SHRINK, rel=1e-3)
    assert TrainingScale.from_dict(scale.to_dict()) == scale and scale.to_dict()["mpp"] is None
    assert check_training_scale(scale, 0.25) is None  # nothing to compare a resolution with


def test_slide_training_records_its_reading_resolution():
    class Table:
        names, colours = CLASSES, [(0, 0, 0), (255, 0, 0)]

    config = config_for_classes(config_from_dict({"model": {"pfm_name": "kaiko-vits16", "tiny": True}},
                                                 check_dataset=False), Table(), 1.0)
    image = np.zeros((200, 200, 3), np.uint8)
    labels = np.ones((200, 200), np.uint8)
    patches = SparsePatchDataset([image], [labels], patch_size=64, num_classes=2,
                                 zoom=config.training.augmentation.zoom)
    scale = training_scale_for(config, patches)
    assert scale.mpp == pytest.approx(1.0) and scale.crop == "zoom"
    native = SparsePatchDataset([image], [labels], patch_size=64, num_classes=2)
    assert training_scale_for(config, native).shrink_range == (1.0, 1.0)


# --- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_the_scale_and_old_checkpoints_load_as_unknown(tmp_path):
    scale = TrainingScale(shrink=3.78, data_mpp=0.25, shrink_range=(3.23, 4.57), crop="area")
    path = save_checkpoint(tmp_path / "model.pt", small_model(scale))
    assert read_checkpoint(path)["metadata"]["training_scale"]["mpp"] == pytest.approx(0.945)
    loaded = load_checkpoint(path)
    assert training_scale_of(loaded) == scale and read_training_scale(path) == scale
    resaved = save_checkpoint(tmp_path / "again.pt", loaded)  # e.g. napari's "Save model": kept
    assert load_checkpoint(resaved).training_scale == scale

    old = torch.load(path, weights_only=True)
    del old["metadata"]["training_scale"]  # as written before the scale was recorded
    torch.save(old, tmp_path / "old.pt")
    assert checkpoint_training_scale(read_checkpoint(tmp_path / "old.pt")) is None
    assert load_checkpoint(tmp_path / "old.pt").training_scale is None
    assert read_training_scale(tmp_path / "old.pt") is None


def test_training_writes_the_scale_into_its_checkpoints(tmp_path):
    json_file = write_tiles(tmp_path / "data", [(128, 128), (128, 128), (128, 128)])
    config = train_config(json_file, 32, {"scale": [0.5, 1.0], "zoom": None}, 0.25, tmp_path,
                          resize_or_windowslide="resize")
    result = train_from_config(config)
    expected = crop_shrink(32, scale=(0.5, 1.0), image_sizes=[(128, 128)])
    for path in (result.best_checkpoint, result.last_checkpoint):
        recorded = TrainingScale.from_dict(read_checkpoint(path)["metadata"]["training_scale"])
        assert recorded.crop == "area" and recorded.shrink == pytest.approx(expected.median)
        # 128 √0.6848 / 32 = 3.31 by the derivation above (rounding 32-pixel boxes moves it a little)
        assert recorded.mpp == pytest.approx(0.25 * 128 * math.sqrt(0.684765) / 32, rel=1e-2)
    assert load_checkpoint(result.best_checkpoint).training_scale.mpp == pytest.approx(0.25 * expected.median)


# --- the check ----------------------------------------------------------------------------------------------
def test_check_warns_beyond_25_percent_either_way():
    scale = TrainingScale(shrink=1.0, data_mpp=0.5)
    for fine in (0.5, 0.6, 0.41, 0.625):  # within a factor 1.25 either way
        assert check_training_scale(scale, fine) is None
    for off in (0.65, 0.39, 2.0):
        mismatch = check_training_scale(scale, off)
        assert isinstance(mismatch, ScaleMismatch) and mismatch.suggested_mpp == 0.5
    assert check_training_scale(None, 0.5) is None  # old checkpoints: nothing to check

    seed = TrainingScale(shrink=DENSEBENCH_1024_SHRINK, data_mpp=0.25, crop="area")
    mismatch = check_training_scale(seed, 0.25)
    assert mismatch.suggested_mpp == 0.946 and mismatch.factor == pytest.approx(DENSEBENCH_1024_SHRINK)
    assert "0.946 µm per model pixel" in mismatch.summary() and "3.78x larger" in mismatch.summary()
    with pytest.warns(TrainingScaleWarning, match=r"SlideInferenceConfig\(target_mpp=0.946\)") as caught:
        warn_training_scale(seed, 0.25)
    assert caught[0].message.mismatch == mismatch
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingScaleWarning)
        warn_training_scale(seed, 0.9)


def test_planning_a_slide_warns_library_users():
    info = ModelInfo(2, 16, CLASSES, 64, 0.5, TrainingScale(shrink=4.0, data_mpp=0.5, crop="area"))
    with open_slide(CMU) as slide:
        with pytest.warns(TrainingScaleWarning, match=r"target_mpp=2\)"):
            plan = plan_slide(slide, info, SlideInferenceConfig(target_mpp=1.0))
        assert plan.mpp == pytest.approx(1.0, rel=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("error", TrainingScaleWarning)
            plan_slide(slide, info, SlideInferenceConfig(target_mpp=2.0))


# --- front ends ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shrunk_checkpoint(tmp_path_factory) -> Path:
    """A tiny model whose training saw 2 µm/px images shrunk 3x: 6 µm per model pixel."""
    scale = TrainingScale(shrink=3.0, data_mpp=2.0, shrink_range=(2.5, 3.6), crop="area")
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", small_model(scale, mpp=2.0))


def test_cli_infer_names_the_matching_target_mpp(shrunk_checkpoint, tmp_path, capsys):
    code = main(["infer", "--slide", str(CMU), "--checkpoint", str(shrunk_checkpoint), "--output_dir",
                 str(tmp_path), "--target_mpp", "4.0", "--device", "cpu"])
    assert code == 0
    err = capsys.readouterr().err
    assert "--target_mpp 6 to predict at the training scale" in err and "6 µm per model pixel" in err
    assert "SlideInferenceConfig" not in err  # the engine's Python wording is not repeated
    assert err.count("--target_mpp 6") == 1


def test_cli_dry_run_warns_only_beyond_the_tolerance(shrunk_checkpoint, tmp_path, capsys):
    args = ["infer", "--slide", str(CMU), "--checkpoint", str(shrunk_checkpoint), "--output_dir", str(tmp_path),
            "--dry_run", "--target_mpp"]
    assert main([*args, "5.5"]) == 0
    assert "--target_mpp" not in capsys.readouterr().err
    assert main([*args, "1.0"]) == 0  # the model's default (its images' 2 µm/px) would be 3x off too
    assert "--target_mpp 6" in capsys.readouterr().err


def test_napari_words_name_the_widget_setting_not_a_flag():
    from napari_pfmseg._prediction import RESOLUTION_LABEL, scale_warning_text

    mismatch = check_training_scale(TrainingScale(shrink=DENSEBENCH_1024_SHRINK, data_mpp=0.25, crop="area"), 0.25)
    text = scale_warning_text(mismatch)
    assert RESOLUTION_LABEL in text and "Predict widget" in text and "0.946" in text
    assert "--" not in text and "target_mpp" not in text


def test_napari_prediction_notifies_once_in_widget_words(monkeypatch, tmp_path):
    from psygnal import Signal

    import napari_pfmseg._prediction as prediction
    from pfmseg_engine.jobs import PredictionSettings, SlidePrediction

    class Session:
        predict_requested = Signal(str)

    info = ModelInfo(2, 16, CLASSES, 64, 2.0, TrainingScale(shrink=3.0, data_mpp=2.0, crop="area"))

    def target(target_mpp: float) -> prediction.Target:
        """A planned target as the controller makes it: the job, and its plan made with the engine's
        Python-worded warning silenced (the controller words it for the widget)."""
        job = SlidePrediction(info, CMU, tmp_path, PredictionSettings(target_mpp=target_mpp), new_name=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrainingScaleWarning)
            return prediction.Target(job, job.plan())

    shown: list[str] = []
    monkeypatch.setattr(prediction, "notify_warning", shown.append)
    controller = prediction.PredictionController(Session())
    controller._warn_about_scale([target(2.0), target(2.0)])  # 3x finer than training: one notice per run
    assert shown == [controller.scale_warning] and f"'{prediction.RESOLUTION_LABEL}'" in shown[0]
    assert "to 6 to predict at the training scale" in shown[0]
    controller._warn_about_scale([target(6.5)])
    assert controller.scale_warning is None and len(shown) == 1
