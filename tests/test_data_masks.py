"""Masks are read as class indices whatever the PNG mode, and bad values are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.data.masks import read_mask, read_mask_file, sparse_to_targets
from pfmseg_engine.errors import DataError

INDICES = np.array([[0, 1, 2], [2, 1, 0], [255, 0, 1]], dtype=np.uint8)


def test_grey_mask_gives_its_values(tmp_path):
    Image.fromarray(INDICES, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", num_classes=3), INDICES)


def test_palette_mask_keeps_indices_not_colours(tmp_path):
    img = Image.fromarray(INDICES, mode="P")
    # colours whose luminance differs from the index: the seed's convert('L') read these wrongly
    palette = [0] * 768
    palette[0:3], palette[3:6], palette[6:9] = [200, 10, 10], [10, 200, 10], [10, 10, 200]
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
        assert np.asarray(check.convert("L"))[0, 0] != 0  # luminance is not the index
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", num_classes=3), INDICES)


def test_16_bit_mask(tmp_path):
    values = np.array([[0, 300], [299, 255]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "m16.png")
    out = read_mask_file(tmp_path / "m16.png")
    np.testing.assert_array_equal(out, values)
    read_mask(tmp_path / "m16.png", num_classes=301)


def test_rgb_mask_is_an_error_without_colour_map(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"rgb\.png.*colour image.*class_colors"):
        read_mask(tmp_path / "rgb.png", num_classes=2)


def test_rgb_mask_with_colour_map(tmp_path):
    colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    rgb = np.array(colours, dtype=np.uint8)[INDICES.clip(0, 2)]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png", 3, class_colors=colours), INDICES.clip(0, 2))


def test_unknown_colour_is_named(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = [1, 2, 3]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"\[1, 2, 3\]"):
        read_mask(tmp_path / "rgb.png", 2, class_colors=[[0, 0, 0], [255, 255, 255]])


def test_out_of_range_values_list_file_and_values(tmp_path):
    bad = INDICES.copy()
    bad[0, 0], bad[1, 1] = 7, 9
    Image.fromarray(bad, mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataError) as err:
        read_mask(tmp_path / "bad.png", num_classes=3)
    message = str(err.value)
    assert "bad.png" in message and "7" in message and "9" in message and "255" in message


def test_ignore_index_is_allowed_and_configurable(tmp_path):
    values = np.array([[0, 1], [99, 99]], dtype=np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "m.png")
    read_mask(tmp_path / "m.png", num_classes=2, ignore_index=99)
    with pytest.raises(DataError, match="99"):
        read_mask(tmp_path / "m.png", num_classes=2, ignore_index=255)


def test_npy_mask(tmp_path):
    np.save(tmp_path / "m.npy", INDICES.astype(np.int32))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.npy", 3), INDICES)


def test_sparse_labels_convert_to_targets():
    labels = np.array([[0, 1, 2], [3, 0, 0]])
    np.testing.assert_array_equal(sparse_to_targets(labels, 3), [[255, 0, 1], [2, 255, 255]])
    with pytest.raises(DataError, match="4"):
        sparse_to_targets(np.array([[4]]), 3)
