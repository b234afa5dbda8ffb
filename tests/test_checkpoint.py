"""Self-describing, atomic checkpoints holding only the trainable state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pfmseg_engine import (
    STRATEGIES,
    CheckpointError,
    ModelConfig,
    TuningConfig,
    build_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pfmseg_engine.backbones import create_vit, get_spec


def backbone_file(tmp_path: Path, seed: int) -> Path:
    """A 'published' tiny backbone checkpoint with its own random weights."""
    torch.manual_seed(seed)
    vit = create_vit(get_spec("kaiko-vits16"), tiny=True)
    path = tmp_path / f"backbone_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def trained_model(strategy: str, weights: Path | None = None):
    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, class_names=("a", "b", "c"),
                         tuning=TuningConfig(strategy=strategy, rank=4), input_size=64,
                         weights=str(weights) if weights else None, mpp=0.5)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_round_trip_reproduces_predictions(tmp_path, strategy):
    weights = backbone_file(tmp_path, seed=1)
    model = trained_model(strategy, weights)
    path = save_checkpoint(tmp_path / "model.pt", model, metrics={"mIoU": 0.5})
    loaded = load_checkpoint(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)
    assert loaded.config == model.config


def test_checkpoint_is_self_describing_and_holds_only_trainable_state(tmp_path):
    model = trained_model("lora")
    payload = read_checkpoint(save_checkpoint(tmp_path / "m.pt", model, metrics={"dice": 0.7},
                                              metadata={"note": "x"}))
    assert payload["config"]["backbone"] == "kaiko-vits16"
    assert payload["config"]["tuning"]["strategy"] == "lora"
    assert payload["config"]["class_names"] == ["a", "b", "c"]
    assert payload["config"]["input_size"] == 64
    assert payload["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert payload["metrics"] == {"dice": 0.7}
    assert {"pfmseg", "torch", "timm", "peft"} <= set(payload["metadata"]["versions"])
    assert payload["metadata"]["note"] == "x"
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert set(payload["state"]) == trainable
    assert not any(k.endswith("attn.qkv.base_layer.weight") for k in payload["state"])


def test_full_fine_tune_checkpoint_needs_no_backbone_file(tmp_path):
    weights = backbone_file(tmp_path, seed=2)
    model = trained_model("full", weights)
    path = save_checkpoint(tmp_path / "full.pt", model)
    weights.unlink()
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(CheckpointError, match="do not exist here"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, weights="")  # any backbone init: the checkpoint holds all of it
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_frozen_part_must_be_the_backbone_trained_on(tmp_path):
    model = trained_model("cnn_adapter", backbone_file(tmp_path, seed=3))
    path = save_checkpoint(tmp_path / "m.pt", model)
    other = backbone_file(tmp_path, seed=4)
    with pytest.raises(CheckpointError, match="differ from those"):
        load_checkpoint(path, weights=str(other))


def test_loading_into_a_mismatched_model_is_a_clear_error(tmp_path):
    from pfmseg_engine.checkpoint import load_into

    path = save_checkpoint(tmp_path / "m.pt", trained_model("lora"))
    other = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=5, input_size=64))
    with pytest.raises(CheckpointError, match=r"num_classes: checkpoint 3 vs model 5"):
        load_into(other, read_checkpoint(path))


def test_write_is_atomic_and_a_crash_keeps_the_previous_file(tmp_path, monkeypatch):
    model = trained_model("frozen")
    path = save_checkpoint(tmp_path / "best.pt", model, metrics={"epoch": 1})
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, metrics={"epoch": 2})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_unreadable_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(save_checkpoint(tmp_path / "ok.pt", trained_model("frozen")).read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a pfmseg checkpoint"):
        read_checkpoint(foreign)


def _as_format_1(path: Path, strategy: str) -> None:
    """Rewrite a checkpoint the way format 1 stored it (the small adapter was called cnn_adapter)."""
    payload = torch.load(str(path), weights_only=True)
    payload["format_version"] = 1
    payload["config"]["tuning"]["strategy"] = strategy
    torch.save(payload, str(path))


def test_format_1_small_adapter_checkpoint_loads_as_cnn_adapter_small(tmp_path):
    weights = backbone_file(tmp_path, seed=1)
    model = trained_model("cnn_adapter_small", weights)
    path = save_checkpoint(tmp_path / "old.pt", model)
    _as_format_1(path, "cnn_adapter")
    loaded = load_checkpoint(path)
    assert loaded.config.tuning.strategy == "cnn_adapter_small"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_format_1_transformer_adapter_checkpoint_is_refused_with_the_fix(tmp_path):
    path = save_checkpoint(tmp_path / "old.pt", trained_model("transformer_adapter"))
    _as_format_1(path, "transformer_adapter")
    with pytest.raises(CheckpointError, match="Retrain"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ position grids
def grid_backbone_file(tmp_path: Path, name: str, img_size: int) -> Path:
    """A tiny 'published' backbone stored at another grid than its spec's 224 px build (timm layout keys;
    the transformers converter accepts them, as a state dict taken from a converted model)."""
    torch.manual_seed(5)
    vit = create_vit(get_spec(name), tiny=True, overrides={"img_size": img_size})
    path = tmp_path / f"{name}_{img_size}.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def test_full_fine_tune_reloads_at_its_trained_grid_with_or_without_backbone_weights(tmp_path):
    """The weights' 4x4 grid is kept, so the trained table is 4x4: a reload without the backbone file, or
    against a backbone kept at another grid, builds the table at the stored grid and predicts the same."""
    weights = grid_backbone_file(tmp_path, "kaiko-vits16", 64)
    model = trained_model("full", weights)
    assert model.encoder.backbone.position_grid == (4, 4)
    path = save_checkpoint(tmp_path / "full.pt", model)
    other_grid = grid_backbone_file(tmp_path, "kaiko-vits16", 96)
    x = torch.rand(1, 3, 80, 48)
    with pytest.warns(UserWarning, match="randomly initialised"):
        without = load_checkpoint(path, weights="")
    for loaded in (without, load_checkpoint(path, weights=str(other_grid))):
        assert loaded.encoder.backbone.position_grid == (4, 4)
        with torch.no_grad():
            assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_resuming_does_not_replace_parameters_an_optimizer_holds(tmp_path):
    from pfmseg_engine.checkpoint import load_into

    model = trained_model("full", grid_backbone_file(tmp_path, "kaiko-vits16", 64))
    payload = read_checkpoint(save_checkpoint(tmp_path / "full.pt", model))
    rebuilt = build_model(model.config.with_changes(weights=str(grid_backbone_file(tmp_path, "kaiko-vits16", 96))))
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_into(rebuilt, payload, adopt_position_grid=False)


@pytest.mark.parametrize(("name", "warns"), [("phikon", True), ("midnight12k", True), ("kaiko-vits16", False)])
def test_format_2_checkpoints_of_transformers_backbones_warn_about_the_position_kernel(tmp_path, name, warns):
    import warnings

    from pfmseg_engine.checkpoint import PositionKernelWarning

    config = ModelConfig(backbone=name, tiny=True, num_classes=2, input_size=112,
                         weights=str(grid_backbone_file(tmp_path, name, 224)))
    path = save_checkpoint(tmp_path / "old.pt", build_model(config).eval())
    payload = torch.load(str(path), weights_only=True)
    payload["format_version"] = 2
    torch.save(payload, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(path)
    kernel_warnings = [w for w in caught if issubclass(w.category, PositionKernelWarning)]
    assert bool(kernel_warnings) == warns
    if warns:
        assert "Retrain" in str(kernel_warnings[0].message) and get_spec(name).name in str(kernel_warnings[0].message)
    assert read_checkpoint(path)["format_version"] == 3 and loaded.config == config
