"""Shared fixtures: small models, the suite's own real data, quiet random-weight warnings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pfmseg_engine.backbones import RandomWeightsWarning
from testdata import CMU, SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    """Tests build random-weight backbones and resolution-less stand-in models on purpose; both warnings
    are tested where they matter."""
    from pfmseg_engine.inference.plan import MagnificationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        warnings.simplefilter("ignore", MagnificationWarning)
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small test models run several times faster on one thread than contending for two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """The demo slide and plugin sessions go to a per-run cache, never the user's ~/.cache."""
    monkeypatch.setenv("PFMSEG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pfmseg-cache"))


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` for the opt-in ``realdata`` suite (deselected by default)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"The realdata suite needs {SHARED_DATA} (real histology beside the checkout); "
                    "the default suite (python -m pytest) does not.")
    return SHARED_DATA


TILE_CLASSES = ("background", "pale", "stained", "dark")


@pytest.fixture(scope="session")
def slide_tile_dataset(tmp_path_factory) -> Path:
    """A seed-format dataset (JSON + PNG tiles + class-index masks) cut from the shipped CMU slide.

    Tiles of different sizes come from real H&E pixels; masks split them into four brightness classes,
    so image-set inference and evaluation run on real tissue without redistributing a dataset.
    """
    import tiffslide
    from PIL import Image

    root = tmp_path_factory.mktemp("slide_tiles")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    boxes = [(200, 300, 256, 192), (900, 1200, 160, 224), (1500, 600, 200, 200), (400, 2000, 240, 176),
             (1200, 2400, 192, 256), (1800, 1800, 224, 224)]
    entries = []
    with tiffslide.TiffSlide(CMU) as slide:
        for i, (x, y, w, h) in enumerate(boxes):
            rgb = np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB"))
            grey = rgb.mean(-1)
            mask = 3 - np.digitize(grey, [120, 170, 215])  # 0 = bright background ... 3 = darkest
            Image.fromarray(rgb).save(root / "images" / f"tile{i}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"tile{i}.png")
            entries.append({"image_path": f"images/tile{i}.png", "mask_path": f"masks/tile{i}.png"})
    data = {"num_classes": len(TILE_CLASSES), "class_names": list(TILE_CLASSES),
            "data": {"train": entries[:3], "val": entries[3:4], "test": entries[4:]}}
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root / "dataset.json"
