"""The slide feature store: exact features, view-first and resumable fills, one writer, clear disk faults."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from pfmseg_engine.errors import ConfigError, StorageError
from pfmseg_engine.live import SlideFeatureStore, build_live_model, live_model_config
from pfmseg_engine.slides import Slide
from pfmseg_engine.storage import OutputBusyError, OutputLock

CLASSES = ("glass", "stroma", "nuclei")
WINDOW = 64


def half_tissue_image(height: int = 384, width: int = 640, seed: int = 0) -> np.ndarray:
    """Glass on the left half, H&E-coloured texture (pink stroma, purple nuclei) on the right half."""
    rng = np.random.default_rng(seed)
    image = np.clip(238 + rng.normal(0, 2, (height, width, 3)), 0, 255)
    right = image[:, width // 2:]
    right[:] = np.array([215, 130, 185]) + rng.normal(0, 18, right.shape)
    nuclei = rng.random(right.shape[:2]) < 0.04
    right[nuclei] = np.array([90, 50, 140])
    return np.clip(image, 0, 255).astype(np.uint8)


def half_tissue_slide(**kwargs) -> Slide:
    return Slide.from_array(half_tissue_image(**kwargs), mpp=1.0, name="half")


def tiny_live_model(head: str = "fast", blocks=(-1,)):
    return build_live_model(live_model_config("kaiko-vits16", CLASSES, tiny=True, window=WINDOW, head=head,
                                              blocks=blocks))


def window_pixels(store: SlideFeatureStore, windows) -> torch.Tensor:
    images = np.stack([store.window_image(w) for w in windows])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("head, blocks", [("fast", (-1,)), ("multilevel", (1, 3)), ("cup", (1, 3))])
def test_stored_features_are_what_the_model_computes(tmp_path, head, blocks):
    model = tiny_live_model(head, blocks)
    slide = half_tissue_slide(height=200, width=300)  # edge windows are padded, as inference pads
    store = SlideFeatureStore(model, slide, root=tmp_path, dtype="float32", tissue=False)
    assert store.fill() == store.geometry.rows * store.geometry.cols == 20
    windows = [(0, 0), (3, 4), (1, 2)]
    stored = store.read(windows)
    assert [g.shape for g in stored] == [(3, 48, 4, 4)] * len(model.encoder.backbone.feature_indices)
    model.eval()
    with torch.no_grad():
        x = window_pixels(store, windows)
        grids = model.encoder(model.encoder.backbone.pad_to_patch_multiple((x - model.mean) / model.std)).grids
        for mine, theirs in zip(stored, grids, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
        # the head on stored grids gives the model's own logits (the cup head: after the final norm)
        torch.testing.assert_close(model.head(stored, [], out_size=(WINDOW, WINDOW)), model(x), rtol=0, atol=1e-4)


def test_float16_store_is_close_and_smaller(tmp_path):
    model = tiny_live_model()
    slide = half_tissue_slide(height=128, width=256)
    exact = SlideFeatureStore(model, slide, root=tmp_path, dtype="float32", tissue=False)
    half = SlideFeatureStore(model, slide, root=tmp_path, dtype="float16", tissue=False)
    assert exact.directory != half.directory  # the dtype is part of the key
    exact.fill()
    half.fill()
    windows = [(0, 0), (1, 3)]
    torch.testing.assert_close(half.read(windows)[0], exact.read(windows)[0], rtol=2e-3, atol=2e-3)
    assert half.disk_bytes() < 0.6 * exact.disk_bytes()
    summary = half.summary()
    assert summary["windows_stored"] == 8 and summary["bytes_per_mm2"] > 0
    # tokens per mm² x channels x bytes: (1000 / (1 um/px * 16 px))² x 48 x 2
    assert summary["raw_bytes_per_mm2"] == pytest.approx(62.5 ** 2 * 48 * 2)


def test_key_follows_window_resolution_and_weights(tmp_path):
    model = tiny_live_model()
    slide = Slide.from_array([half_tissue_image(), half_tissue_image()[::2, ::2]], mpp=1.0, name="half")
    base = SlideFeatureStore(model, slide, root=tmp_path)
    assert SlideFeatureStore(model, slide, root=tmp_path).directory == base.directory
    assert SlideFeatureStore(model, slide, root=tmp_path, window=128).directory != base.directory
    assert SlideFeatureStore(model, slide, root=tmp_path, mpp=2.0).directory != base.directory
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.encoder.backbone.vit.state_dict().items()}, str(weights))
    other = tiny_live_model()
    other.config = other.config.with_changes(weights=str(weights))
    assert SlideFeatureStore(other, slide, root=tmp_path).directory != base.directory


def test_fill_goes_view_first_and_resumes(tmp_path):
    model = tiny_live_model()
    store = SlideFeatureStore(model, half_tissue_slide(), root=tmp_path)
    tissue = store.tissue_windows()
    assert tissue and all(c >= 4 for _, c in tissue)  # the glass half holds no tissue windows
    view = (512, 256, 64, 64)  # (x, y, w, h): window (4, 8)
    filling = store.iter_fill(view, batch_size=2)
    first = next(filling)
    assert first.windows[0] == (4, 8) and first.done == 2 and first.total == len(tissue)
    filling.close()  # interrupted after one batch: what is stored stays
    assert store.done().sum() == 2
    again = SlideFeatureStore(model, half_tissue_slide(), root=tmp_path)
    assert again.fill() == len(tissue) - 2
    assert again.fill() == 0 and set(zip(*np.nonzero(again.done()), strict=True)) == set(tissue)


def test_second_writer_is_refused_with_the_holder(tmp_path):
    store = SlideFeatureStore(tiny_live_model(), half_tissue_slide(), root=tmp_path)
    store.directory.mkdir(parents=True)
    with OutputLock(store.zarr_path), pytest.raises(OutputBusyError, match=f"PID {os.getpid()}"):
        store.fill()
    assert store.fill(windows=[(0, 5)]) == 1  # free again


def test_full_disk_is_one_clear_message(tmp_path, monkeypatch):
    import zarr

    store = SlideFeatureStore(tiny_live_model(), half_tissue_slide(), root=tmp_path)

    def full(self, key, value):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(zarr.Array, "__setitem__", full)
    with pytest.raises(StorageError, match="disk is full") as caught:
        store.fill()
    assert str(store.directory) in str(caught.value)
    assert store.done().sum() == 0  # nothing is recorded as stored


def test_unstored_windows_and_unsuitable_models_are_refused(tmp_path):
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    store = SlideFeatureStore(tiny_live_model(), half_tissue_slide(), root=tmp_path)
    store.fill(windows=[(0, 5)])
    with pytest.raises(StorageError, match="not stored yet"):
        store.read([(0, 6)])
    full = build_model(ModelConfig(backbone="kaiko-vits16", num_classes=3, tiny=True, input_size=WINDOW,
                                   tuning=TuningConfig(strategy="full")))
    with pytest.raises(ConfigError, match="trains backbone weights"):
        SlideFeatureStore(full, half_tissue_slide(), root=tmp_path)


def test_reduced_width_stores_principal_components_that_fold_into_the_head(tmp_path):
    from pfmseg_engine.live.basis import fold_head, reduced_head

    model = tiny_live_model().eval()
    slide = half_tissue_slide(height=192, width=256)
    store = SlideFeatureStore(model, slide, root=tmp_path, dtype="float32", tissue=False, width=16)
    assert store.directory != SlideFeatureStore(model, slide, root=tmp_path, tissue=False).directory
    assert store.basis() is None and store.fill() == 12
    basis = store.basis()
    assert basis is not None and basis.width == 16 and store.summary()["channels"] == 16
    components = basis.components[0]
    torch.testing.assert_close(components @ components.T, torch.eye(16), rtol=0, atol=1e-4)
    windows = [(0, 0), (2, 3)]
    images = np.stack([store.window_image(w) for w in windows])
    stored = store.read(windows)
    assert stored[0].shape == (2, 16, 4, 4)
    torch.testing.assert_close(stored, basis.project(store.backbone_features(images)), rtol=0, atol=1e-5)
    # a head trained on the components, folded into the model's head, is the model's own computation
    head = reduced_head(model, basis)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    fold_head(head.eval(), model, basis)
    with torch.no_grad():
        torch.testing.assert_close(model(window_pixels(store, windows)), head(stored, [], out_size=(WINDOW, WINDOW)),
                                   rtol=0, atol=1e-4)
    # every slide of this model shares the basis, so one live head serves them all
    other = SlideFeatureStore(model, half_tissue_slide(height=128, width=128, seed=3), root=tmp_path,
                              dtype="float32", tissue=False, width=16)
    assert other.basis_path == store.basis_path and other.fill() == 4
    assert other.basis() is not None and other.basis().digest() == basis.digest()
    with pytest.raises(ConfigError, match="1x1 projection"):
        SlideFeatureStore(tiny_live_model("cup", (1, 3)), slide, root=tmp_path, width=16)


def test_an_abandoned_fill_stops_inside_the_backbone_and_stores_nothing_of_the_batch(tmp_path):
    store = SlideFeatureStore(tiny_live_model(), half_tissue_slide(), root=tmp_path, tissue=False)
    assert len(store.backbone.vit.blocks) >= 2
    asked = []

    def abandon() -> bool:  # asked before the batch, then before each block: give up at the second block
        asked.append(True)
        return len(asked) == 3

    assert list(store.iter_fill(windows=[(0, 0), (0, 1)], batch_size=2, abandon=abandon)) == []
    assert len(asked) == 3 and not store.done().any()
    assert all(not block._forward_pre_hooks for block in store.backbone.vit.blocks)  # hooks removed
    assert store.fill(windows=[(0, 0), (0, 1)], batch_size=2) == 2  # the next fill computes them
