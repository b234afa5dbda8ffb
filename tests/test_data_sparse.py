"""Sparse-annotation patch sampling over numpy and lazy dask arrays."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from pfmseg_engine.data import JointAugment, SparsePatchDataset
from pfmseg_engine.errors import DataError


def scribbles(height: int = 300, width: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[50:53, 20:200] = 1  # a thin stroke of class 0
    labels[250:260, 300:390] = 2  # a blob of class 1
    labels[5, 395] = 3  # one pixel of class 2 near the corner
    return image, labels


def test_patches_cover_annotations_and_map_labels():
    image, labels = scribbles()
    ds = SparsePatchDataset(image, labels, patch_size=32, num_classes=3, samples_per_epoch=60, seed=1)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
        values = set(item["label"].unique().tolist())
        assert 255 in values  # unannotated pixels are ignored
        assert values - {255}, "every patch contains an annotated pixel"
        assert values <= {0, 1, 2, 255}
        seen |= values - {255}
    assert seen == {0, 1, 2}  # class balancing reaches even the single-pixel class


def test_patch_matches_source_pixels():
    image, labels = scribbles()
    ds = SparsePatchDataset(image, labels, patch_size=16, num_classes=3, samples_per_epoch=5)
    img, target = ds.read_patch(0, 48, 100)
    np.testing.assert_allclose(img, image[48:64, 100:116] / 255.0, atol=1e-6)
    expected = labels[48:64, 100:116].astype(np.int64) - 1
    expected[labels[48:64, 100:116] == 0] = 255
    np.testing.assert_array_equal(target, expected)


def test_border_patch_is_padded_with_ignore():
    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[10, 10] = 1
    ds = SparsePatchDataset(image, labels, patch_size=32, samples_per_epoch=3)
    item = ds[0]
    assert item["label"].shape == (32, 32)
    assert (item["label"] == 0).sum() == 1
    assert torch.all(item["label"][20:, :] == 255) and torch.all(item["image"][:, 20:, :] == 0)


def test_dask_arrays_give_same_patches_as_numpy():
    image, labels = scribbles()
    eager = SparsePatchDataset(image, labels, patch_size=32, num_classes=3, samples_per_epoch=8, seed=4)
    lazy = SparsePatchDataset(da.from_array(image, chunks=(64, 64, 3)), da.from_array(labels, chunks=(64, 64)),
                              patch_size=32, num_classes=3, samples_per_epoch=8, seed=4)
    assert eager.class_pixel_counts() == lazy.class_pixel_counts()
    for i in range(len(eager)):
        assert torch.equal(eager[i]["image"], lazy[i]["image"])
        assert torch.equal(eager[i]["label"], lazy[i]["label"])


def test_deterministic_per_seed_epoch_index_with_augmentation():
    image, labels = scribbles()
    ds = SparsePatchDataset(image, labels, patch_size=32, num_classes=3, samples_per_epoch=4, seed=0,
                            transform=JointAugment())
    first = ds[2]
    assert torch.equal(first["image"], ds[2]["image"])
    ds.set_epoch(1)
    assert not torch.equal(first["image"], ds[2]["image"])


def test_multiple_images_and_errors():
    image, labels = scribbles()
    ds = SparsePatchDataset([image, image[:100]], [labels, labels[:100]], patch_size=32, samples_per_epoch=4)
    assert ds.num_classes == 3
    with pytest.raises(DataError, match="No annotated pixels"):
        SparsePatchDataset(image, np.zeros_like(labels), patch_size=32)
    with pytest.raises(DataError, match="label 3 but num_classes=2"):
        SparsePatchDataset(image, labels, patch_size=32, num_classes=2)
    with pytest.raises(DataError, match="pixel grid"):
        SparsePatchDataset(image, labels[:10], patch_size=32)
