"""Seed JSON parsing (paths relative to the JSON) and the image-set dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pfmseg_engine.data import JointAugment, SegmentationDataset, load_seed_json
from pfmseg_engine.errors import DataError


def write_dataset(root, n_train=3, n_val=1, size=(40, 48), num_classes=3, test_masks=False):
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "msk").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_train + n_val + 2):
        image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        mask = rng.integers(0, num_classes, size, dtype=np.uint8)
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "msk" / f"{i}.png")
        entries.append({"image_path": f"img/{i}.png", "mask_path": f"msk/{i}.png"})
    test = [dict(e, mask_path=None) for e in entries[n_train + n_val:]] if not test_masks else entries[n_train + n_val:]
    data = {"num_classes": num_classes, "data": {"train": entries[:n_train], "val": entries[n_train:n_train + n_val],
                                                 "test": test}}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def test_relative_paths_resolve_against_json_folder(tmp_path, monkeypatch):
    path = write_dataset(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds = load_seed_json(os.path.relpath(path, elsewhere))
    sample = ds.split("train")[0]
    assert sample.image_path == (tmp_path / "data" / "img" / "0.png").resolve()
    assert sample.mask_path.is_file()
    assert ds.class_names == ("class_0", "class_1", "class_2")


def test_null_test_masks_are_allowed_but_not_for_training(tmp_path):
    ds = load_seed_json(write_dataset(tmp_path))
    assert all(s.mask_path is None for s in ds.split("test"))
    with pytest.raises(DataError, match="without mask_path"):
        ds.split("test", require_masks=True)


def test_missing_file_and_unknown_split_are_named(tmp_path):
    path = write_dataset(tmp_path)
    data = json.loads(path.read_text())
    data["data"]["train"][0]["image_path"] = "img/missing.png"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"missing\.png"):
        load_seed_json(path)
    data["data"]["trian"] = data["data"].pop("train")
    data["data"]["val"][0]["image_path"] = "img/0.png"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="Did you mean 'train'"):
        load_seed_json(path)


def test_class_names_count_must_match(tmp_path):
    path = write_dataset(tmp_path)
    data = json.loads(path.read_text())
    data["class_names"] = ["a", "b"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="2 class_names for num_classes=3"):
        load_seed_json(path)


def test_size_mismatch_is_an_error(tmp_path):
    path = write_dataset(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(tmp_path / "msk" / "1.png")
    ds = load_seed_json(path)
    dataset = SegmentationDataset(ds.split("train"), num_classes=3)
    with pytest.raises(DataError, match=r"1\.png.*48x40.*10x10"):
        dataset.validate()
    with pytest.raises(DataError, match="same size"):
        dataset.load(1)


def test_training_items_are_fixed_size_crops_and_deterministic(tmp_path):
    ds = load_seed_json(write_dataset(tmp_path))
    aug = JointAugment(crop_size=32)
    dataset = SegmentationDataset(ds.split("train"), num_classes=3, transform=aug, seed=5, length=7)
    assert len(dataset) == 7
    item = dataset[6]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    again = dataset[6]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    dataset.set_epoch(1)
    assert not torch.equal(item["image"], dataset[6]["image"])


def test_load_returns_native_resolution(tmp_path):
    ds = load_seed_json(write_dataset(tmp_path, size=(37, 53)))
    image, mask = SegmentationDataset(ds.split("val"), num_classes=3).load(0)
    assert image.shape == (37, 53, 3) and image.dtype == np.uint8
    assert mask.shape == (37, 53)


def test_rgba_images_are_composited_on_white(tmp_path):
    from pfmseg_engine.data import ArrayImageSet, read_image
    from pfmseg_engine.data.sparse import SparsePatchDataset

    rgba = np.zeros((6, 8, 4), dtype=np.uint8)  # black under a transparent border, as exporters leave it
    rgba[2:4, 2:6] = (200, 40, 120, 255)  # opaque tissue
    rgba[0, 0] = (0, 0, 0, 128)  # half transparent black over white glass -> mid grey
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "tile.png")
    image = read_image(tmp_path / "tile.png")
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert (image[5, 7] == 255).all() and (image[1, 1] == 255).all()  # transparent -> white, not black
    assert tuple(image[2, 3]) == (200, 40, 120)  # opaque pixels unchanged
    assert abs(int(image[0, 0, 0]) - 127) <= 1
    # in-memory RGBA arrays (napari layers) follow the same rule
    loaded, _ = ArrayImageSet([rgba], [np.zeros((6, 8), dtype=np.int64)]).load(0)
    assert np.array_equal(loaded, image)
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[3, 3] = 1
    patch, _ = SparsePatchDataset([rgba], [labels], patch_size=6, num_classes=1).read_patch(0, 0, 0)
    assert np.allclose(patch, image[:6, :6] / 255.0)
