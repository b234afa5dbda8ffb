"""Suggestions: tissue only, uncertain and diverse, QuPath GeoJSON out, and the features/suggest CLI round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pfmseg_engine.annotations import read_geojson
from pfmseg_engine.live import SlideFeatureStore, k_center_greedy, suggest_regions, write_suggestions
from pfmseg_engine.live.suggest import SUGGESTION_CLASS, best_box
from pfmseg_engine.slides import Slide
from test_live_store import WINDOW, half_tissue_image, half_tissue_slide, tiny_live_model

SRC = Path(__file__).resolve().parents[1] / "src"
TISSUE_X = 320  # the half-tissue slide's tissue starts here (level-0 px; 1 um/px)


def test_k_center_greedy_trades_uncertainty_for_diversity():
    descriptors = np.array([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [0.0, 1.0]])
    uncertainty = np.array([0.9, 0.85, 0.8, 0.5])
    picks = [i for i, _, _ in k_center_greedy(uncertainty, descriptors, 2)]
    assert picks == [0, 3]  # the most uncertain, then the other cluster rather than a near duplicate
    labelled = np.array([[0.0, 1.0]])  # the second cluster is labelled already: stay in the first
    assert [i for i, _, _ in k_center_greedy(uncertainty, descriptors, 2, labelled)] == [0, 2]
    assert k_center_greedy(uncertainty[:0], descriptors[:0], 3) == []


def test_best_box_finds_the_most_uncertain_square():
    spread = np.zeros((64, 64))
    spread[40:56, 8:24] = 1.0
    assert best_box(spread, 16, 8) == (40, 8, 1.0)


@pytest.mark.parametrize("box", [None, 32])
def test_suggestions_lie_in_tissue_and_differ(tmp_path, box):
    model = tiny_live_model()
    slide = half_tissue_slide()
    regions = suggest_regions(model, slide, k=4, box=box, store_root=tmp_path, device="cpu")
    assert [r.rank for r in regions] == [1, 2, 3, 4]
    assert len({r.window for r in regions}) == 4
    side = box or WINDOW
    store = SlideFeatureStore(model, slide, root=tmp_path)
    for region in regions:
        assert region.x >= TISSUE_X and region.width == region.height == side
        assert store.tissue is not None and store.tissue.any_in(region.y, region.y + side, region.x, region.x + side)
        assert 0 <= region.uncertainty <= 1
    scores = [r.score for r in regions]
    assert scores[0] == max(scores)
    # labelled windows are never proposed
    again = suggest_regions(model, slide, k=4, box=box, store_root=tmp_path, labelled=[regions[0].window])
    assert regions[0].window not in {r.window for r in again}


def test_suggestions_geojson_is_valid_qupath(tmp_path):
    model = tiny_live_model()
    slide = half_tissue_slide()
    regions = suggest_regions(model, slide, k=3, store_root=tmp_path / "store")
    path = write_suggestions(regions, tmp_path / "s.geojson", slide=slide)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    for feature, region in zip(data["features"], regions, strict=True):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert feature["properties"]["name"] == f"Suggestion {region.rank}"
        assert feature["properties"]["measurements"]["uncertainty"] == pytest.approx(region.uncertainty, abs=1e-6)
    read = read_geojson(path)
    assert [f.class_name for f in read.features] == [SUGGESTION_CLASS] * 3
    assert [f.geometry.bounds for f in read.features] == [
        (r.x, r.y, r.x + r.width, r.y + r.height) for r in regions]
    shifted = Slide.from_array(half_tissue_image(), mpp=slide.mpp, name="half", bounds_offset=(100, 50))
    moved = json.loads(write_suggestions(regions, tmp_path / "f.geojson", slide=shifted, frame="file").read_text())
    assert moved["features"][0]["geometry"]["coordinates"][0][0] == [regions[0].x + 100, regions[0].y + 50]


def cli(*argv: str) -> int:
    from pfmseg_engine import cli as entry

    return entry.main(list(argv))


def test_cli_features_then_suggest_round_trip(tmp_path, capsys):
    from PIL import Image

    from pfmseg_engine.checkpoint import save_checkpoint

    Image.fromarray(half_tissue_image()).save(tmp_path / "half.png")
    checkpoint = save_checkpoint(tmp_path / "live.pt", tiny_live_model())
    store = tmp_path / "store"
    common = ("--slide", str(tmp_path / "half.png"), "--mpp", "1.0", "--device", "cpu", "--store", str(store))
    assert cli("features", "--checkpoint", str(checkpoint), *common, "--json") == 0
    filled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert filled["windows_computed"] == filled["windows_stored"] > 0 and filled["bytes_per_mm2"] > 0
    assert cli("features", "--checkpoint", str(checkpoint), *common, "--json") == 0  # resumes: nothing left
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows_computed"] == 0
    out = tmp_path / "out"
    assert cli("suggest", "--checkpoint", str(checkpoint), *common, "--output_dir", str(out), "-k", "3") == 0
    printed = capsys.readouterr().out
    assert "3 regions" in printed
    features = read_geojson(out / "half_suggestions.geojson").features
    assert len(features) == 3 and all(f.geometry.bounds[0] >= TISSUE_X for f in features)
    first = json.loads((out / "half_suggestions.json").read_text())
    assert len(first) == 3
    # the next round, with the suggested boxes annotated in QuPath: suggestions go elsewhere
    again = tmp_path / "again"
    assert cli("suggest", "--checkpoint", str(checkpoint), *common, "--output_dir", str(again), "-k", "3",
               "--annotations", str(out / "half_suggestions.geojson")) == 0
    second = json.loads((again / "half_suggestions.json").read_text())
    assert len(second) == 3 and not {tuple(r["window"]) for r in first} & {tuple(r["window"]) for r in second}
    # the module entry point: one message, no traceback
    missing = str(tmp_path / "missing.pt")
    proc = subprocess.run([sys.executable, "-m", "pfmseg_engine", "suggest", "--checkpoint", missing, *common,
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 2 and "missing.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_features_for_a_live_head_on_a_backbone(tmp_path, capsys):
    from PIL import Image

    Image.fromarray(half_tissue_image(height=128, width=256)).save(tmp_path / "half.png")
    argv = ("features", "--backbone", "kaiko-vits16", "--tiny", "--window", "64", "--slide", str(tmp_path / "half.png"),
            "--mpp", "1.0", "--device", "cpu", "--store", str(tmp_path / "store"), "--no-tissue")
    assert cli(*argv, "--json") == 0
    filled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert filled["windows_stored"] == 8 and filled["blocks"] == [3] and filled["width"] is None  # 48 < 384
    assert cli(*argv, "--width", "8") == 0
    assert "8 windows stored (8 computed now)" in capsys.readouterr().out
    assert cli(argv[0], "--slide", str(tmp_path / "half.png"), "--mpp", "1.0") == 2
    assert "--checkpoint CK" in capsys.readouterr().err


def test_models_the_store_cannot_serve_are_scored_directly(tmp_path):
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    slide = half_tissue_slide()
    model = tiny_live_model()
    stored = suggest_regions(model, slide, k=3, store_root=tmp_path, dtype="float32")
    direct = suggest_regions(model, slide, k=3, use_store=False)
    assert [r.window for r in direct] == [r.window for r in stored]
    assert [r.uncertainty for r in direct] == pytest.approx([r.uncertainty for r in stored], abs=1e-4)
    adapter = build_model(ModelConfig(backbone="kaiko-vits16", num_classes=3, tiny=True, input_size=WINDOW,
                                      tuning=TuningConfig(strategy="cnn_adapter", adapter_width_factor=0.5)))
    regions = suggest_regions(adapter, slide, k=2, store_root=tmp_path / "unused")
    assert len(regions) == 2 and all(r.x >= TISSUE_X for r in regions)
    assert not (tmp_path / "unused").exists()  # the adapter reads the image: nothing was stored
