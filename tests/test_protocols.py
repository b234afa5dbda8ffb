"""Settings declared once (one seed-key table), protocol presets as data, and runs repeated over seeds."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import yaml

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.model import ModelConfig
from pfmseg_engine.training import PROTOCOLS, SEED_KEYS, TrainConfig, config_from_dict, load_config
from pfmseg_engine.training.schedulers import make_schedule
from pfmseg_engine.tuning import TuningConfig

# The seed repository's configs/unet.yaml (lingxitong/PFM_Segmentation), keys and values as published.
SEED_UNET = """
dataset:
  json_file: "data/dataset.json"
  num_classes: 2
  ignore_index: 255
system: {num_workers: 2, pin_memory: true, seed: 42, device: "cuda:7"}
model:
  pfm_name: "unet"
  n_channels: 3
  bilinear: true
  num_classes: 2
training:
  batch_size: 4
  epochs: 150
  learning_rate: 0.001
  weight_decay: 0.0001
  use_amp: true
  accumulate_grad_batches: 1
  clip_grad_norm: 5.0
  augmentation: {RandomResizedCropSize: 944}
  optimizer: {type: "Adam"}
  scheduler: {type: "cosine", warmup_epochs: 2}
  loss: {type: "cross_entropy"}
validation:
  eval_interval: 1
  batch_size: 4
  augmentation: {ResizedSize: 944}
logging: {log_dir: "/tmp/logs_unet", experiment_name: "unet_test_BCSS_2"}
visualization: {save_interval: 10, num_vis_samples: 8}
"""


def cfg(data=None, **kw):
    data = dict(data or {})
    data.setdefault("dataset", {"num_classes": 2})
    return config_from_dict(data, check_dataset=False, **kw)


# --- one table ---------------------------------------------------------------------------------------
def test_every_model_field_has_exactly_one_seed_key():
    targets = list(SEED_KEYS.values())
    assert len(targets) == len(set(targets))
    fields = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "tuning"}
    fields |= {f"tuning.{f.name}" for f in dataclasses.fields(TuningConfig)}
    assert set(targets) == fields  # a new ModelConfig/TuningConfig field needs its seed key here


def test_defaults_come_from_the_model_dataclasses():
    model = TrainConfig().model_config(num_classes=2)
    assert model.tuning == TuningConfig() and model.head == ModelConfig("uni_v1", 2).head
    assert model.input_size == ModelConfig("uni_v1", 2).input_size
    section = TrainConfig().model
    assert section.cnn_adapter.block_units == TuningConfig().adapter_block_units
    assert section.transformer_adapter.init_values == TuningConfig().adapter_init_values


@pytest.mark.parametrize("options", [
    [],
    ["model.finetune_mode.type=cnn_adapter", "model.cnn_adapter.width_factor=0.5",
     "model.cnn_adapter.block_units=[2,2]", "model.head=cup"],
    ["model.finetune_mode.type=cnn_adapter_small", "model.cnn_adapter.channels=[8,16,24]"],
    ["model.finetune_mode.type=lora", "model.finetune_mode.rank=4", "model.finetune_mode.alpha=2",
     "model.finetune_mode.lora_mlp=true", "model.feature_indices=[1,3]", "model.mpp=0.5"],
    ["model.finetune_mode.type=transformer_adapter", "model.transformer_adapter.depth=3",
     "model.transformer_adapter.init_values=null", "model.head=light"],
])
def test_the_table_works_both_ways(options):
    config = cfg(options=options)
    model = config.model_config()
    again = TrainConfig.from_model_config(model)
    assert again.model_config() == model
    assert again.model == dataclasses.replace(config.model, num_classes=None)  # every seed key restored


def test_seed_unet_yaml_loads_unchanged(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"num_classes": 2, "data": {"train": [], "val": []}}))
    (tmp_path / "unet.yaml").write_text(SEED_UNET)
    config = load_config(tmp_path / "unet.yaml")
    model = config.model_config()
    assert model.backbone == "unet" and model.tuning.strategy == "full" and model.input_size == 944
    assert config.embed_dim() is None
    with pytest.raises(ConfigError, match="bilinear"):
        load_config(tmp_path / "unet.yaml", ["model.bilinear=false"])
    with pytest.raises(ConfigError, match="pfm_name: unet"):
        load_config(tmp_path / "unet.yaml", ["model.model_type=unet", "model.pfm_name=uni_v1"])
    # the UNet row of the benchmark under the seed's protocol (docs/faithfulness.md)
    row = load_config(tmp_path / "unet.yaml", ["protocol=densebench"])  # the preset's head and strategy give way
    assert row.model_config().backbone == "unet" and row.training.augmentation.scale == (0.5, 1.0)


@pytest.mark.parametrize(("option", "message"), [
    ("model.cnn_adapter.width_factr=2", "Did you mean 'model.cnn_adapter.width_factor'"),
    ("model.transformer_adapter.dept=2", "Did you mean 'model.transformer_adapter.depth'"),
    ("model.finetune_mode.rnk=2", "Did you mean 'model.finetune_mode.rank'"),
    ("protocl=densebench", "Did you mean 'protocol'"),
])
def test_unknown_keys_still_name_the_closest(option, message):
    with pytest.raises(ConfigError, match=message):
        cfg(options=[option])


def test_model_rules_fail_at_load_time_named_by_seed_keys():
    with pytest.raises(ConfigError, match=r"model\.cnn_adapter\.width_factor"):
        cfg(options=["model.finetune_mode.type=cnn_adapter", "model.cnn_adapter.width_factor=0.3"])
    with pytest.raises(ConfigError, match=r"model\.cnn_adapter\.block_units"):
        cfg(options=["model.cnn_adapter.block_units=[3]"])
    with pytest.raises(ConfigError, match=r"model\.transformer_adapter\.depth"):
        cfg(options=["model.transformer_adapter.depth=0"])
    with pytest.raises(ConfigError, match="light"):  # the light head ignores CNN-adapter skips
        cfg(options=["model.finetune_mode.type=cnn_adapter", "model.head=light"])


# --- presets ------------------------------------------------------------------------------------------
def test_densebench_is_the_seed_framework():
    config = cfg({"protocol": "densebench"})
    t, v, m = config.training, config.validation, config.model_config()
    assert m.head == "cup" and m.tuning.strategy == "frozen" and m.tuning.rank == 16
    assert m.tuning.lora_impl == "seed" and m.tuning.alpha == 1.0  # the seed's layers, its alpha (the scale)
    assert m.tuning.adapter_width_factor == 1 and m.tuning.adapter_block_units == (3, 4, 9)
    assert m.tuning.adapter_depth == 2 and m.tuning.adapter_drop_path_rate == 0.1
    assert (t.batch_size, t.epochs, t.learning_rate, t.weight_decay, t.clip_grad_norm) == (8, 150, 1e-3, 1e-4, 5.0)
    assert t.optimizer.type == "Adam" and t.amp_dtype == "float16"
    assert (t.scheduler.type, t.scheduler.warmup_epochs, t.scheduler.T_max) == ("cosine", 2, 100)
    assert t.loss.type == "dice" and t.loss.absent_classes == "include" and t.loss.overlap_pooling == "image"
    assert t.augmentation.scale == (0.5, 1.0) and t.augmentation.zoom is None
    assert t.augmentation.transforms["vflip"]["p"] == 0.1 and t.augmentation.transforms["hed_jitter"]["p"] == 0
    assert v.resize_or_windowslide == "resize" and config.window_size == config.crop_size == 224
    assert config.protocol == "densebench"


def test_frozen_light_decoder_is_the_frozen_encoder_benchmark():
    config = cfg({"protocol": "frozen_light_decoder"})
    t = config.training
    assert config.model_config().head == "light" and config.model_config().tuning.strategy == "frozen"
    assert t.loss.type == "ce_dice" and t.optimizer.type == "NAdam" and t.learning_rate == 1e-4
    assert (t.epochs, t.batch_size, config.validation.eval_interval) == (50, 8, 10)
    assert config.system.seeds == list(range(10)) and config.crop_size == 512  # tests/test_frozen_protocol.py
    assert config.validation.monitor == "Mean_Dice" and config.model_config().light_head_final_norm
    schedule = make_schedule(t.scheduler, t.learning_rate, t.epochs, steps_per_epoch=4)
    assert schedule(0) == 1.0  # no warmup
    for cycle in range(5):  # annealed to 0 by the end of every 10 epochs, then restarted
        assert schedule(cycle * 40) == 1.0 and schedule(cycle * 40 + 39) < 0.01


def test_user_keys_override_the_preset_key_by_key():
    config = cfg({"protocol": "densebench", "training": {"epochs": 3, "scheduler": {"warmup_epochs": 0}}},
                 options=["model.finetune_mode.type=lora", "training.augmentation.RandomResizedCropSize=512"])
    t = config.training
    assert t.epochs == 3 and t.scheduler.warmup_epochs == 0 and t.scheduler.T_max == 100  # siblings kept
    assert config.model_config().tuning.strategy == "lora" and config.model_config().head == "cup"
    assert config.window_size == 512  # resized validation follows the crop
    back = cfg({"protocol": "frozen_light_decoder", "system": {"seeds": None}, "model": {"head": "cup"}})
    assert back.system.seeds is None and back.model.head == "cup" and back.training.optimizer.type == "NAdam"


def test_presets_round_trip_and_unknown_names_are_errors():
    for name in PROTOCOLS:
        config = cfg({"protocol": name})
        assert config_from_dict(yaml.safe_load(config.to_yaml()), check_dataset=False) == config
    with pytest.raises(ConfigError, match="Did you mean 'densebench'"):
        cfg({"protocol": "densbench"})
    from_model = TrainConfig.from_model_config(cfg().model_config(), protocol="frozen_light_decoder")
    assert from_model.training.optimizer.type == "NAdam"
    assert from_model.model.head == cfg().model_config().head != "light"  # the model's head wins over the preset's


def test_a_densebench_run_trains_end_to_end(tmp_path):
    from pfmseg_engine.training import train_from_config
    from test_training_trainer import make_dataset

    json_file = make_dataset(tmp_path / "data", size=(64, 72))
    config = config_from_dict({
        "protocol": "densebench",
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu"},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"}},
        "training": {"epochs": 1, "batch_size": 2, "augmentation": {"RandomResizedCropSize": 32}},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "db", "plot_history": False},
        "visualization": {"save_predictions": False},
    })
    result = train_from_config(config)
    assert result.status == "completed" and 0.0 <= result.history[0]["mIoU"] <= 1.0
    saved = load_config(result.output_dir / "config.yaml")
    assert saved == config and saved.model_config().head == "cup"


def test_presets_are_data_not_branches():
    from pfmseg_engine.training import runner, trainer

    for module in (trainer, runner):
        source = inspect.getsource(module)
        assert all(name not in source for name in PROTOCOLS)


# --- seeds ---------------------------------------------------------------------------------------------
def test_seeds_run_once_each_and_summarise(tmp_path, capsys):
    from pfmseg_engine.cli import main
    from test_training_trainer import make_dataset

    json_file = make_dataset(tmp_path / "data")
    config = {
        "protocol": "frozen_light_decoder",
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seeds": [3, 7]},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True},
        "training": {"epochs": 2, "batch_size": 2, "augmentation": {"RandomResizedCropSize": 32}},
        "validation": {"eval_interval": 1},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "flt", "plot_history": False},
        "visualization": {"save_predictions": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "seed 3: completed" in out and "seed 7: completed" in out
    assert "test Mean_Dice" in out and "over 2 seeds" in out  # the preset's numbers: the test split, by Dice
    exp = tmp_path / "logs" / "flt"
    for seed in (3, 7):
        run = exp / f"seed_{seed}"
        assert (run / "checkpoints" / "best.pt").is_file()
        alone = load_config(run / "config.yaml")  # each seed's folder is a complete, single run
        assert alone.system.seed == seed and alone.system.seeds is None and alone.output_dir == run
    summary = json.loads((exp / "seeds_summary.json").read_text())
    assert summary["seeds"] == [3, 7] and set(summary["runs"]) == {"3", "7"}
    dice = [summary["runs"][s]["metrics"]["Dice_Class_1"] for s in ("3", "7")]
    stats = summary["summary"]["Dice_Class_1"]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(sum(dice) / 2)
    assert stats["sd"] == pytest.approx(abs(dice[0] - dice[1]) / math.sqrt(2))
    csv_rows = (exp / "seeds_summary.csv").read_text().splitlines()
    assert csv_rows[0] == "metric,class,split,mean,sd,n,seed_3,seed_7"
    assert any(row.startswith("Dice_Class_0,") for row in csv_rows) and any(row.startswith("mIoU,") for row in csv_rows)
    # resuming continues (here: re-reads) every seed's run and rewrites the same summary
    assert main(["train", "--config", str(path), "--no-progress", "--resume", str(exp)]) == 0
    assert json.loads((exp / "seeds_summary.json").read_text())["summary"]["Dice_Class_1"] == stats


def test_seeds_must_be_distinct():
    with pytest.raises(ConfigError, match=r"system\.seeds"):
        cfg({"system": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match=r"system\.seeds"):
        cfg({"system": {"seeds": []}})
