"""``train`` and ``evaluate`` on the command line: outputs, resume, metrics files, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pfmseg_engine.checkpoint import read_checkpoint
from pfmseg_engine.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"



@pytest.fixture
def config_file(tmp_path) -> Path:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "msk").mkdir()
    rng = np.random.default_rng(1)
    entries = []
    for i in range(8):  # splits never share an image: 3 train, 2 val, 2 test with masks, 1 without
        image = rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(image).save(data / "img" / f"{i}.png")
        Image.fromarray((image[..., 2] > 127).astype(np.uint8), mode="L").save(data / "msk" / f"{i}.png")
        entries.append({"image_path": f"img/{i}.png", "mask_path": f"msk/{i}.png"})
    test = [*entries[5:7], {"image_path": "img/7.png", "mask_path": None}]
    (data / "dataset.json").write_text(json.dumps(
        {"num_classes": 2, "class_names": ["other", "blue"],
         "data": {"train": entries[:3], "val": entries[3:5], "test": test}}))
    config = {
        "dataset": {"json_file": "data/dataset.json"},  # relative to the config file
        "system": {"num_workers": 0, "device": "cpu"},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"},
                  "cnn_adapter": {"channels": [8, 8, 16]}},
        "training": {"batch_size": 2, "epochs": 1, "augmentation": {"RandomResizedCropSize": 32}},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": "cli"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_resume_and_evaluate(config_file, tmp_path, capsys):
    assert main(["train", "--config", str(config_file), "--no-progress"]) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "logs" / "cli"
    assert "completed: 1 epochs" in out and str(experiment) in out
    last = experiment / "checkpoints" / "last.pt"
    assert read_checkpoint(last)["training_state"]["epoch"] == 1

    # resume with more epochs via --options (dotted keys, YAML-typed values)
    assert main(["train", "--config", str(config_file), "--resume", str(last), "--no-progress",
                 "--options", "training.epochs=2", "visualization.save_interval=1"]) == 0
    assert read_checkpoint(last)["training_state"]["epoch"] == 2
    rows = json.loads((experiment / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]

    eval_dir = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(experiment), "--input_json", str(tmp_path / "data" / "dataset.json"),
                 "--split", "test", "--output_dir", str(eval_dir), "--device", "cpu", "--n_bootstrap", "50",
                 "--save_vis"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "95% CI" in out and "blue" in out
    assert "1 images without mask were not scored" in out
    report = json.loads((eval_dir / "metrics.json").read_text())
    assert report["split"] == "test" and len(report["per_image"]) == 2
    assert 0.0 <= report["metrics"]["Mean_Dice"] <= 1.0
    low, high = report["confidence_intervals"]["mIoU"]
    assert low <= report["metrics"]["mIoU"] <= high
    with open(eval_dir / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert table[0].keys() == {"metric", "value", "ci_low", "ci_high"}
    assert any(r["metric"] == "IoU_Class_1 (blue)" for r in table)
    assert len(list((eval_dir / "visualizations").glob("*.png"))) == 2


def test_config_errors_print_one_line_and_exit_2(config_file, capsys):
    assert main(["train", "--config", str(config_file), "--options", "training.lerning_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown config key 'training.lerning_rate'. Did you mean 'training.learning_rate'")
    assert "Traceback" not in err

    assert main(["train", "--config", str(config_file), "--options",
                 "training.augmentation.RandomResizedCropSize=40"]) == 2
    assert "nearest valid sizes: 32 or 48" in capsys.readouterr().err

    assert main(["train", "--config", str(config_file), "--options", "model.emb_dim=384"]) == 2
    assert "set emb_dim: 48" in capsys.readouterr().err


def test_evaluate_refuses_a_dataset_with_other_classes(config_file, tmp_path, capsys):
    assert main(["train", "--config", str(config_file), "--no-progress"]) == 0
    other = tmp_path / "data" / "other.json"
    data = json.loads((tmp_path / "data" / "dataset.json").read_text())
    other.write_text(json.dumps({**data, "num_classes": 3, "class_names": ["a", "b", "c"]}))
    code = main(["evaluate", "--checkpoint", str(tmp_path / "logs" / "cli" / "checkpoints" / "best.pt"),
                 "--input_json", str(other), "--split", "val", "--device", "cpu"])
    assert code == 2
    assert "has 3 classes but checkpoint" in capsys.readouterr().err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 2\nmodle:\n  pfm_name: uni_v1\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "pfmseg_engine", "train", "--config", str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Unknown config key 'modle'. Did you mean 'model'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_tells_how_to_resume(config_file, tmp_path, capsys, monkeypatch):
    assert main(["train", "--config", str(config_file), "--no-progress"]) == 0
    capsys.readouterr()
    from pfmseg_engine.jobs import FineTune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FineTune, "run", interrupted)  # what the command trains through
    last = tmp_path / "logs" / "cli" / "checkpoints" / "last.pt"
    assert main(["train", "--config", str(config_file), "--no-progress", "--resume", str(last)]) == 130
    err = capsys.readouterr().err
    assert f"--resume {last}" in err


def test_train_over_seeds_runs_through_the_fine_tune_job(config_file, tmp_path, capsys, monkeypatch):
    from pfmseg_engine.jobs import FineTune
    from pfmseg_engine.jobs.finetune import Epoch
    from pfmseg_engine.training import SeedsResult

    seen: list[object] = []
    outcomes = []
    run = FineTune.run

    def spied(self, callback=None):
        outcome = run(self, seen.append)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(FineTune, "run", spied)
    assert main(["train", "--config", str(config_file), "--no-progress", "--options", "system.seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "logs" / "cli"
    assert "seed 0: completed, 1 epochs" in out and "seed 1: completed, 1 epochs" in out
    assert f"summary: {experiment / 'seeds_summary.csv'}" in out
    [outcome] = outcomes
    assert isinstance(outcome.result, SeedsResult) and list(outcome.result.runs) == [0, 1]
    assert outcome.status == "completed" and outcome.model is None  # one model per seed, none left behind
    epochs = [event for event in seen if isinstance(event, Epoch)]
    assert len(epochs) == 2  # one epoch of each seed's run, in turn
    assert all((experiment / f"seed_{s}" / "checkpoints" / "last.pt").is_file() for s in (0, 1))
