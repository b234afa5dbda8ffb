"""``compare``: every backbone x strategy x seed trained, scored with CIs, ranked, resumable, failures recorded.

Tiny random-weight backbones, 32 px crops and one short epoch on the slide-tile dataset: the numbers are
meaningless, the files, rows, resumption and failure handling are what is tested.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from pfmseg_engine.cli import main

GEOMETRIC_ONLY = {name: {"p": 0.0} for name in ("affine", "elastic", "color_jitter", "hed_jitter",
                                                "brightness_contrast", "gamma", "blur", "noise", "cutout")}


def write_config(tmp_path: Path, dataset: Path, **sections) -> Path:
    config = {
        "dataset": {"json_file": str(dataset)},
        "system": {"num_workers": 0, "device": "cpu"},
        "training": {"batch_size": 4, "epochs": 1, "samples_per_epoch": 4, "use_amp": False,
                     "augmentation": {"RandomResizedCropSize": 32, "zoom": None, "transforms": GEOMETRIC_ONLY}},
        "validation": {"batch_size": 16, "overlap": 0.0},
        "logging": {"plot_history": False},
        "visualization": {"save_predictions": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def count_training(monkeypatch) -> list[str]:
    """Record every training run started (Trainer.iter_fit calls)."""
    from pfmseg_engine.training.trainer import Trainer

    calls: list[str] = []
    original = Trainer.iter_fit

    def counted(self, resume=None):
        calls.append(str(self.output_dir))
        return original(self, resume)

    monkeypatch.setattr(Trainer, "iter_fit", counted)
    return calls


def test_leaderboard_rerun_and_a_failing_combination(slide_tile_dataset, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, slide_tile_dataset)
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config), "--pfms", "kaiko-vits16,lunit_vits8,phikon,unet",
            "--strategies", "frozen,cnn_adapter_small", "--seeds", "2", "--tiny", "--output_dir", str(out),
            "--weights", f"phikon={tmp_path / 'missing.safetensors'}", "--n_bootstrap", "200",
            "--throughput_steps", "1", "--no-progress", "--feature_cache", "on"]
    calls = count_training(monkeypatch)
    assert main(args) == 1  # one combination failed: non-zero, the others finished
    assert len(calls) == 2 * 2 * 2 + 2  # two PFMs x two strategies x two seeds, plus unet (one row) x two seeds
    text = capsys.readouterr()
    assert "failed" in text.err

    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.png", "leaderboard.json"):
        assert (out / name).stat().st_size > 0
    rows = read_rows(out / "leaderboard.csv")
    keys = [(r["pfm"], r["strategy"]) for r in rows]
    assert sorted(keys) == sorted([("kaiko-vits16", "frozen"), ("kaiko-vits16", "cnn_adapter_small"),
                                   ("lunit_vits8", "frozen"), ("lunit_vits8", "cnn_adapter_small"),
                                   ("phikon", "frozen"), ("phikon", "cnn_adapter_small"), ("unet", "full")])
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 5 and [int(r["rank"]) for r in ok] == [1, 2, 3, 4, 5]
    assert [float(r["mIoU"]) for r in ok] == sorted((float(r["mIoU"]) for r in ok), reverse=True)
    for row in ok:
        assert row["seeds"] == "0 1" and row["eval_split"] == "test" and row["n_images"] == "2"
        assert row["ci_resampling"] == "seeds (n=2) > images (n=2)"  # tile names carry no slide or patient
        for metric in ("mIoU", "Mean_Dice", "Pixel_Accuracy", "Dice_background", "Dice_dark"):
            assert float(row[f"{metric}_ci_low"]) <= float(row[metric]) + 1e-9 <= float(row[f"{metric}_ci_high"]) + 2e-9
        assert int(row["trainable_params"]) > 0 and float(row["train_seconds"]) > 0
        assert float(row["inference_windows_per_s"]) > 0
        assert Path(row["checkpoint"]).is_file()
    assert ok[0]["vs_best"] == "best" and all(r["vs_best"] in ("tied", "below") for r in ok[1:])
    for row in ok[1:]:  # the verdict follows the Holm-adjusted p-value of the paired gap
        assert float(row["mIoU_gap_p_holm"]) >= float(row["mIoU_gap_p"])
        assert row["vs_best"] == ("below" if float(row["mIoU_gap_p_holm"]) < 0.05 else "tied")
    frozen = next(r for r in ok if r["pfm"] == "kaiko-vits16" and r["strategy"] == "frozen")
    assert frozen["feature_cache"].startswith("yes")
    assert next(r for r in ok if r["pfm"] == "unet")["feature_cache"].startswith("no")
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["pfm"] for r in failed} == {"phikon"} and all("does not exist" in r["error"] for r in failed)
    assert all(r["rank"] == "" for r in failed)
    markdown = (out / "leaderboard.md").read_text()
    assert "| 1 |" in markdown and "phikon" in markdown and "meaningless" in markdown
    assert "CI: bootstrap over seeds (n=2) > images (n=2)" in markdown and "p (Holm)" in markdown
    payload = json.loads((out / "leaderboard.json").read_text())
    assert payload["winner"]["pfm"] == ok[0]["pfm"] and payload["eval_split"] == "test"
    for seed in (0, 1):
        assert (out / "runs" / "kaiko-vits16__frozen" / f"seed_{seed}" / "result.json").is_file()
        assert (out / "runs" / "phikon__frozen" / f"seed_{seed}" / "error.txt").is_file() or seed == 1

    # the same command again trains nothing: finished runs are reused, the failing one fails again at once
    before = (out / "runs" / "kaiko-vits16__frozen" / "seed_0" / "checkpoints" / "best.pt").stat().st_mtime_ns
    calls.clear()
    assert main(args) == 1
    assert calls == []
    assert (out / "runs" / "kaiko-vits16__frozen" / "seed_0" / "checkpoints" / "best.pt").stat().st_mtime_ns == before
    again = read_rows(out / "leaderboard.csv")
    assert [(r["pfm"], r["strategy"], r["mIoU"]) for r in again] == [(r["pfm"], r["strategy"], r["mIoU"])
                                                                        for r in rows]

    # one more seed: only the new seed trains
    calls.clear()
    assert main([*args[:args.index("--seeds") + 1], "0,1,2", *args[args.index("--seeds") + 2:]]) == 1
    assert sorted(Path(c).name for c in calls) == ["seed_2"] * 5


@pytest.mark.parametrize("protocol", ["frozen_light_decoder", "densebench"])
def test_protocol_presets(protocol, slide_tile_dataset, tmp_path):
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import load_config

    config = write_config(tmp_path, slide_tile_dataset)
    data = yaml.safe_load(config.read_text())
    data["protocol"] = protocol
    if protocol == "densebench":  # keep the preset's own crops and augmentation, at a test size
        del data["training"]["augmentation"]
        data["training"]["augmentation"] = {"RandomResizedCropSize": 32}
    config.write_text(yaml.safe_dump(data))
    train_config = load_config(config, ["training.epochs=1", "system.seeds=[0]"])
    spec = CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen", "cnn_adapter_small"), tiny=True,
                       n_bootstrap=50, throughput_steps=0,
                       feature_cache="on" if protocol == "frozen_light_decoder" else "auto")
    result = Comparison(train_config, spec, tmp_path / "cmp").run()
    rows = {row.strategy: row for row in result.leaderboard.rows}
    frozen = rows["frozen"]
    assert frozen.status == "ok" and frozen.seeds == [0]
    if protocol == "frozen_light_decoder":
        assert frozen.head == "light" and frozen.feature_cache.startswith("yes")
        assert rows["cnn_adapter_small"].status == "failed" and "light" in rows["cnn_adapter_small"].error
        assert result.failed
    else:
        assert frozen.head == "cup" and rows["cnn_adapter_small"].status == "ok"
        assert frozen.feature_cache == "off"  # the seed's area-scale crops and colour jitter: no exact reuse
        assert any("not limited to flips/rotations" in note for note in result.leaderboard.notes)


def test_test_split_without_masks_falls_back_to_val(slide_tile_dataset, tmp_path):
    from pfmseg_engine.compare import CompareData
    from pfmseg_engine.training import load_config

    data = json.loads(slide_tile_dataset.read_text())
    for entry in data["data"]["test"]:
        entry["mask_path"] = None
        entry["image_path"] = str(slide_tile_dataset.parent / entry["image_path"])
    for entry in data["data"]["train"] + data["data"]["val"]:
        for key in ("image_path", "mask_path"):
            entry[key] = str(slide_tile_dataset.parent / entry[key])
    dataset = tmp_path / "no_test_masks.json"
    dataset.write_text(json.dumps(data))
    compare_data = CompareData.from_seed_json(load_config(write_config(tmp_path, dataset)))
    assert compare_data.eval_split == "val" and compare_data.test.num_images() == 1
    assert any("no masks" in note for note in compare_data.notes)


def test_spec_checks_names_and_seeds():
    from pfmseg_engine import ConfigError
    from pfmseg_engine.compare import CompareSpec, parse_seeds

    assert parse_seeds(3) == (0, 1, 2) and parse_seeds("3") == (0, 1, 2) and parse_seeds("0,5") == (0, 5)
    with pytest.raises(ConfigError, match="Did you mean 'phikon'"):
        CompareSpec(pfms=("phikn",))
    with pytest.raises(ConfigError, match="Did you mean 'frozen'"):
        CompareSpec(pfms=("uni_v1",), strategies=("frozn",))
    spec = CompareSpec(pfms="UNI_v1,unet", strategies="frozen,lora")
    assert [str(c) for c in spec.combinations("frozen")] == ["uni_v1 / frozen", "uni_v1 / lora", "unet / full"]


def test_cancel_keeps_finished_runs_and_resumes_the_interrupted_one(slide_tile_dataset, tmp_path, monkeypatch):
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import Callback, CancelToken, load_config

    config = load_config(write_config(tmp_path, slide_tile_dataset, training={"epochs": 2}))
    spec = CompareSpec(pfms=("kaiko-vits16", "unet"), strategies=("frozen",), seeds=(0,), tiny=True,
                       n_bootstrap=50, throughput_steps=0)
    token = CancelToken()

    class CancelInSecondRun(Callback):
        def on_epoch_end(self, trainer, info):
            if "unet" in str(trainer.output_dir) and info.epoch == 1:
                token.cancel()

    first = Comparison(config, spec, tmp_path / "cmp", callbacks=[CancelInSecondRun()], cancel=token).run()
    assert first.status == "cancelled"
    assert [r.pfm for r in first.leaderboard.rows if r.ok] == ["kaiko-vits16"]  # ranked and written
    assert "kaiko-vits16" in (tmp_path / "cmp" / "leaderboard.csv").read_text()
    assert not (tmp_path / "cmp" / "runs" / "unet__full" / "seed_0" / "result.json").exists()

    resumed = []
    from pfmseg_engine.training.trainer import Trainer

    original = Trainer.iter_fit
    monkeypatch.setattr(Trainer, "iter_fit", lambda self, resume=None: resumed.append(resume) or original(self, resume))
    second = Comparison(config, spec, tmp_path / "cmp").run()
    assert second.status == "completed" and second.trained == 1
    assert len(resumed) == 1 and resumed[0] is not None and resumed[0].name == "last.pt"
    assert next(r for r in second.runs.values() if r["pfm"] == "unet")["epochs"] == 2
    assert {r.pfm for r in second.leaderboard.rows if r.ok} == {"kaiko-vits16", "unet"}


def test_time_budget_stops_runs_after_an_epoch(slide_tile_dataset, tmp_path):
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import load_config

    config = load_config(write_config(tmp_path, slide_tile_dataset, training={"epochs": 5}))
    spec = CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen",), seeds=(0,), tiny=True, n_bootstrap=50,
                       throughput_steps=0, time_budget_s=0.01)
    result = Comparison(config, spec, tmp_path / "cmp").run()
    [record] = result.runs.values()
    assert record["epochs"] == 1 and record["stopped_by_time_budget"]
    assert result.leaderboard.winner.pfm == "kaiko-vits16"


@pytest.mark.slow
@pytest.mark.realdata
def test_compare_on_real_nuclei(shared_data, tmp_path):
    """Two backbones x two strategies x two seeds on MoNuSeg: a complete, ranked leaderboard with CIs."""
    config = write_config(tmp_path, shared_data / "monuseg" / "dataset.json",
                          training={"batch_size": 4, "epochs": 1, "samples_per_epoch": 40, "use_amp": False,
                                    "learning_rate": 0.002, "loss": {"type": "ce_dice"},
                                    "augmentation": {"RandomResizedCropSize": 64, "zoom": None,
                                                     "transforms": GEOMETRIC_ONLY}},
                          validation={"batch_size": 16, "overlap": 0.0, "augmentation": {"ResizedSize": 256}})
    out = tmp_path / "cmp"
    code = main(["compare", "--config", str(config), "--pfms", "kaiko-vits16,lunit_vits8", "--strategies",
                 "frozen,cnn_adapter_small", "--seeds", "2", "--tiny", "--output_dir", str(out),
                 "--n_bootstrap", "200", "--throughput_steps", "1", "--no-progress"])
    assert code == 0
    rows = read_rows(out / "leaderboard.csv")
    assert sorted((r["pfm"], r["strategy"]) for r in rows) == [
        ("kaiko-vits16", "cnn_adapter_small"), ("kaiko-vits16", "frozen"),
        ("lunit_vits8", "cnn_adapter_small"), ("lunit_vits8", "frozen")]
    for row in rows:
        assert row["status"] == "ok" and row["eval_split"] == "test" and row["n_images"] == "4"
        assert 0.0 < float(row["Mean_Dice"]) < 1.0
        for metric in ("mIoU", "Mean_Dice", "Pixel_Accuracy"):
            assert float(row[f"{metric}_ci_low"]) <= float(row[metric]) + 1e-9 <= float(row[f"{metric}_ci_high"]) + 2e-9
    assert (out / "leaderboard.png").stat().st_size > 0


def test_compare_on_whole_slides_with_qupath_annotations(tmp_path, monkeypatch):
    """--slides/--annotations: rows trained on lazily sampled slide patches, scored on held-out annotated squares."""
    from pfmseg_engine.annotations.rasterize import PolygonLabels
    from test_annotations import qupath_export
    from testdata import CMU

    def no_whole_raster(self, *args, **kwargs):
        raise AssertionError("a whole-slide label raster was requested")

    monkeypatch.setattr(PolygonLabels, "__array__", no_whole_raster)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "system": {"num_workers": 0, "device": "cpu"},
        "training": {"batch_size": 2, "epochs": 1, "samples_per_epoch": 4, "use_amp": False,
                     "augmentation": {"RandomResizedCropSize": 32}},
        "validation": {"batch_size": 8}, "logging": {"plot_history": False},
        "visualization": {"save_predictions": False}}))
    out = tmp_path / "cmp"
    code = main(["compare", "--config", str(config), "--pfms", "kaiko-vits16,unet", "--strategies", "frozen",
                 "--seeds", "1", "--tiny", "--output_dir", str(out), "--slides", str(CMU), "--annotations",
                 str(qupath_export(tmp_path)), "--train_mpp", "2.0", "--n_bootstrap", "50",
                 "--throughput_steps", "0", "--no-progress"])
    assert code == 0
    rows = read_rows(out / "leaderboard.csv")
    assert sorted((r["pfm"], r["strategy"]) for r in rows) == [("kaiko-vits16", "frozen"), ("unet", "full")]
    for row in rows:
        assert row["status"] == "ok" and row["eval_split"] == "held-out annotations"
        assert float(row["mIoU_ci_low"]) <= float(row["mIoU"]) <= float(row["mIoU_ci_high"]) + 1e-9
        assert {"Dice_Tissue", "Dice_Glass"} <= set(row)  # the classes come from the QuPath classifications
        assert not row["feature_cache"].startswith("yes")  # whole slides train without the fixed crop set
        # one slide: its squares are resampled, and the leaderboard says the interval is within-slide only
        assert row["ci_resampling"].startswith("seeds (n=1) > images (n=")
        assert row["ci_resampling"].endswith("(all of one slide: within-slide variation only)")
    assert main(["compare", "--config", str(config), "--pfms", "kaiko-vits16", "--output_dir", str(out),
                 "--slides", str(CMU), "--tiny"]) == 2  # a slide without its annotation file: one clear error


class TickingClock:
    """A fake clock: every reading advances it by ``step`` seconds, so time passes only as work is done."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_auto_cache_fills_only_when_it_pays(slide_tile_dataset, tmp_path):
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import load_config

    config = load_config(write_config(tmp_path, slide_tile_dataset))
    spec = CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen",), seeds=(0,), tiny=True, n_bootstrap=20,
                       throughput_steps=0)
    events = []
    comparison = Comparison(config, spec, tmp_path / "cmp")
    run = comparison.iter_run()
    while True:
        try:
            events.append(next(run))
        except StopIteration as done:
            result = done.value
            break
    [row] = result.leaderboard.rows
    # 4 samples of one epoch replace far fewer backbone passes than the crop set's windows: no fill
    assert row.ok and row.feature_cache.startswith("no (filling ") and "live backbone passes" in row.feature_cache
    assert not any(kind == "phase" and value.name == "cache" for kind, value in events)
    phases = [value.name for kind, value in events if kind == "phase"]
    assert "train" in phases and "score" in phases and phases.index("train") < phases.index("score")
    assert row.cache_seconds is not None and "cache_seconds" in (tmp_path / "cmp" / "leaderboard.csv").read_text()

    # a coarse crop grid and more passes over it: the fill pays, is reported window by window, and its time is
    # its own column, not the training's
    many = load_config(write_config(tmp_path, slide_tile_dataset, training={"samples_per_epoch": 128}))
    coarse = CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen",), seeds=(0,), tiny=True, n_bootstrap=20,
                         throughput_steps=0, crop_stride=10_000)
    events = list(_drain(Comparison(many, coarse, tmp_path / "cmp2").iter_run()))
    fills = [value for kind, value in events if kind == "phase" and value.name == "cache"]
    assert fills and fills[-1].done == fills[-1].total <= 128
    [row] = [value for kind, value in events if kind == "leaderboard"][-1].rows
    assert row.feature_cache == "yes (built)" and row.cache_seconds > 0


def _drain(generator):
    while True:
        try:
            yield next(generator)
        except StopIteration:
            return


def test_budget_covers_cache_fill_training_and_scoring(slide_tile_dataset, tmp_path):
    """A fake clock that advances with every reading: runs share the budget, the cache fill counts against
    it, and the runs left when it is spent are not started and say so."""
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import Callback, load_config

    config = load_config(write_config(tmp_path, slide_tile_dataset,
                                      training={"epochs": 50, "samples_per_epoch": 128}))
    clock = TickingClock(0.25)

    class BatchTime(Callback):  # each training batch takes 0.1 s of the fake clock
        def on_step_end(self, trainer, info):
            clock.now += 0.1

    budget = 10.0
    spec = CompareSpec(pfms=("kaiko-vits16", "lunit_vits8", "unet"), strategies=("frozen",), seeds=(0,), tiny=True,
                       n_bootstrap=20, throughput_steps=0, budget_s=budget, crop_stride=10_000)
    result = Comparison(config, spec, tmp_path / "cmp", clock=clock, callbacks=[BatchTime()]).run()
    rows = {row.pfm: row for row in result.leaderboard.rows}
    assert rows["kaiko-vits16"].ok  # the first run always gets its share
    record = result.runs[next(k for k in result.runs if k[0].pfm == "kaiko-vits16")]
    assert record["cache_seconds"] > 0 and record["stopped_by_time_budget"] and record["epochs"] < 50
    not_run = [row for row in result.leaderboard.rows if not row.ok]
    assert not_run and all(row.status == "pending" and "time budget" in row.note for row in not_run)
    assert not result.failed and result.status == "completed"
    # nothing started after the budget: the clock passed it by at most the last run's first epoch and scoring
    assert clock.now < 2 * budget


def test_zero_score_reason_names_the_classes():
    import numpy as np

    from pfmseg_engine.compare import zero_score_reason

    names = ("Tumour", "Stroma", "Necrosis")
    only_stroma = np.array([[0, 30, 0], [0, 0, 0], [0, 12, 0]])  # truth: Tumour, Necrosis; predicted: Stroma
    assert zero_score_reason(only_stroma, names, "held-out annotations") == (
        "predicted only 'Stroma'; held-out annotations contain no 'Stroma' (they hold 'Tumour', 'Necrosis')")
    assert zero_score_reason(np.array([[5, 1, 0], [0, 0, 0], [0, 0, 0]]), names, "x") == ""  # some pixels right
    assert zero_score_reason(np.zeros((3, 3)), names, "the test images") == "predicted nothing on the test images"


def test_rows_of_earlier_calls_join_the_ranking(slide_tile_dataset, tmp_path):
    """A second comparison into the same folder with another backbone ranks the first one's rows too (those
    whose results match the settings they would be trained with), without training them again."""
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import load_config

    config = load_config(write_config(tmp_path, slide_tile_dataset))
    first = Comparison(config, CompareSpec(pfms=("unet",), seeds=(0,), tiny=True, n_bootstrap=20, throughput_steps=0),
                       tmp_path / "cmp").run()
    assert first.trained == 1
    second = Comparison(config, CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen",), seeds=(0,), tiny=True,
                                            n_bootstrap=20, throughput_steps=0), tmp_path / "cmp").run()
    assert second.trained == 1
    assert {(r.pfm, r.strategy) for r in second.leaderboard.rows if r.ok} == {("unet", "full"),
                                                                            ("kaiko-vits16", "frozen")}
    # other settings (here: two epochs) make the earlier row a different experiment: it is left out
    other = load_config(write_config(tmp_path, slide_tile_dataset, training={"epochs": 2}))
    third = Comparison(other, CompareSpec(pfms=("kaiko-vits16",), strategies=("frozen",), seeds=(0,), tiny=True,
                                          n_bootstrap=20, throughput_steps=0), tmp_path / "cmp").run()
    assert [r.pfm for r in third.leaderboard.rows] == ["kaiko-vits16"]
