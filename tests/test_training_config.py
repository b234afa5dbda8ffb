"""The seed YAML config: typed, validated, errors that name the key and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pfmseg_engine.data.augment import TRANSFORMS
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.training.config import TrainConfig, config_from_dict, default_config_path, load_config
from pfmseg_engine.training.schema import all_keys

SECTION_NAMES = {"dataset", "system", "model", "training", "validation", "logging", "visualization",
                 "finetune_mode", "cnn_adapter", "transformer_adapter", "light_head", "augmentation", "optimizer",
                 "scheduler", "loss"}

# The seed repository's configs/config.yaml, keys and values as published (paths made local).
SEED_CONFIG = """
dataset:
  json_file: "data/dataset.json"
  num_classes: 2
  ignore_index: 255
system:
  num_workers: 2
  pin_memory: true
  seed: 42
  device: "cuda:0"
model:
  pfm_name: "conch_v1"
  emb_dim: 768
  finetune_mode:
    type: frozen
    rank: 16
    alpha: 1.0
  transformer_adapter:
    depth: 2
  cnn_adapter:
    width_factor: 1
    block_units: [3, 4, 9]
  pfm_weights_path: '/weights/conch_v1/pytorch_model.bin'
  num_classes: 2
training:
  batch_size: 8
  epochs: 150
  learning_rate: 0.001
  weight_decay: 0.0001
  use_amp: true
  accumulate_grad_batches: 1
  clip_grad_norm: 5.0
  augmentation:
    RandomResizedCropSize: 224
  optimizer:
    type: "Adam"
  scheduler:
    type: "cosine"
    warmup_epochs: 2
  loss:
    type: "dice"
validation:
  eval_interval: 1
  batch_size: 8
  augmentation:
    ResizedSize: 224
logging:
  log_dir: "/tmp/logs_frozen"
  experiment_name: "test"
visualization:
  save_interval: 10
  num_vis_samples: 8
"""


@pytest.fixture
def seed_setup(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(
        {"num_classes": 2, "class_names": ["bg", "nucleus"], "data": {"train": [], "val": []}}))
    path = tmp_path / "config.yaml"
    path.write_text(SEED_CONFIG)
    return path


def test_seed_config_loads_unchanged(seed_setup):
    cfg = load_config(seed_setup)
    assert cfg.model.pfm_name == "conch_v1" and cfg.training.loss.type == "dice"
    assert cfg.num_classes == 2 and cfg.class_names == ("bg", "nucleus")  # filled from the JSON
    assert cfg.dataset.json_file == str((seed_setup.parent / "data" / "dataset.json").resolve())
    assert cfg.embed_dim() == 768 and cfg.window_size == 224
    model_cfg = cfg.model_config()
    assert model_cfg.backbone == "conch_v1" and model_cfg.tuning.strategy == "frozen"
    assert model_cfg.tuning.alpha == 1.0 and model_cfg.input_size == 224
    assert model_cfg.weights == "/weights/conch_v1/pytorch_model.bin"


def test_default_yaml_documents_the_real_defaults():
    cfg = load_config(default_config_path(), check_dataset=False)
    defaults = TrainConfig()
    assert cfg.training == defaults.training and cfg.model == defaults.model
    assert cfg.validation == defaults.validation and cfg.system == defaults.system
    assert cfg.logging == defaults.logging and cfg.visualization == defaults.visualization
    raw = yaml.safe_load(default_config_path().read_text())
    assert set(raw) == set(defaults.to_dict())  # every section is in the example


def test_yaml_round_trip(seed_setup):
    cfg = load_config(seed_setup)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(("option", "message"), [
    ("training.lerning_rate=0.1", "Unknown config key 'training.lerning_rate'. Did you mean 'training.learning_rate'"),
    ("training.seed=1", "Did you mean 'system.seed'"),
    ("model.finetune_mode.typ=lora", "Did you mean 'model.finetune_mode.type'"),
    ("validaton.eval_interval=2", "Did you mean 'validation'"),
])
def test_unknown_keys_name_the_closest_valid_key(seed_setup, option, message):
    with pytest.raises(ConfigError) as err:
        load_config(seed_setup, [option])
    assert message in str(err.value)


def test_emb_dim_contradiction_gives_the_right_value(seed_setup):
    with pytest.raises(ConfigError, match=r"emb_dim is 1024 but conch_v1 has embedding dimension 768.*emb_dim: 768"):
        load_config(seed_setup, ["model.emb_dim=1024"])
    tiny = load_config(seed_setup, ["model.emb_dim=null", "model.tiny=true"])
    assert tiny.embed_dim() == 48


@pytest.mark.parametrize(("option", "nearest"), [
    ("training.augmentation.RandomResizedCropSize=230", "224 or 240"),
    ("validation.augmentation.ResizedSize=500", "496 or 512"),
])
def test_sizes_must_be_patch_multiples(seed_setup, option, nearest):
    with pytest.raises(ConfigError, match=f"patch size 16; nearest valid sizes: {nearest}"):
        load_config(seed_setup, [option])


def test_patch_14_and_fixed_size_backbones(seed_setup):
    with pytest.raises(ConfigError, match="224 or 238"):
        load_config(seed_setup, ["model.pfm_name=uni_v2", "model.emb_dim=null",
                                 "training.augmentation.RandomResizedCropSize=230",
                                 "validation.augmentation.ResizedSize=224"])
    with pytest.raises(ConfigError, match="only accepts 384x384"):
        load_config(seed_setup, ["model.pfm_name=musk", "model.emb_dim=null"])


def test_num_classes_must_agree_with_json_and_model(seed_setup):
    with pytest.raises(ConfigError, match=r"dataset.num_classes is 3 but dataset JSON .* has num_classes 2"):
        load_config(seed_setup, ["dataset.num_classes=3", "model.num_classes=3"])
    with pytest.raises(ConfigError, match=r"dataset.num_classes is 2 but model.num_classes is 5"):
        load_config(seed_setup, ["model.num_classes=5"])


def test_options_are_typed_and_validated(seed_setup):
    cfg = load_config(seed_setup, ["training.epochs=3", "model.finetune_mode.type=lora",
                                   "training.optimizer.betas=[0.8, 0.9]", "training.scheduler.type=step"])
    assert cfg.training.epochs == 3 and cfg.training.optimizer.betas == (0.8, 0.9)
    assert cfg.model_config().tuning.strategy == "lora"
    with pytest.raises(ConfigError, match=r"'training.epochs' must be an integer, got 'many'"):
        load_config(seed_setup, ["training.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(seed_setup, ["training.epochs"])
    with pytest.raises(ConfigError, match=r"'training.epochs' must be > 0"):
        load_config(seed_setup, ["training.epochs=0"])


@pytest.mark.parametrize(("option", "message"), [
    ("training.optimizer.type=adamm", "Did you mean 'adam'"),
    ("training.scheduler.type=cosin", "Did you mean 'cosine'"),
    ("training.loss.type=ohm", "Did you mean 'ohem'"),
    ("model.finetune_mode.type=lorra", "Did you mean 'lora'"),
    ("model.pfm_name=uni_v3", "Did you mean"),
    ("validation.monitor=miou", "Did you mean 'mIoU'"),
    ("training.augmentation.transforms={hedjitter: {p: 1}}", "Did you mean 'hed_jitter'"),
])
def test_registry_names_are_checked_when_loading(seed_setup, option, message):
    with pytest.raises(ConfigError, match=message):
        load_config(seed_setup, [option])


def test_augmentation_entries_merge_into_defaults(seed_setup):
    cfg = load_config(seed_setup, ["training.augmentation.transforms.hflip.p=0"])
    transforms = cfg.training.augmentation.transforms
    assert transforms["hflip"]["p"] == 0 and transforms["hed_jitter"]["p"] == 0.5
    none = load_config(seed_setup, ["training.augmentation.transforms=null"])
    assert all(t["p"] == 0 for t in none.training.augmentation.transforms.values())


def test_adapter_width_and_missing_json(seed_setup, tmp_path):
    cfg = load_config(seed_setup, ["model.finetune_mode.type=cnn_adapter", "model.cnn_adapter.width_factor=0.5",
                                   "model.cnn_adapter.block_units=[2, 3, 4]"])
    tuning = cfg.model_config().tuning  # the seed's ResNetV2 adapter keys are used, not ignored
    assert tuning.adapter_width_factor == 0.5 and tuning.adapter_block_units == (2, 3, 4)
    assert load_config(seed_setup).model_config().tuning.adapter_block_units == (3, 4, 9)  # the seed file's
    small = load_config(seed_setup, ["model.finetune_mode.type=cnn_adapter_small",
                                     "model.cnn_adapter.channels=[8, 16, 32]"])
    assert small.model_config().tuning.adapter_channels == (8, 16, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(Exception, match=r"dataset.json"):
        load_config(seed_setup, ["dataset.json_file=missing/dataset.json"])



def test_docs_list_every_key_with_its_default():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    rows = [line.split("|") for line in doc.splitlines() if line.startswith("| `")]
    documented = {row[1].strip().strip("`"): row[2].strip() for row in rows}
    leaves = {k for k in all_keys(TrainConfig) if k.rsplit(".", 1)[-1] not in SECTION_NAMES}
    assert leaves - set(documented) == set()
    assert set(documented) - leaves <= set(TRANSFORMS)  # the transform table
    defaults = TrainConfig().to_dict()
    unchecked = set()
    for key in leaves:
        cell = documented[key]
        if cell.count("`") == 2 and cell.startswith("`") and cell.endswith("`"):
            value = defaults
            for part in key.split("."):
                value = value[part]
            assert yaml.safe_load(cell.strip("`")) == value, key
        else:
            unchecked.add(key)
    assert unchecked == {"dataset.json_file", "training.augmentation.transforms"}
