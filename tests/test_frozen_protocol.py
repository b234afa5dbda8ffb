"""The frozen-encoder benchmark preset: its settings, test-split reporting over seeds, the light head's input."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pfmseg_engine.checkpoint import atomic_torch_save, load_checkpoint, load_into, read_checkpoint, save_checkpoint
from pfmseg_engine.errors import CheckpointError
from pfmseg_engine.metrics import MONITOR_METRICS
from pfmseg_engine.model import ModelConfig, build_model
from pfmseg_engine.training import config_from_dict, train_from_config


def make_dataset(root, *, labelled_test: bool = True):
    """Random tiles, class = red channel > 127; train, val and test hold different images."""
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    splits = {"train": 4, "val": 2, "test": 2}
    data = {}
    for split, count in splits.items():
        entries = []
        for i in range(count):
            image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "img" / f"{split}{i}.png")
            Image.fromarray((image[..., 0] > 127).astype(np.uint8), mode="L").save(root / "msk" / f"{split}{i}.png")
            mask = f"msk/{split}{i}.png" if split != "test" or labelled_test else None
            entries.append({"image_path": f"img/{split}{i}.png", "mask_path": mask})
        data[split] = entries
    (root / "dataset.json").write_text(json.dumps({"num_classes": 2, "class_names": ["dark", "red"], "data": data}))
    return root / "dataset.json"


def preset_config(tmp_path, json_file, seeds):
    return config_from_dict({
        "protocol": "frozen_light_decoder",
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seeds": seeds},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True},
        "training": {"epochs": 2, "batch_size": 2, "augmentation": {"RandomResizedCropSize": 32}},
        "validation": {"eval_interval": 1},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "flt", "plot_history": False},
        "visualization": {"save_predictions": False},
    })


# --- the preset -----------------------------------------------------------------------------------------
def test_preset_is_the_papers_setup():
    config = config_from_dict({"protocol": "frozen_light_decoder", "dataset": {"num_classes": 2}},
                              check_dataset=False)
    model = config.model_config()
    assert config.system.seeds == list(range(10))
    assert config.crop_size == config.window_size == model.input_size == 512
    assert config.validation.monitor == "Mean_Dice" and "Mean_Dice" in MONITOR_METRICS
    assert model.head == "light" and model.light_head_final_norm and model.tuning.strategy == "frozen"
    plain = config_from_dict({"dataset": {"num_classes": 2}, "model": {"head": "light"}}, check_dataset=False)
    assert not plain.model_config().light_head_final_norm  # outside the preset the head keeps its old input


# --- what the light head reads ------------------------------------------------------------------------------
def head_input(model, x):
    """The last grid the head receives for RGB input ``x``."""
    seen = []
    handle = model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0][-1].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def timm_tokens_to_grid(tokens, prefix, side):
    patches = tokens[:, prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


@pytest.mark.parametrize("head", ["light", "cup"])
def test_head_reads_the_encoders_normalised_output(head):
    model = build_model(ModelConfig("kaiko-vits16", 2, tiny=True, head=head,
                                    light_head_final_norm=head == "light")).eval()
    vit = model.encoder.backbone.vit
    assert not isinstance(vit.norm, torch.nn.Identity)
    x = torch.rand(2, 3, 32, 32)
    normalised = (x - model.mean) / model.std
    with torch.no_grad():
        expected = timm_tokens_to_grid(vit.forward_features(normalised), vit.num_prefix_tokens, 2)
        raw = vit.forward_intermediates(normalised, indices=[len(vit.blocks) - 1], norm=False,
                                        intermediates_only=True)[-1]
    grid = head_input(model, x)
    torch.testing.assert_close(grid, expected)
    assert not torch.allclose(grid, raw, atol=1e-3)  # the final norm changes what the head sees


def test_light_head_without_final_norm_reads_the_raw_last_block():
    model = build_model(ModelConfig("kaiko-vits16", 2, tiny=True, head="light")).eval()
    vit = model.encoder.backbone.vit
    assert isinstance(vit.norm, torch.nn.Identity) and not model.encoder.backbone.keeps_final_norm
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        raw = vit.forward_intermediates((x - model.mean) / model.std, indices=[len(vit.blocks) - 1], norm=False,
                                        intermediates_only=True)[-1]
    torch.testing.assert_close(head_input(model, x), raw)


def test_checkpoints_record_the_option_and_older_ones_load_without_it(tmp_path):
    config = ModelConfig("kaiko-vits16", 2, tiny=True, head="light", light_head_final_norm=True)
    model = build_model(config).eval()
    path = save_checkpoint(tmp_path / "norm.pt", model)
    assert read_checkpoint(path)["config"]["light_head_final_norm"] is True
    again = load_checkpoint(path)
    x = torch.rand(1, 3, 32, 32)
    assert again.encoder.backbone.keeps_final_norm
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    # a checkpoint written before the option existed has no key: it rebuilds the head's old input
    payload = torch.load(path, weights_only=True)
    del payload["config"]["light_head_final_norm"]
    atomic_torch_save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert not old.config.light_head_final_norm and not old.encoder.backbone.keeps_final_norm
    with pytest.raises(CheckpointError, match="light_head_final_norm"):
        load_into(old, read_checkpoint(path))


# --- repeated runs report the test split ------------------------------------------------------------------------
def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_seeds_summary_reports_each_seeds_selected_checkpoint_on_test(tmp_path):
    from pfmseg_engine.cli import main

    json_file = make_dataset(tmp_path / "data")
    result = train_from_config(preset_config(tmp_path, json_file, [0, 1]))
    assert result.status == "completed" and result.split == "test"
    summary = json.loads(result.summary_json.read_text())
    assert summary["split"] == "test" and summary["warning"] is None and summary["monitor"] == "Mean_Dice"
    independent = {}
    for seed in (0, 1):
        run = result.runs[seed]
        entry = summary["runs"][str(seed)]
        assert entry["checkpoint"] == str(run.output_dir / "checkpoints" / "best.pt")
        assert entry["selection"] == {"split": "val", "monitor": "Mean_Dice", "epoch": run.best_epoch,
                                      "value": run.best_metric}
        out = tmp_path / f"eval_{seed}"  # the evaluate command on the selected checkpoint, from scratch
        assert main(["evaluate", "--checkpoint", str(run.output_dir), "--input_json", str(json_file), "--split",
                     "test", "--output_dir", str(out), "--device", "cpu", "--batch_size", "8",
                     "--n_bootstrap", "10"]) == 0
        independent[seed] = json.loads((out / "metrics.json").read_text())["metrics"]
        assert entry["metrics"] == pytest.approx(independent[seed], nan_ok=True)
    rows = {row["metric"]: row for row in read_csv(result.summary_csv)}
    assert list(next(iter(rows.values()))) == ["metric", "class", "split", "mean", "sd", "n", "seed_0", "seed_1"]
    assert {row["split"] for row in rows.values()} == {"test"}
    for key in ("Mean_Dice", "mIoU", "Dice_Class_0", "Dice_Class_1", "IoU_Class_1"):
        a, b = independent[0][key], independent[1][key]
        stats = summary["summary"][key]
        assert stats["n"] == 2 and stats["mean"] == pytest.approx((a + b) / 2)
        assert stats["sd"] == pytest.approx(abs(a - b) / math.sqrt(2))
        assert float(rows[key]["seed_0"]) == pytest.approx(a, rel=1e-5)
        assert float(rows[key]["mean"]) == pytest.approx(stats["mean"], rel=1e-5)
    assert rows["Dice_Class_1"]["class"] == "red" and rows["Mean_Dice"]["class"] == ""
    assert result.best_metric == summary["summary"]["Mean_Dice"]["mean"]


def test_without_a_labelled_test_split_the_numbers_say_validation(tmp_path, caplog):
    json_file = make_dataset(tmp_path / "data", labelled_test=False)
    with caplog.at_level(logging.WARNING, logger="pfmseg_engine.training"):
        result = train_from_config(preset_config(tmp_path, json_file, [0]))
    assert result.split == "val" and any("VALIDATION numbers" in r.getMessage() for r in caplog.records)
    summary = json.loads(result.summary_json.read_text())
    assert summary["split"] == "val" and "VALIDATION" in summary["warning"]
    assert summary["reported"].startswith("validation split, NOT test results")
    run = result.runs[0]
    best = next(row for row in run.history if row["epoch"] == run.best_epoch)
    assert summary["runs"]["0"]["checkpoint"] is None
    assert summary["runs"]["0"]["metrics"]["Mean_Dice"] == pytest.approx(best["Mean_Dice"])
    assert {row["split"] for row in read_csv(result.summary_csv)} == {"val"}
    assert not (run.output_dir / "checkpoints" / "eval_test").exists()
