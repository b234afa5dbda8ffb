"""``compare --checkpoints``: already trained models ranked beside the trained rows, scored as they are.

A checkpoint row must score exactly what :func:`~pfmseg_engine.compare.score_model` gives for the loaded
model on the comparison's images, be rescored only when the file's content changes, and be refused with
one clear error when it predicts other classes than the comparison scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pfmseg_engine.cli import main
from test_compare import count_training, read_rows, write_config


@pytest.fixture(scope="module")
def trained_checkpoint(slide_tile_dataset, tmp_path_factory) -> tuple[Path, float]:
    """A tiny kaiko-vits16 (frozen) trained by a one-seed comparison: its best checkpoint and its row's mIoU."""
    root = tmp_path_factory.mktemp("trained")
    config = write_config(root, slide_tile_dataset)
    out = root / "cmp"
    assert main(["compare", "--config", str(config), "--pfms", "kaiko-vits16", "--strategies", "frozen",
                 "--seeds", "1", "--tiny", "--output_dir", str(out), "--n_bootstrap", "50",
                 "--throughput_steps", "0", "--no-progress"]) == 0
    (row,) = read_rows(out / "leaderboard.csv")
    return Path(row["checkpoint"]), float(row["mIoU"])


def comparison(config_path: Path, out: Path, **spec):
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training import load_config

    options = {"pfms": (), "tiny": True, "seeds": (0,), "n_bootstrap": 50, "throughput_steps": 0, **spec}
    return Comparison(load_config(str(config_path)), CompareSpec(**options), out)


def direct_score(checkpoint: Path, config) -> dict:
    """:func:`score_model` of the loaded checkpoint on the scoring images of ``config``'s dataset."""
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.compare import CompareData, score_model

    model = load_checkpoint(checkpoint, device="cpu")
    return score_model(model, CompareData.from_seed_json(config).test, config, device="cpu")


def test_a_checkpoint_is_ranked_with_the_trained_rows_and_rescored_only_when_it_changes(
        trained_checkpoint, slide_tile_dataset, tmp_path, monkeypatch):
    import torch

    checkpoint, trained_miou = trained_checkpoint
    copy = tmp_path / "kaiko_frozen.pt"
    copy.write_bytes(checkpoint.read_bytes())
    config = write_config(tmp_path, slide_tile_dataset)
    out = tmp_path / "cmp"
    calls = count_training(monkeypatch)
    result = comparison(config, out, pfms=("lunit_vits8",), strategies=("frozen",), checkpoints=(str(copy),)).run()
    assert len(calls) == 1  # the trained row only: the checkpoint is not retrained

    rows = {row.name: row for row in result.leaderboard.rows}
    assert set(rows) == {"lunit_vits8__frozen", "kaiko_frozen.pt"}
    row = rows["kaiko_frozen.pt"]
    assert row.ok and row.rank in (1, 2) and {r.rank for r in rows.values()} == {1, 2}
    assert (row.pfm, row.strategy, row.train_seconds, row.seeds) == ("kaiko-vits16", "frozen", 0.0, [])
    assert row.note == "checkpoint kaiko_frozen.pt, not retrained" and row.checkpoint == str(copy)
    assert row.ci_resampling == "images (n=2)"  # a fixed model: no seed level to resample
    from pfmseg_engine.training import load_config

    expected = direct_score(copy, load_config(str(config)))
    assert row.metrics["mIoU"] == pytest.approx(expected["metrics"]["mIoU"], abs=1e-12)
    assert row.metrics["mIoU"] == pytest.approx(trained_miou, abs=1e-6)  # what its own training run scored
    csv_row = next(r for r in read_rows(out / "leaderboard.csv") if r["name"] == "kaiko_frozen.pt")
    assert csv_row["pfm"] == "kaiko-vits16" and csv_row["seeds"] == "" and float(csv_row["train_seconds"]) == 0
    assert "checkpoint `kaiko_frozen.pt`" in (out / "leaderboard.md").read_text()
    (scores,) = (out / "checkpoint_scores").glob("kaiko_frozen.pt-*/result.json")
    first = json.loads(scores.read_text())["fingerprint"]

    # the same comparison again: nothing trained, the checkpoint's scores reused without loading it
    import pfmseg_engine.checkpoint as checkpoint_module

    loads = []
    original = checkpoint_module.load_checkpoint

    def counted(path, **options):
        loads.append(path)
        return original(path, **options)

    monkeypatch.setattr(checkpoint_module, "load_checkpoint", counted)
    calls.clear()
    again = comparison(config, out, pfms=("lunit_vits8",), strategies=("frozen",), checkpoints=(str(copy),)).run()
    assert calls == [] and loads == []
    assert {r.name: r.metrics["mIoU"] for r in again.leaderboard.rows} == {n: r.metrics["mIoU"]
                                                                             for n, r in rows.items()}

    # new content under the same name: scored again
    payload = torch.load(copy, map_location="cpu", weights_only=True)
    payload["metadata"] = {**(payload.get("metadata") or {}), "edited": True}
    torch.save(payload, copy)
    comparison(config, out, pfms=("lunit_vits8",), strategies=("frozen",), checkpoints=(str(copy),)).run()
    assert calls == [] and len(loads) == 1
    assert json.loads(scores.read_text())["fingerprint"] != first


def test_a_saved_live_head_is_ranked(tmp_path):
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.compare import CompareSpec, Comparison
    from pfmseg_engine.training.config import TrainConfig
    from test_live_checkpoint import SPLITS, trained_live_head, window_dataset

    live = trained_live_head(tmp_path, 16).save(tmp_path / "live.pt")
    dataset, _ = window_dataset(tmp_path)
    config = TrainConfig.from_model_config(load_checkpoint(live).config, dataset={"json_file": dataset},
                                           system={"device": "cpu", "num_workers": 0})
    result = Comparison(config, CompareSpec(pfms=(), checkpoints=(str(live),), n_bootstrap=50, throughput_steps=0),
                        tmp_path / "cmp").run()
    assert result.status == "completed" and not result.failed
    (row,) = result.leaderboard.rows
    assert (row.name, row.rank, row.strategy, row.n_images) == ("live.pt", 1, "frozen", len(SPLITS["test"]))
    expected = direct_score(live, config)
    assert row.metrics["mIoU"] == pytest.approx(expected["metrics"]["mIoU"], abs=1e-12)
    assert result.leaderboard.winner is row and "--checkpoint " + str(live) in result.leaderboard.next_steps[-1]


def test_a_checkpoint_with_other_classes_is_refused(trained_checkpoint, tmp_path):
    from pfmseg_engine import ConfigError
    from test_live_checkpoint import window_dataset

    checkpoint, _ = trained_checkpoint
    dataset, _ = window_dataset(tmp_path)  # glass, stroma, nuclei; the checkpoint knows the tile classes
    config = write_config(tmp_path, Path(dataset))
    with pytest.raises(ConfigError) as caught:
        comparison(config, tmp_path / "cmp", pfms=("kaiko-vits16",), checkpoints=(str(checkpoint),))
    message = str(caught.value)
    assert str(checkpoint) in message and "glass, stroma, nuclei" in message
    assert "background" in message  # the checkpoint's own classes, named too
    assert not (tmp_path / "cmp" / "runs").exists()  # refused before anything trained


def test_the_cli_flag_ranks_checkpoints(trained_checkpoint, slide_tile_dataset, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained_checkpoint
    other = tmp_path / "elsewhere" / checkpoint.name  # the same file name in another folder
    other.parent.mkdir()
    other.write_bytes(checkpoint.read_bytes())
    config = write_config(tmp_path, slide_tile_dataset)
    out = tmp_path / "cmp"
    calls = count_training(monkeypatch)
    assert main(["compare", "--config", str(config), "--checkpoints", str(checkpoint), str(other), "--seeds", "1",
                 "--output_dir", str(out), "--n_bootstrap", "50", "--throughput_steps", "0", "--no-progress"]) == 0
    assert calls == []
    captured = capsys.readouterr()
    rows = read_rows(out / "leaderboard.csv")
    names = sorted(r["name"] for r in rows)
    assert names == sorted([f"{checkpoint.parent.name}/{checkpoint.name}", f"elsewhere/{checkpoint.name}"])
    assert all(r["status"] == "ok" and r["rank"] and r["note"].endswith("not retrained") for r in rows)
    assert rows[0]["mIoU"] == rows[1]["mIoU"] and rows[1]["vs_best"] == "tied"  # one model, twice
    assert f"elsewhere/{checkpoint.name}" in captured.out and "scored" in captured.err
    payload = json.loads((out / "leaderboard.json").read_text())
    assert payload["winner"]["name"] in names

    assert main(["compare", "--config", str(config), "--output_dir", str(out)]) != 0  # nothing to compare
    assert "--pfms" in capsys.readouterr().err  # the error names the flag that fixes it
