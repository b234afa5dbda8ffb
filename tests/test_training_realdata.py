"""Proof on real H&E: a tiny random backbone + CNN adapter learns MoNuSeg nuclei in a few hundred steps."""

from __future__ import annotations

import numpy as np
import pytest

from pfmseg_engine.data import SegmentationDataset, load_seed_json
from pfmseg_engine.metrics import ConfusionMeter
from pfmseg_engine.training import FunctionCallback, config_from_dict, train_from_config

STEPS = 300



def majority_baseline(json_file) -> tuple[int, float]:
    """Mean Dice on the validation split of always predicting the training set's majority class."""
    dataset = load_seed_json(json_file)
    train = SegmentationDataset(dataset.split("train"), dataset.num_classes, cache=False)
    counts = sum(np.bincount(train.load(i)[1].ravel(), minlength=256)[: dataset.num_classes]
                 for i in range(train.num_images()))
    majority = int(np.argmax(counts))
    val = SegmentationDataset(dataset.split("val"), dataset.num_classes, cache=False)
    meter = ConfusionMeter(dataset.num_classes)
    for i in range(val.num_images()):
        mask = val.load(i)[1]
        meter.update(np.full_like(mask, majority), mask)
    return majority, meter.compute()["Mean_Dice"]


@pytest.mark.slow
@pytest.mark.realdata
def test_cnn_adapter_learns_monuseg_nuclei(shared_data, tmp_path):
    json_file = shared_data / "monuseg" / "dataset.json"
    majority, baseline = majority_baseline(json_file)
    assert majority == 0 and 0.3 < baseline < 0.5
    cfg = config_from_dict({
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seed": 0},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"}},
        "training": {
            "batch_size": 4, "epochs": 3, "samples_per_epoch": STEPS * 4 // 3, "learning_rate": 0.002,
            "optimizer": {"type": "AdamW"}, "loss": {"type": "ce_dice"}, "scheduler": {"warmup_epochs": 0.25},
            # native-resolution 64 px crops keep the 40x magnification that validation sees
            "augmentation": {"RandomResizedCropSize": 64, "scale": None,
                             "transforms": {"elastic": {"p": 0}, "affine": {"p": 0}, "cutout": {"p": 0}}},
        },
        "validation": {"eval_interval": 3, "batch_size": 4, "augmentation": {"ResizedSize": 256}},
        "logging": {"log_dir": str(tmp_path), "experiment_name": "monuseg"},
        "visualization": {"save_interval": 3, "num_vis_samples": 1},
    })
    steps = []
    result = train_from_config(cfg, callbacks=[FunctionCallback(on_step=lambda info: steps.append(info.loss))])
    assert len(steps) == STEPS
    final = result.history[-1]
    # whole 1000x1000 validation tiles, scored at native resolution
    assert final["Mean_Dice"] > baseline + 0.2, (final["Mean_Dice"], baseline)
    assert final["Dice_Class_1"] > 0.5  # nuclei are found, not just background
    assert np.mean(steps[-50:]) < np.mean(steps[:50])
    assert result.best_checkpoint.is_file()


@pytest.mark.slow
@pytest.mark.realdata
def test_densebench_preset_with_the_resnet_adapter_learns_monuseg_nuclei(shared_data, tmp_path):
    """The seed framework's model (cup head + ResNetV2 CNN adapter, its training defaults and its resized
    validation) from one YAML line, on real H&E: clearly better than always predicting background."""
    json_file = shared_data / "monuseg" / "dataset.json"
    _, baseline = majority_baseline(json_file)
    cfg = config_from_dict({
        "protocol": "densebench",
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seed": 0},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"}},
        # shortened for a CPU: 100 steps of 4 crops at 128 px, learning rate raised to match
        "training": {"batch_size": 4, "epochs": 2, "samples_per_epoch": 200, "learning_rate": 0.002,
                     "augmentation": {"RandomResizedCropSize": 128}, "use_amp": False},
        "validation": {"eval_interval": 2, "batch_size": 4},
        "logging": {"log_dir": str(tmp_path), "experiment_name": "densebench"},
        "visualization": {"save_interval": 100, "num_vis_samples": 0},
    })
    model_config = cfg.model_config()
    assert (model_config.head, model_config.tuning.strategy) == ("cup", "cnn_adapter")
    assert cfg.validation.resize_or_windowslide == "resize"
    result = train_from_config(cfg)
    final = result.history[-1]
    assert final["Mean_Dice"] > baseline + 0.2, (final["Mean_Dice"], baseline)
    assert final["Dice_Class_1"] > 0.5


@pytest.mark.slow
@pytest.mark.realdata
def test_frozen_light_decoder_preset_learns_monuseg_nuclei_and_reports_the_test_split(shared_data, tmp_path):
    """The frozen-encoder benchmark's protocol (frozen encoder, light decoder on the normalised output, Dice
    selection, a test-set summary over seeds) from one YAML line, on real H&E, shortened for a CPU: one seed
    of a tiny random encoder, whose frozen tokens still carry the stain colour the decoder learns from."""
    json_file = shared_data / "monuseg" / "dataset.json"
    _, baseline = majority_baseline(json_file)
    cfg = config_from_dict({
        "protocol": "frozen_light_decoder",
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seeds": [0]},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True},
        "training": {"batch_size": 4, "epochs": 1, "samples_per_epoch": 160, "learning_rate": 0.002,
                     "augmentation": {"RandomResizedCropSize": 128}, "scheduler": {"T_0": 1}},
        # whole 1000x1000 validation and test tiles in 256 px windows, scored at native resolution
        "validation": {"eval_interval": 1, "batch_size": 8, "augmentation": {"ResizedSize": 256}},
        "logging": {"log_dir": str(tmp_path), "experiment_name": "frozen"},
        "visualization": {"save_interval": 100, "num_vis_samples": 0},
    })
    model_config = cfg.model_config()
    assert (model_config.head, model_config.tuning.strategy, model_config.light_head_final_norm) == (
        "light", "frozen", True)
    assert cfg.validation.monitor == "Mean_Dice"
    result = train_from_config(cfg)
    assert result.split == "test" and sorted(result.scores) == [0]
    assert result.scores[0]["Mean_Dice"] > baseline + 0.15, (result.scores[0]["Mean_Dice"], baseline)
    assert result.summary["Mean_Dice"]["n"] == 1
