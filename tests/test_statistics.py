"""Honest statistics: disjoint splits, slide/patient groups, the hierarchical bootstrap and Holm-adjusted gaps.

Everything runs on synthetic confusion matrices (no model, no training), so each property is checked on
inputs built to show it: seeds that disagree, tiles that are correlated within a patient, rows that are
clearly worse than the best one.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.compare.leaderboard import ALPHA, Leaderboard, build_row, rank_rows
from pfmseg_engine.data import seed_json
from pfmseg_engine.data.seed_json import load_seed_json, tcga_patient
from pfmseg_engine.errors import DataError
from pfmseg_engine.training.statistics import (
    Grouping,
    bootstrap_p_value,
    hierarchical_intervals,
    holm,
    paired_gap_test,
    resolve_groups,
)


# --- the split guard ----------------------------------------------------------------------------------------
def write_split_dataset(root: Path, splits: dict[str, list[str]], *, size: tuple[int, int] = (12, 16),
                        extra: dict[str, dict] | None = None) -> Path:
    """A seed JSON whose images are distinct random tiles named as listed (a name may repeat across splits)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "msk").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, names in splits.items():
        entries = []
        for name in names:
            if not (root / "img" / name).exists():
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "img" / name)
                Image.fromarray(np.zeros(size, np.uint8)).save(root / "msk" / name)
            entries.append({"image_path": f"img/{name}", "mask_path": f"msk/{name}", **(extra or {}).get(name, {})})
        data[split] = entries
    path = root / "dataset.json"
    path.write_text(json.dumps({"num_classes": 2, "data": data}))
    return path


def test_an_image_listed_in_two_splits_is_refused_by_its_resolved_path(tmp_path):
    path = write_split_dataset(tmp_path, {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["d.png"]})
    data = json.loads(path.read_text())
    data["data"]["test"].append({"image_path": "img/../img/b.png", "mask_path": "msk/b.png"})  # another spelling
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as error:
        load_seed_json(path)
    message = str(error.value)
    assert "'img/b.png' is listed in train and test" in message
    assert "a.png" not in message and "keep each image" in message


def test_a_copy_under_another_name_is_refused_by_content(tmp_path):
    path = write_split_dataset(tmp_path, {"train": ["a.png", "b.png"], "val": ["c.png"]})
    shutil.copy(tmp_path / "img" / "a.png", tmp_path / "img" / "a_copy.png")
    shutil.copy(tmp_path / "msk" / "a.png", tmp_path / "msk" / "a_copy.png")
    data = json.loads(path.read_text())
    data["data"]["test"] = [{"image_path": "img/a_copy.png", "mask_path": "msk/a_copy.png"}]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="identical content") as error:
        load_seed_json(path)
    message = str(error.value)
    assert "'img/a.png' (train)" in message and "'img/a_copy.png' (test)" in message and "sha256" in message
    assert load_seed_json(path, check_files=False).split("test")  # without file checks only paths are compared


def test_only_same_size_files_in_different_splits_are_hashed(tmp_path, monkeypatch):
    sizes = {"train": {"a.png": 100, "b.png": 100, "e.png": 300, "f.png": 300}, "val": {"c.png": 100},
             "test": {"d.png": 200}}
    rng = np.random.default_rng(4)
    data = {}
    for split, files in sizes.items():
        for name, size in files.items():
            (tmp_path / name).write_bytes(rng.integers(0, 255, size, dtype=np.uint8).tobytes())
        data[split] = [{"image_path": name, "mask_path": None} for name in files]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"num_classes": 2, "data": data}))
    hashed = []
    original = seed_json._sha256
    monkeypatch.setattr(seed_json, "_sha256", lambda file: hashed.append(file.name) or original(file))
    dataset = load_seed_json(path)  # distinct contents: accepted
    assert [len(dataset.split(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    # 100-byte files span train and val: hashed; d.png has a size of its own; e/f share a size but one split
    assert sorted(hashed) == ["a.png", "b.png", "c.png"]


# --- groups -------------------------------------------------------------------------------------------------
def test_tcga_barcodes_give_the_patient():
    assert tcga_patient("TCGA-18-5592-01Z-00-DX1.png") == "TCGA-18-5592"
    assert tcga_patient("/data/tiles/tcga-ar-a1ak-01z-00-dx1_tile3.png") == "TCGA-AR-A1AK"
    assert tcga_patient("slide_TCGA-CR-7395-01A-01-TS1") == "TCGA-CR-7395"
    assert tcga_patient("tile_0007.png") is None and tcga_patient("NOTTCGA-18-5592") is None
    grouping = resolve_groups(["TCGA-18-5592-01Z-00-DX1_0", "TCGA-18-5592-01Z-00-DX1_1", "TCGA-21-5784-01Z-00-DX1"])
    assert grouping.unit == "patients" and grouping.ids.tolist() == [0, 0, 1]
    assert grouping.labels == ("TCGA-18-5592", "TCGA-21-5784")
    assert grouping.describe(3) == "seeds (n=3) > patients (n=2) of 3 images"
    alone = resolve_groups(["a", "b", "a"])
    assert alone.unit == "images" and alone.n_units == 3 and alone.describe() == "images (n=3)"
    # a single patient cannot be resampled (zero-width intervals): its images are, and the report says so
    one = resolve_groups(["TCGA-18-5592-01Z_0", "TCGA-18-5592-01Z_1"])
    assert one.n_units == 2 and one.describe() == "images (n=2) (all of one patient: within-patient variation only)"


def test_the_group_field_wins_over_barcodes_and_travels_from_the_json(tmp_path):
    extra = {"a.png": {"group": "slide-1"}, "b.png": {"group": "slide-1"}, "c.png": {"group": "slide-2"}}
    path = write_split_dataset(tmp_path, {"train": ["x.png"], "test": ["a.png", "b.png", "c.png"]}, extra=extra)
    samples = load_seed_json(path).split("test")
    assert [s.group for s in samples] == ["slide-1", "slide-1", "slide-2"]
    grouping = resolve_groups([s.name for s in samples], [s.group for s in samples], "slides")
    assert grouping.unit == "slides" and grouping.ids.tolist() == [0, 0, 1]
    mixed = resolve_groups(["TCGA-18-5592-01Z_0", "TCGA-18-5592-01Z_1", "plain"], {"TCGA-18-5592-01Z_1": "p9"})
    assert mixed.unit == "groups" and mixed.ids.tolist() == [0, 1, 2]  # the explicit group overrides the barcode
    data = json.loads(path.read_text())
    data["data"]["test"][0]["group"] = ["not", "a", "name"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"data\.test\[0\]: 'group' must be"):
        load_seed_json(path)


# --- the hierarchical bootstrap -----------------------------------------------------------------------------
def confusion(accuracy: float, pixels: int = 1000) -> np.ndarray:
    """A two-class image with ``pixels`` per class, ``accuracy`` of each class predicted right."""
    right = round(accuracy * pixels)
    return np.array([[right, pixels - right], [pixels - right, right]])


def seed_matrices(accuracies: np.ndarray) -> np.ndarray:
    return np.stack([confusion(a) for a in accuracies])


def width(interval: tuple[float, float]) -> float:
    return interval[1] - interval[0]


def test_the_interval_widens_when_seeds_disagree():
    images = np.random.default_rng(1).uniform(0.75, 0.85, 30)
    agree = np.stack([seed_matrices(images)] * 2)
    disagree = np.stack([seed_matrices(images), seed_matrices(images - 0.3)])
    same = hierarchical_intervals(agree, n_bootstrap=400)["mIoU"]
    apart = hierarchical_intervals(disagree, n_bootstrap=400)["mIoU"]
    assert width(apart) > 5 * width(same)
    # the old image-only bootstrap of the summed seeds hides that disagreement
    summed = hierarchical_intervals(disagree.sum(0), n_bootstrap=400)["mIoU"]
    assert width(apart) > 5 * width(summed)
    assert hierarchical_intervals(disagree, n_bootstrap=400) == hierarchical_intervals(disagree, n_bootstrap=400)


def test_the_interval_widens_when_correlated_images_are_grouped():
    rng = np.random.default_rng(2)
    patients = rng.uniform(0.55, 0.95, 6)  # each patient has its own difficulty, shared by its 8 tiles
    accuracies = np.repeat(patients, 8) + rng.normal(0, 0.005, 48)
    stack = seed_matrices(accuracies)[None]
    names = [f"TCGA-AA-{p:04d}-01Z-00-DX1_tile{t}" for p in range(6) for t in range(8)]
    grouped = hierarchical_intervals(stack, resolve_groups(names), n_bootstrap=400)["mIoU"]
    independent = hierarchical_intervals(stack, Grouping.per_image(48), n_bootstrap=400)["mIoU"]
    assert width(grouped) > 1.8 * width(independent)


def test_holm_matches_a_hand_computation():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.04 (x2 = 0.08), 0.30 (x1 = 0.30), back in the given order
    assert holm([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    # step-down monotonicity: 0.03 x 2 = 0.06 would be below its predecessor 0.025 x 3 = 0.075
    assert holm([0.025, 0.03, 0.5]) == pytest.approx([0.075, 0.075, 0.5])
    # NaN is no test: m = 2, so 0.01 x 2 = 0.02 (not x 3); products above 1 are capped
    assert holm([0.01, float("nan"), 0.2]) == pytest.approx([0.02, float("nan"), 0.2], nan_ok=True)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_the_bootstrap_p_value_is_two_sided_and_never_zero():
    assert bootstrap_p_value(np.full(199, 0.1)) == pytest.approx(2 / 200)
    assert bootstrap_p_value(np.full(199, -0.1)) == pytest.approx(2 / 200)
    assert bootstrap_p_value(np.zeros(50)) == 1.0
    assert bootstrap_p_value(np.r_[np.full(150, 0.1), np.full(49, -0.1)]) == pytest.approx(2 * 50 / 200)


def test_the_paired_gap_cancels_what_two_rows_share():
    rng = np.random.default_rng(3)
    hardness = rng.uniform(0.4, 0.95, 40)  # images differ a lot; one row is 0.02 better on every image
    better = seed_matrices(np.clip(hardness + 0.02, 0, 1))[None]
    worse = seed_matrices(hardness)[None]
    test = paired_gap_test(better, worse, n_bootstrap=300)
    assert 0 < test.low <= test.high and test.p_value == pytest.approx(2 / 301)
    separate = hierarchical_intervals(worse, n_bootstrap=300)["mIoU"]
    assert width((test.low, test.high)) < width(separate) / 5


# --- the leaderboard ----------------------------------------------------------------------------------------
NAMES = [f"TCGA-AA-{p:04d}-01Z-00-DX1_tile{t}" for p in range(3) for t in range(3)]


def run_record(seed: int, accuracies: np.ndarray) -> dict:
    matrices = seed_matrices(accuracies)
    from pfmseg_engine.metrics import metrics_from_confusion

    return {"status": "ok", "seed": seed, "image_names": NAMES, "confusions": matrices.tolist(),
            "metrics": metrics_from_confusion(matrices.sum(0)), "trainable_params": 1000, "train_seconds": 1.0,
            "head": "light", "checkpoint": f"seed_{seed}.pt"}


def board_of(offsets: list[float], n_bootstrap: int = 200) -> Leaderboard:
    base = np.linspace(0.7, 0.9, len(NAMES))
    rows = [build_row(f"pfm{i}", "frozen", [run_record(s, np.clip(base - offset + 0.01 * s, 0, 1)) for s in (0, 1)],
                      ("background", "nucleus"), n_bootstrap=n_bootstrap)
            for i, offset in enumerate(offsets)]
    return Leaderboard(rank_rows(rows, n_bootstrap), ("background", "nucleus"), "test", n_bootstrap)


def test_the_leaderboard_shows_the_grouping_and_holm_adjusted_p_values():
    board = board_of([0.0, 0.2])
    rows = list(csv.DictReader(io.StringIO(board.to_csv())))
    assert [r["pfm"] for r in rows] == ["pfm0", "pfm1"]
    assert all(r["ci_resampling"] == "seeds (n=2) > patients (n=3) of 9 images" for r in rows)
    # one comparison: Holm leaves the p-value alone; the row is worse on every resample
    assert rows[1]["mIoU_gap_p"] == rows[1]["mIoU_gap_p_holm"] and float(rows[1]["mIoU_gap_p"]) == pytest.approx(
        2 / 201, rel=1e-5)
    assert rows[0]["vs_best"] == "best" and rows[1]["vs_best"] == "below"
    assert float(rows[1]["mIoU_gap_to_best_ci_low"]) > 0
    markdown = board.to_markdown()
    assert "CI: bootstrap over seeds (n=2) > patients (n=3) of 9 images" in markdown and "p (Holm)" in markdown
    assert "| 0.010 | below |" in markdown
    payload = board.to_dict()
    assert payload["ci_resampling"] == "seeds (n=2) > patients (n=3) of 9 images"
    assert payload["p_value_adjustment"] == "holm" and payload["rows"][1]["gap_p_holm"] == pytest.approx(2 / 201)
    assert "CI: bootstrap over seeds (n=2) > patients (n=3)" in board.table()


def test_verdicts_use_the_adjusted_p_values():
    board = board_of([0.0, 0.2, 0.21, 0.22, 0.23, 0.24, 0.25])  # six rows, each worse on every resample
    others = board.rows[1:]
    raw = [row.gap_p for row in others]
    assert all(p < ALPHA for p in raw)  # each alone would be called below ...
    assert [row.gap_p_holm for row in others] == pytest.approx(holm(raw))
    assert all(row.gap_p_holm >= ALPHA for row in others)  # ... but not after adjusting for six comparisons
    assert {row.vs_best for row in others} == {"tied"}


def test_explicit_groups_name_their_unit_in_the_leaderboard():
    groups = {name: f"slide{i % 2}" for i, name in enumerate(NAMES)}
    row = build_row("pfm", "frozen", [run_record(0, np.full(9, 0.8))], ("a", "b"), n_bootstrap=50, groups=groups,
                    group_unit="slides")
    assert row.ci_resampling == "seeds (n=1) > slides (n=2) of 9 images"


# --- evaluate -----------------------------------------------------------------------------------------------
class FakeSplit:
    """What ``evaluate_model`` reads of a split: samples (with groups), names, classes."""

    num_classes, ignore_index = 2, 255

    def __init__(self, names: list[str], groups: list[str | None]):
        self.samples = [seed_json.Sample(Path(f"{n}.png"), Path(f"{n}_mask.png"), g)
                        for n, g in zip(names, groups, strict=True)]

    def num_images(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index].name


def test_evaluate_resamples_the_same_groups(monkeypatch):
    from pfmseg_engine.metrics import confusion_matrix
    from pfmseg_engine.training import evaluation

    names = [f"TCGA-AA-{i // 4:04d}-01Z-00-DX1_{i % 4}" for i in range(8)] + ["other_0", "other_1"]
    groups = [None] * 8 + ["slide-x", "slide-x"]
    split = FakeSplit(names, groups)
    accuracy = [0.9, 0.9, 0.88, 0.91, 0.5, 0.52, 0.49, 0.5, 0.7, 0.71]
    masks = [np.repeat([[0] * 10 + [1] * 10], 2, axis=0) for _ in names]

    def predictions(model, dataset, indices, **kwargs):
        for index in indices:
            truth = masks[index]
            wrong = np.zeros(truth.shape, bool)
            wrong.flat[:round((1 - accuracy[index]) * truth.size)] = True
            predicted = np.where(wrong, 1 - truth, truth)
            yield index, None, truth, np.stack([predicted == 0, predicted == 1]).astype(np.float32)

    monkeypatch.setattr(evaluation, "iterate_predictions", predictions)
    report = evaluation.evaluate_model(object(), split, split="test", window=32, n_bootstrap=300, seed=5)
    assert report.resampling == "groups (n=3) of 10 images"
    assert [r["group"] for r in report.per_image] == ["TCGA-AA-0000"] * 4 + ["TCGA-AA-0001"] * 4 + ["slide-x"] * 2
    stack = np.asarray([confusion_matrix(np.argmax(p, 0), m, 2) for _, _, m, p in
                        predictions(None, split, range(10))])[None]
    expected = hierarchical_intervals(stack, resolve_groups(names, groups), 300, seed=5)
    assert report.intervals == expected
    assert report.to_dict()["ci_resampling"] == report.resampling and "CI: bootstrap over groups" in report.table()
