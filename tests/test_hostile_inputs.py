"""Hostile and stale inputs end in one clear line, never a traceback, and never cost a finished run.

GeoJSON with NaN/Infinity coordinates or absurd nesting, ``.npy`` masks holding (pickled) objects, a tissue
ROI off the slide, training into a folder that holds a run, and names that a spreadsheet would run as
formulas.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pfmseg_engine import csvsafe
from pfmseg_engine.cli import main
from pfmseg_engine.errors import ConfigError, DataError
from pfmseg_engine.training.outputs import check_run_dir, new_run_dir
from testdata import CMU

CLASSES = ("background", "tumor")


def one_error_line(err: str) -> str:
    """The single ``error:`` line of a CLI failure (anything else on stderr is logging, never a traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight model saved the way training saves it."""
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, class_names=CLASSES,
                         tuning=TuningConfig(strategy="cnn_adapter"), head="multilevel", input_size=64)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "best.pt"
    save_checkpoint(path, build_model(config))
    return path


def write_config(tmp_path: Path, name: str | None = "cli", dataset: Path | None = None) -> Path:
    """The tiny training config of test_cli_train (``name`` None: no experiment_name)."""
    config = {
        "system": {"num_workers": 0, "device": "cpu"},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"},
                  "cnn_adapter": {"channels": [8, 8, 16]}},
        "training": {"batch_size": 2, "epochs": 1, "augmentation": {"RandomResizedCropSize": 32}},
        "logging": {"log_dir": str(tmp_path / "logs"), "plot_history": False},
        "visualization": {"save_interval": 1, "num_vis_samples": 1},
    }
    if name is not None:
        config["logging"]["experiment_name"] = name
    if dataset is not None:
        config["dataset"] = {"json_file": str(dataset)}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_dataset(root: Path, mask_of=None) -> Path:
    """Three train and two val 40 x 44 images with masks (``mask_of(i, mask)`` may write another file)."""
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    rng = np.random.default_rng(1)
    entries = []
    for i in range(5):
        image = rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        mask = (image[..., 2] > 127).astype(np.uint8)
        written = mask_of(i, mask) if mask_of else None
        if written is None:
            Image.fromarray(mask, mode="L").save(root / "msk" / f"{i}.png")
            written = f"msk/{i}.png"
        entries.append({"image_path": f"img/{i}.png", "mask_path": written})
    (root / "dataset.json").write_text(json.dumps(
        {"num_classes": 2, "class_names": list(CLASSES), "data": {"train": entries[:3], "val": entries[3:]}}))
    return root / "dataset.json"


# --- GeoJSON ----------------------------------------------------------------------------------------------
def _polygon_text(x: str) -> str:
    return ('{"type": "Feature", "properties": {"classification": {"name": "tumor"}}, "geometry": {"type": "Polygon", '
            f'"coordinates": [[[10, 10], [{x}, 10], [200, 200], [10, 200], [10, 10]]]}}}}')


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_geojson_coordinates_are_one_line_naming_file_and_feature(tmp_path, capsys, value):
    bad = tmp_path / "bad.geojson"  # Python's JSON reader accepts these literals; GEOS does not
    bad.write_text('{"type": "FeatureCollection", "features": [' + _polygon_text("200") + ", "
                   + _polygon_text(value) + "]}")
    code = main(["train", "--config", str(write_config(tmp_path)), "--slides", str(CMU), "--annotations", str(bad),
                 "--train_mpp", "4", "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert f"{bad}, feature 1" in line and "not a finite number" in line


def test_absurdly_nested_geojson_is_one_line_naming_the_file(tmp_path, capsys):
    deep = tmp_path / "deep.geojson"
    depth = 200_000
    deep.write_text('{"type": "FeatureCollection", "features": [' + "[" * depth + "]" * depth + "]}")
    code = main(["train", "--config", str(write_config(tmp_path)), "--slides", str(CMU), "--annotations", str(deep),
                 "--train_mpp", "4", "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and str(deep) in line and "nests" in line


def test_a_geos_failure_names_the_feature(monkeypatch):
    """Whatever GEOS refuses while a geometry is built or repaired becomes a DataError naming the feature."""
    import shapely
    from shapely.errors import GEOSException

    from pfmseg_engine.annotations import read_geojson

    def refuse(*args, **kwargs):
        raise GEOSException("TopologyException: side location conflict")

    monkeypatch.setattr(shapely, "make_valid", refuse)
    bowtie = {"type": "Feature", "properties": {"classification": {"name": "tumor"}},
              "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}}
    with pytest.raises(DataError, match=r"^x\.geojson, feature 0: its geometry cannot be built \(TopologyException"):
        read_geojson([bowtie], name="x.geojson")


# --- masks --------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this touches a file: proof that a pickle was (or was not) run."""

    marker: Path

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_an_npy_mask_of_objects_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "pickle_ran"
    payload = _Payload()
    payload.marker = marker

    def objects_for_the_first(i, mask):
        if i:
            return None
        np.save(tmp_path / "data" / "msk" / "0.npy", np.array([[payload, 1]], dtype=object), allow_pickle=True)
        return "msk/0.npy"

    dataset = write_dataset(tmp_path / "data", objects_for_the_first)
    code = main(["train", "--config", str(write_config(tmp_path, name=None, dataset=dataset)), "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert str(tmp_path / "data" / "msk" / "0.npy") in line and "object" in line
    assert not marker.exists()  # the pickle inside was never run
    assert not (tmp_path / "logs").exists()  # a run that fails before writing leaves no empty run folder


def test_npy_masks_of_numbers_still_load(tmp_path):
    from pfmseg_engine.data.images import image_size
    from pfmseg_engine.data.masks import read_mask_file

    path = tmp_path / "m.npy"
    np.save(path, np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8))
    assert read_mask_file(path).tolist() == [[0, 1, 1], [1, 0, 0]] and image_size(path) == (2, 3)
    np.save(path, np.array([["a", "b"]]))
    with pytest.raises(DataError, match=r"m\.npy' holds <U1 values, not numbers"):
        image_size(path)


# --- tissue ROI -----------------------------------------------------------------------------------------
def test_a_tissue_roi_off_the_slide_is_an_error_naming_both_extents(checkpoint, tmp_path, capsys):
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [[[5000, 100], [5400, 100], [5400, 300], [5000, 100]]]}}]}))
    for extra in (["--dry_run"], ["--target_mpp", "8", "--input_size", "64"]):  # the plan, and the run
        code = main(["infer", "--slide", str(CMU), "--checkpoint", str(checkpoint), "--output_dir",
                     str(tmp_path / "out"), "--tissue_roi", str(roi), *extra])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2
        assert f"'{roi}' lies at x 5000..5400, y 100..300" in line and "is 2220 x 2967 level-0 px" in line
    assert not list((tmp_path / "out").glob("*.ome.zarr"))


# --- training into a folder that holds a run ------------------------------------------------------------
def test_train_refuses_a_folder_holding_a_run_and_overwrite_leaves_nothing_stale(tmp_path, capsys):
    config = write_config(tmp_path, dataset=write_dataset(tmp_path / "data"))
    run = tmp_path / "logs" / "cli"
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    best = run / "checkpoints" / "best.pt"
    first = best.read_bytes()
    stale = [run / "checkpoints" / "eval_test" / "metrics.json", run / "visualizations" / "epoch_007_sample_00.png",
             run / "seeds_summary.csv"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("from the earlier run")
    notes = run / "notes.txt"  # not a run output: never removed
    notes.write_text("mine")
    capsys.readouterr()

    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run} already holds a training run" in line and "--resume" in line and "--overwrite" in line
    assert best.read_bytes() == first and all(p.exists() for p in stale)

    assert main(["train", "--config", str(config), "--no-progress", "--overwrite", "--resume", str(run)]) == 2
    assert "give one of them" in one_error_line(capsys.readouterr().err)

    assert main(["train", "--config", str(config), "--no-progress", "--overwrite"]) == 0
    assert best.is_file() and not any(p.exists() for p in stale) and notes.read_text() == "mine"
    assert not (run / "checkpoints" / "eval_test").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["logging"]["overwrite"] is False  # acts once

    # resuming the run that is there is always allowed
    assert main(["train", "--config", str(config), "--no-progress", "--resume", str(run),
                 "--options", "training.epochs=2"]) == 0


def test_unnamed_runs_get_folders_of_their_own(tmp_path, capsys):
    config = write_config(tmp_path, name=None, dataset=write_dataset(tmp_path / "data"))
    for _ in range(2):
        assert main(["train", "--config", str(config), "--no-progress"]) == 0
    runs = sorted((tmp_path / "logs").iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r"run-\d{8}-\d{6}-\d{3}", r.name) for r in runs)
    assert all((r / "checkpoints" / "best.pt").is_file() for r in runs)
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["logging"]["experiment_name"] == runs[0].name
    out = capsys.readouterr().out
    assert all(f"outputs: {r}" in out for r in runs)
    # resuming an unnamed run continues in its own folder
    last = runs[1] / "checkpoints" / "last.pt"
    assert main(["train", "--config", str(config), "--no-progress", "--resume", str(last),
                 "--options", "training.epochs=2"]) == 0
    assert sorted((tmp_path / "logs").iterdir()) == runs
    assert [r["epoch"] for r in json.loads((runs[1] / "history.json").read_text())] == [1, 2]


def test_new_run_dir_never_hands_out_a_taken_folder(tmp_path, monkeypatch):
    import pfmseg_engine.training.outputs as outputs

    monkeypatch.setattr(outputs.time, "strftime", lambda fmt: "20250101-120000")  # every call in the same second
    (tmp_path / "run-20250101-120000-000").mkdir()
    made = [new_run_dir(tmp_path) for _ in range(2)]
    assert [m.name for m in made] == ["run-20250101-120000-001", "run-20250101-120000-002"]
    assert all(m.is_dir() for m in made)


def test_seed_runs_count_as_a_run_and_overwrite_removes_only_run_outputs(tmp_path):
    folder = tmp_path / "exp"
    ours = ["seed_0/checkpoints/best.pt", "seed_0/history.csv", "seed_0/checkpoints/eval_test/metrics.json",
            "seeds_summary.json", "seeds_summary.csv", "config.yaml", "training.log"]
    theirs = ["seed_data/images.txt", "notes.md", "checkpoints_old/x.pt"]
    for name in ours + theirs:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    with pytest.raises(ConfigError, match=r"already holds a training run \(seed_0/checkpoints/best\.pt\)"):
        check_run_dir(folder, resume=False, overwrite=False)
    check_run_dir(folder, resume=True, overwrite=False)  # resuming: nothing is touched
    assert all((folder / name).exists() for name in ours)
    check_run_dir(folder, resume=False, overwrite=True)
    assert not any((folder / name).exists() for name in ours) and not (folder / "seed_0").exists()
    assert all((folder / name).exists() for name in theirs)


def test_overwrite_removes_nothing_from_a_folder_without_a_run(tmp_path):
    """Checkpoints of the user's own (backbone weights) are not a run: nothing to refuse, nothing removed."""
    folder = tmp_path / "exp"
    mine = [folder / "checkpoints" / "backbone.pt", folder / "visualizations" / "figure.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    check_run_dir(folder, resume=False, overwrite=False)
    check_run_dir(folder, resume=False, overwrite=True)
    assert all(path.read_text() == "mine" for path in mine)


def test_overwrite_unlinks_a_linked_checkpoints_folder_and_keeps_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "best.pt").write_text("not this run's")
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "config.yaml").write_text("x")
    (folder / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError, match="already holds a training run"):
        check_run_dir(folder, resume=False, overwrite=False)
    check_run_dir(folder, resume=False, overwrite=True)
    assert not (folder / "checkpoints").exists() and (elsewhere / "best.pt").read_text() == "not this run's"


@pytest.mark.parametrize("name", ["..", ".", "/tmp", "a/../.."])
def test_an_experiment_name_must_stay_inside_the_log_folder(tmp_path, name):
    from dataclasses import replace

    from pfmseg_engine.training.config import TrainConfig

    cfg = TrainConfig()
    cfg = replace(cfg, logging=replace(cfg.logging, log_dir=str(tmp_path / "logs"), experiment_name=name))
    with pytest.raises(ConfigError, match=r"must name a folder inside logging\.log_dir"):
        _ = cfg.output_dir
    assert replace(cfg, logging=replace(cfg.logging, experiment_name="run_a")).output_dir == tmp_path / "logs" / "run_a"


def test_measurements_read_back_give_the_names_as_written(tmp_path):
    from pfmseg_engine.annotations.measurements import read_measurements

    path = tmp_path / "m.csv"
    with path.open("w", newline="") as handle:
        csvsafe.writer(handle).writerows([["slide", "class", "+ve cells area_mm2"], ["=x", "-cmd", "-0.5"]])
    [row] = read_measurements(path)
    assert row == {"slide": "=x", "class": "-cmd", "+ve cells area_mm2": -0.5}


# --- CSV formula injection ------------------------------------------------------------------------------
def test_csv_cells_that_would_run_as_formulas_are_neutralised_and_numbers_are_not():
    cells = ["=1+1", "+SUM(A1)", "-cmd", "@A1", "\tx", "\rx", "plain", -1.5, -3, "-0.25", "+2e-3", "-inf", "", None]
    assert [csvsafe.neutralise(cell) for cell in cells] == [
        "'=1+1", "'+SUM(A1)", "'-cmd", "'@A1", "'\tx", "'\rx", "plain", -1.5, -3, "-0.25", "+2e-3", "-inf", "", None]
    buffer = io.StringIO()
    csvsafe.writer(buffer, lineterminator="\n").writerows([["-1+2", -1.5, "-0.25"], ["@x", 2, "y"]])
    assert list(csv.reader(io.StringIO(buffer.getvalue()))) == [["'-1+2", "-1.5", "-0.25"], ["'@x", "2", "y"]]
    buffer = io.StringIO()
    writer = csvsafe.DictWriter(buffer, fieldnames=["name", "value"], lineterminator="\n")
    writer.writeheader()
    writer.writerows([{"name": "=HYPERLINK(\"x\")", "value": -7}])
    assert list(csv.DictReader(io.StringIO(buffer.getvalue()))) == [{"name": "'=HYPERLINK(\"x\")", "value": "-7"}]


def test_a_manifest_name_cannot_inject_formulas_into_summary_or_measurements(checkpoint, tmp_path):
    name = '=HYPERLINK("x")'
    manifest = tmp_path / "cohort.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["slide_path", "name", "region"], [str(CMU), name, "0 0 512 512"]])
    out = tmp_path / "out"
    assert main(["infer", "--slide", str(manifest), "--checkpoint", str(checkpoint), "--output_dir", str(out),
                 "--target_mpp", "4.0", "--input_size", "64"]) == 0
    [summary] = list(csv.DictReader((out / "summary.csv").open()))
    assert summary["name"] == "'" + name and summary["status"] == "done"
    cohort = list(csv.DictReader((out / "measurements.csv").open()))
    assert {row["slide"] for row in cohort} == {"'" + name}
    assert all(float(row["tissue_area_mm2"]) >= 0 for row in cohort)  # numbers stay numbers
