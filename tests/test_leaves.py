"""The engine's single answers that front ends ask instead of restating: what a folder is, what the engine
opens, which augmentations are exact, whether weights are at hand, what an unnamed class is called, and
which converter reads a checkpoint layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pfmseg_engine.backbones import get_spec
from pfmseg_engine.backbones.availability import WeightsStatus, weights_available, weights_status
from pfmseg_engine.backbones.layouts import CONVERTERS, converter_for
from pfmseg_engine.classes import default_class_names
from pfmseg_engine.data.augment import DEFAULT_TRANSFORMS, EXACT_TRANSFORMS, TRANSFORMS, exact_only
from pfmseg_engine.errors import WeightsError
from pfmseg_engine.labelstore import is_label_store, is_zarr, store_attributes, write_labels
from pfmseg_engine.slides import can_open

# ---- label store detection -----------------------------------------------------------------------------


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_a_written_store_is_a_label_store(tmp_path, ngff):
    store = write_labels(tmp_path / "a.ome.zarr", np.ones((8, 8), np.uint8), class_names=["tumour"], mpp=1.0,
                         chunk=8, ngff=ngff)
    assert is_zarr(store) and is_label_store(store)
    assert store_attributes(store)["class_names"] == ["tumour"]


def test_foreign_zarr_is_zarr_but_not_ours(tmp_path):
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = []
    assert is_zarr(tmp_path / "other.zarr")
    assert not is_label_store(tmp_path / "other.zarr")
    assert store_attributes(tmp_path / "other.zarr") is None


def test_non_zarr_paths_are_neither(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / ".zattrs").write_text("{not json")
    for path in (tmp_path / "folder", tmp_path / "file.txt", tmp_path / "missing"):
        assert not is_zarr(path) and not is_label_store(path)
    assert not is_label_store(broken)


def test_v3_attributes_under_ome_are_found(tmp_path):
    store = tmp_path / "v3.zarr"
    store.mkdir()
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                 "attributes": {"ome": {"pfmseg": {"class_names": ["a"]}}}}))
    assert is_zarr(store) and is_label_store(store)


# ---- can_open --------------------------------------------------------------------------------------------


def test_can_open_a_folder_of_one_suffixless_dicom_file(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert can_open(series)


def test_can_open_what_open_slide_takes_and_nothing_else(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tile.png")
    store = write_labels(tmp_path / "p.ome.zarr", np.ones((8, 8), np.uint8), class_names=["a"], mpp=1.0, chunk=8)
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "empty").mkdir()
    assert can_open(tmp_path / "tile.png") and can_open(store)
    assert not can_open(tmp_path / "notes.txt")
    assert not can_open(tmp_path / "empty")
    assert not can_open(tmp_path / "missing.svs")


# ---- exact augmentations -------------------------------------------------------------------------------


def test_exact_only_switches_off_every_inexact_transform_in_registry_order():
    off = exact_only()
    assert set(off) | set(EXACT_TRANSFORMS) == set(TRANSFORMS)
    assert not set(off) & set(EXACT_TRANSFORMS)
    assert list(off) == [name for name in TRANSFORMS if name not in EXACT_TRANSFORMS]
    assert all(params == {"p": 0.0} for params in off.values())
    assert set(EXACT_TRANSFORMS) <= set(DEFAULT_TRANSFORMS)


def test_exact_transforms_permute_pixels_exactly():
    import torch

    from pfmseg_engine.data.augment import AugmentContext, build_transform

    torch.manual_seed(0)
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    for name in EXACT_TRANSFORMS:
        out = build_transform(name, {"p": 1.0}, AugmentContext())(image)
        assert sorted(out.flatten().tolist()) == sorted(image.flatten().tolist()), name


# ---- weights availability ------------------------------------------------------------------------------


def test_weights_available_from_a_local_file_only_when_it_exists(tmp_path):
    spec = get_spec("uni")
    file = tmp_path / "w.safetensors"
    assert not weights_available(spec, str(file))
    assert weights_status(spec, str(file)) == WeightsStatus("missing_file", str(file))
    file.write_bytes(b"x")
    assert weights_available(spec, str(file))
    assert weights_status(spec, str(file)).describe() == "weights file found"


def test_weights_available_without_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing cached, nothing downloaded
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"), raising=False)
    assert weights_available(get_spec("unet"), None)
    assert weights_status(get_spec("unet"), "").describe() == "none needed (trained from scratch)"
    spec = get_spec("uni")
    assert weights_available(spec, None, tiny=True)
    status = weights_status(spec, "hf-hub:")
    assert status.source == f"hf-hub:{spec.hf_hub_id}" and not status.available
    assert status.describe() == f"hf-hub:{spec.hf_hub_id} (download needs access)"


# ---- class names, converters ---------------------------------------------------------------------------


def test_default_class_names():
    assert default_class_names(3) == ("class_0", "class_1", "class_2")
    assert default_class_names(0) == ()


def test_model_config_and_train_config_use_the_default_names():
    from pfmseg_engine.model import ModelConfig

    assert ModelConfig(backbone="unet", num_classes=2).class_names == default_class_names(2)


def test_every_layout_of_the_table_has_its_converter():
    from pfmseg_engine.backbones import ALL_SPECS

    for spec in ALL_SPECS:
        if spec.from_scratch:  # no checkpoint to convert
            continue
        assert converter_for(spec.checkpoint_layout) is CONVERTERS[spec.checkpoint_layout]
    with pytest.raises(WeightsError, match="known layouts"):
        converter_for("no-such-layout")


# ---- placement ---------------------------------------------------------------------------------------------


def test_placement_puts_pixel_centres_on_the_slide():
    from pfmseg_engine.labelstore import placement

    assert placement(0.5, 4.0, (10, 20)) == {"scale": (2.0, 2.0), "translate": (0.5 * 11.5, 0.5 * 21.5)}
    assert placement(1.0, 1.0) == {"scale": (1.0, 1.0), "translate": (0.0, 0.0)}


def test_a_store_records_the_placement_of_every_level(tmp_path):
    from pfmseg_engine.labelstore import LabelOutput, placement

    store = write_labels(tmp_path / "r.ome.zarr", np.ones((600, 600), np.uint8), class_names=["a"], mpp=2.0,
                         slide_mpp=0.5, offset=(100.0, 40.0), chunk=128)
    output = LabelOutput(store)
    datasets = output.multiscales["datasets"]
    assert len(datasets) > 1
    for k, dataset in enumerate(datasets):
        scale, shift = (t[t["type"]] for t in dataset["coordinateTransformations"])
        expected = placement(0.5, 4.0 * 2**k, (100.0, 40.0))
        assert scale == pytest.approx(list(expected["scale"]))
        assert shift == [round(t, 9) for t in expected["translate"]]
