"""The frozen-feature cache: exact D4 symmetries, features identical to the live backbone, invalidation on
new weights, the cached forward equal to the model's, and the feature PCA view."""

from __future__ import annotations

import errno
import itertools
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pfmseg_engine import ModelConfig, TuningConfig, build_model
from pfmseg_engine.backbones import create_vit, get_spec
from pfmseg_engine.compare.cache import FeatureCache, cache_refusal, cached_forward, live_features
from pfmseg_engine.compare.data import (
    CropSetDataset,
    apply_op,
    cache_incompatibilities,
    compose_op,
    crop_positions,
    draw_op,
    exact_probabilities,
    reachable_ops,
)


class Source:
    """Two small RGB images with dense 3-class masks (a corner unlabelled)."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (80, 72, 3), dtype=np.uint8),
                       rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)]
        self.masks = [rng.integers(0, 3, image.shape[:2]).astype(np.int64) for image in self.images]
        self.masks[0][:32, :32] = 255

    def num_images(self):
        return len(self.images)

    def load(self, index):
        return self.images[index], self.masks[index]

    def name(self, index):
        return f"image_{index}"

    def identity(self, index):
        return f"test-image-{index}"


def tiny_weights(path, seed: int):
    torch.manual_seed(seed)
    vit = create_vit(get_spec("kaiko-vits16"), tiny=True)
    for parameter in vit.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return str(path)


def tiny_model(weights=None, strategy="frozen", head=None, **kwargs):
    fields = {"head": head} if head else {}
    return build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, weights=weights, num_classes=3, input_size=32,
                                   tuning=TuningConfig(strategy=strategy), **fields, **kwargs)).eval()


def test_d4_ops_compose_exactly():
    x = torch.randn(2, 5, 5)
    for steps in itertools.product([("hflip", 1), ("vflip", 1), ("rot90", 1), ("rot90", 3), ("transpose", 1)],
                                   repeat=3):
        expected = x
        for name, k in steps:
            expected = {"hflip": lambda t: t.flip(-1), "vflip": lambda t: t.flip(-2),
                        "rot90": lambda t, k=k: torch.rot90(t, k, dims=(-2, -1)),
                        "transpose": lambda t: t.transpose(-2, -1)}[name](expected)
        assert torch.equal(apply_op(x, compose_op(steps)), expected)
    assert reachable_ops({}) == (0,)
    assert len(reachable_ops(exact_probabilities({"hflip": {"p": 0.5}, "rot90": {"p": 0.5},
                                                  "transpose": {"p": 0.3}}))) == 8
    assert reachable_ops({"hflip": 1.0}) == (compose_op([("hflip", 1)]),)
    probabilities = {"hflip": 0.5, "vflip": 0.5}
    drawn = {draw_op(probabilities, seed) for seed in range(200)}
    assert drawn == set(reachable_ops(probabilities)) and len(drawn) == 4


def test_augmentation_compatibility():
    from pfmseg_engine.training.config import config_from_dict

    default = config_from_dict({"dataset": {"num_classes": 2}, "model": {"pfm_name": "kaiko-vits16"}},
                               check_dataset=False)
    reasons = cache_incompatibilities(default.training.augmentation)
    assert any("zoom" in r for r in reasons) and any("color_jitter" in r for r in reasons)
    assert not any("hflip" in r or "rot90" in r for r in reasons)
    geometric = config_from_dict({"dataset": {"num_classes": 2}, "model": {"pfm_name": "kaiko-vits16"},
                                  "training": {"augmentation": {"zoom": None, "transforms": None}}},
                                 check_dataset=False)
    assert cache_incompatibilities(geometric.training.augmentation) == []


def test_crop_set_windows():
    assert crop_positions(80, 32, 16) == [0, 16, 32, 48]
    assert crop_positions(70, 32, 16) == [0, 16, 32, 38] and crop_positions(20, 32, 16) == [0]
    dataset = CropSetDataset(Source(), crop=32, transforms={"hflip": {"p": 0.5}}, seed=1)
    assert dataset.ops == (0, compose_op([("hflip", 1)]))
    boxes = [(b.image, b.y, b.x) for b in dataset.boxes]
    assert (0, 0, 0) not in boxes  # the unlabelled corner window is dropped
    assert (1, 8, 24) in boxes and len(dataset) == len(boxes)
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    image, label = dataset.window(item["box"], item["op"])
    assert torch.equal(item["image"], image) and torch.equal(item["label"], label)
    first = [dataset.op_for(i) for i in range(20)]
    assert first == [dataset.op_for(i) for i in range(20)]  # (seed, epoch, index) decide the op
    dataset.set_epoch(1)
    assert [dataset.op_for(i) for i in range(20)] != first


def test_cache_features_are_those_of_the_live_backbone_and_follow_the_weights(tmp_path):
    weights = tiny_weights(tmp_path / "backbone.safetensors", seed=1)
    model = tiny_model(weights)
    dataset = CropSetDataset(Source(), crop=32, transforms={"hflip": {"p": 0.5}, "rot90": {"p": 0.5}})
    cache = FeatureCache(tmp_path / "cache", model, crop=32)
    total = len(dataset.boxes) * len(dataset.ops)
    assert cache.fill(dataset, batch_size=5) == total
    store = cache.store(dataset)
    for box, op in itertools.product(range(len(dataset.boxes)), dataset.ops):
        for cached, live in zip(store.read(box, op), live_features(model, dataset, box, op), strict=True):
            torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    assert cache.fill(dataset) == 0  # everything is there: nothing recomputed
    assert FeatureCache(tmp_path / "cache", tiny_model(weights, head="light"), crop=32).directory == cache.directory

    # new weights in the same file: another key, features computed afresh from the new weights
    before = store.read(0, 0)[-1]
    tiny_weights(tmp_path / "backbone.safetensors", seed=2)
    changed = tiny_model(weights)
    fresh = FeatureCache(tmp_path / "cache", changed, crop=32)
    assert fresh.directory != cache.directory and fresh.key["weights"] != cache.key["weights"]
    assert fresh.fill(dataset) == total
    after = fresh.store(dataset).read(0, 0)[-1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, live_features(changed, dataset, 0, 0)[-1], rtol=1e-5, atol=1e-6)
    random_init = FeatureCache(tmp_path / "cache", tiny_model(), crop=32)
    assert random_init.key["weights"] == "random-init" and random_init.directory != cache.directory


def test_key_holds_the_position_grid_and_kernel(tmp_path):
    """Features depend on the grid the table is stored at and on the kernel resampling it: both key the cache."""
    kaiko = tiny_model(tiny_weights(tmp_path / "backbone.safetensors", seed=1))
    base = FeatureCache(tmp_path, kaiko, crop=32)
    assert base.key["positions"] == {"grid": [14, 14], "antialias": "timm"}  # the weights file's grid
    kaiko.encoder.backbone.use_position_grid((3, 3))
    assert FeatureCache(tmp_path, kaiko, crop=32).directory != base.directory

    phikon = build_model(ModelConfig(backbone="phikon", tiny=True, num_classes=3, input_size=32)).eval()
    plain = FeatureCache(tmp_path, phikon, crop=32)
    assert plain.key["positions"]["antialias"] is False
    phikon.encoder.backbone.vit.position_antialias = True
    assert FeatureCache(tmp_path, phikon, crop=32).directory != plain.directory


def test_interrupted_fill_resumes(tmp_path):
    model = tiny_model()
    dataset = CropSetDataset(Source(), crop=32)
    cache = FeatureCache(tmp_path, model, crop=32)
    calls = []
    assert cache.fill(dataset, batch_size=2, should_stop=lambda: calls.append(1) or len(calls) > 2) == 4
    assert cache.fill(dataset, batch_size=2) == len(dataset.boxes) - 4


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fallback", [False, True])
def test_full_disk_while_creating_the_cache_is_one_line_and_leaves_nothing_complete(tmp_path, monkeypatch,
                                                                                     fallback):
    """Feature files reserve their space before any feature is written: a full disk is a StorageError here,
    not a memory-mapped write that the kernel answers with SIGBUS."""
    from pfmseg_engine import storage
    from pfmseg_engine.errors import StorageError

    model = tiny_model()
    dataset = CropSetDataset(Source(), crop=32, transforms={"hflip": {"p": 0.5}})
    cache = FeatureCache(tmp_path, model, crop=32)
    if fallback:  # no posix_fallocate: zeros written through checked writes; the second file fills the disk
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
        real_write = os.write
        one_file = cache._rows(dataset, 0)[1] * int(np.prod(cache._grid_shape())) * 4
        room = [one_file + one_file // 2]

        def fills_up(fd, data):  # a full disk takes what fits, then refuses
            if room[0] <= 0:
                raise enospc()
            written = real_write(fd, bytes(data[:room[0]]))
            room[0] -= written
            return written

        monkeypatch.setattr(storage.os, "write", fills_up)
    else:
        monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(enospc()),
                            raising=False)
    computed = []
    with pytest.raises(StorageError) as info:
        cache.fill(dataset, progress=lambda done, total: computed.append(done))
    message = str(info.value)
    assert "\n" not in message and "disk is full" in message and "feature cache" in message
    assert str(cache.directory) in message and computed == []  # stopped before any feature was computed
    data = sorted(cache.directory.rglob("op*_block*[0-9].npy"))
    assert len(data) == (1 if fallback else 0)  # the file reserved before the disk filled, not the one after
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    for path in data:  # nothing looks complete: every file left has its flags, and they say "not computed"
        assert not np.load(path.with_name(path.name.replace(".npy", ".done.npy"))).any()

    monkeypatch.undo()
    total = len(dataset.boxes) * len(dataset.ops)
    assert cache.fill(dataset) == total  # with room again, the cache is built from scratch
    store = cache.store(dataset)
    torch.testing.assert_close(store.read(1, 0)[-1], live_features(model, dataset, 1, 0)[-1], rtol=1e-5, atol=1e-6)


def test_a_feature_file_without_its_flags_is_rebuilt(tmp_path):
    """Flags are written after their feature file: a file left by an interrupted creation is never trusted."""
    model = tiny_model()
    dataset = CropSetDataset(Source(), crop=32)
    cache = FeatureCache(tmp_path, model, crop=32)
    cache.fill(dataset)
    folder = cache.image_dir(dataset, 0)
    (folder / f"op0_block{cache.blocks[-1]}.done.npy").unlink()
    assert cache.fill(dataset) == len(dataset.images_boxes[0])  # that image's windows again, no other
    assert cache.fill(dataset) == 0


@pytest.mark.parametrize("strategy,head", [("frozen", None), ("frozen", "light"), ("frozen", "cup"),
                                           ("frozen", "multilevel"), ("cnn_adapter_small", None)])
def test_cached_forward_equals_the_model(strategy, head, tmp_path):
    model = tiny_model(strategy=strategy, head=head)
    dataset = CropSetDataset(Source(), crop=32, transforms={"transpose": {"p": 0.5}})
    cache = FeatureCache(tmp_path, model, crop=32)
    cache.fill(dataset)
    dataset.attach_features(cache.store(dataset))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(cached_forward(model, batch, batch["image"]), model(batch["image"]),
                                   rtol=1e-4, atol=1e-5)


def test_cache_refusals():
    assert cache_refusal(tiny_model()) is None
    assert "trains backbone" in cache_refusal(tiny_model(strategy="lora"))
    assert "trains backbone" in cache_refusal(tiny_model(strategy="full"))
    assert "token sequence" in cache_refusal(tiny_model(strategy="transformer_adapter", head="cup"))
    unet = build_model(ModelConfig(backbone="unet", tiny=True, num_classes=2, input_size=32))
    assert "from scratch" in cache_refusal(unet)


def test_feature_pca():
    from pfmseg_engine import ConfigError
    from pfmseg_engine.compare import feature_pca

    model = tiny_model()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    image[:, :45] //= 3  # two regions with different statistics
    rgb = feature_pca(model, image, window=32)
    assert rgb.shape == (70, 90, 3) and rgb.dtype == np.uint8
    assert rgb.reshape(-1, 3).std(0).max() > 10  # not a flat image
    assert np.array_equal(rgb, feature_pca(model, image, window=32))  # deterministic, signs fixed
    assert np.array_equal(rgb[:16, :16], np.broadcast_to(rgb[0, 0], (16, 16, 3)))  # one colour per patch
    assert feature_pca(model.encoder.backbone, image).shape == (70, 90, 3)
    unet = build_model(ModelConfig(backbone="unet", tiny=True, num_classes=2, input_size=32))
    with pytest.raises(ConfigError, match="no token features"):
        feature_pca(unet, image)
