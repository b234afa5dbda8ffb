"""Cohort runs in one process (API and CLI): failures recorded not fatal, summaries, reruns, retries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pfmseg_engine.cli import main
from pfmseg_engine.distributed import run_cohort
from pfmseg_engine.errors import StorageError
from pfmseg_engine.inference import SlideInferenceConfig, predict_slide
from test_cohort_support import CONFIG, CohortModel, load, manifest, outputs, slide_folder, summary_rows, tree

REGION = "0 0 1024 768"


class Stop(Exception):
    pass


@pytest.fixture
def slides(tmp_path) -> dict[str, Path]:
    return slide_folder(tmp_path)


def cohort_manifest(slides: dict[str, Path], folder: Path) -> Path:
    """CMU and TCGA regions (TCGA has no mpp: the manifest gives it) and the corrupt copy, by relative path."""
    return manifest(folder / "cohort.csv", [
        {"slide_path": "slides/" + slides["cmu"].name, "region": REGION, "name": "cmu"},
        {"slide_path": "slides/" + slides["tcga"].name, "region": "512,512,1024,768", "mpp": "0.5",
         "name": "tcga"},
        {"slide_path": "slides/broken.svs", "region": REGION},
    ])


def test_a_failing_slide_is_recorded_and_the_rest_finish(slides, tmp_path):
    path = cohort_manifest(slides, tmp_path)
    out = tmp_path / "out"
    config = SlideInferenceConfig(**{**CONFIG, "tissue": True})
    seen = []
    cohort = run_cohort("stand-in", [path], out, config, model_loader=load, on_record=seen.append)
    assert [r.status for r in cohort.records] == ["done", "done", "failed"] == [r.status for r in seen]
    cmu, tcga, broken = cohort.records
    assert broken.error.startswith("Cannot open") and "truncated" in broken.error and broken.result is None
    assert cmu.chunks_run == cmu.chunks_total > 0 and cmu.windows > 0 and cmu.windows_per_s > 0
    assert 0 < cmu.tissue_mm2 < 1024 * 768 * 0.499**2 / 1e6 and tcga.tissue_mm2 is not None
    assert sorted(outputs(out)) == ["cmu.ome.zarr", "tcga.ome.zarr"]
    rows = summary_rows(out)
    assert [(r["name"], r["status"]) for r in rows] == [("cmu", "done"), ("tcga", "done"),
                                                        ("broken_x0_y0_1024x768", "failed")]
    assert "truncated" in rows[2]["error"] and rows[0]["output"] == str(out / "cmu.ome.zarr")
    report = json.loads((out / "summary.json").read_text())
    assert report["counts"] == {"done": 2, "reused": 0, "failed": 1, "pending": 0}
    assert "## Failed" in (out / "summary.md").read_text()

    # rerun: finished slides are reused, the broken one is tried again
    again = run_cohort("stand-in", [path], out, config, model_loader=load)
    assert [r.status for r in again.records] == ["reused", "reused", "failed"]
    assert again.records[0].chunks_run == 0 and again.records[0].tissue_mm2 == cmu.tissue_mm2


def test_an_interrupted_slide_resumes_and_matches_a_clean_run(slides, tmp_path):
    config = SlideInferenceConfig(**CONFIG)
    clean = run_cohort("stand-in", [slides["cmu"]], tmp_path / "clean", config, model_loader=load, mpp=None)
    # same slide, stopped after two chunks, then run as part of a cohort
    chunks = []

    def stop(chunk):
        chunks.append(chunk)
        if len(chunks) == 2:
            raise Stop

    with pytest.raises(Stop):
        predict_slide(CohortModel(), slides["cmu"], tmp_path / "out", config, callback=stop)
    cohort = run_cohort("stand-in", [slides["cmu"]], tmp_path / "out", config, model_loader=load)
    [record] = cohort.records
    assert record.status == "done" and record.resumed and 0 < record.chunks_run < record.chunks_total
    assert outputs(tmp_path / "out") == outputs(tmp_path / "clean") and clean.ok


def test_retries(slides, tmp_path, monkeypatch):
    from pfmseg_engine.jobs import prediction as plan_module  # where a slide's job plans it

    real = plan_module.plan_slide
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) % 2:  # every first attempt fails
            raise OSError(5, "Input/output error", "/mnt/nfs/slide.svs")
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "plan_slide", flaky)
    config = SlideInferenceConfig(**CONFIG)
    jobs = [slides["cmu"]]
    assert run_cohort("stand-in", jobs, tmp_path / "a", config, model_loader=load, retries=1).ok
    calls.clear()
    failed = run_cohort("stand-in", jobs, tmp_path / "b", config, model_loader=load, retries=0, summary=False)
    assert failed.records[0].status == "failed" and "input/output error" in failed.records[0].error
    assert not (tmp_path / "b" / "summary.csv").exists()


def test_a_full_output_disk_stops_a_serial_run_with_the_summary_written(slides, tmp_path, monkeypatch):
    from pfmseg_engine.inference import slide as slide_module

    def full(*args, **kwargs):
        raise StorageError("Writing the output failed [ENOSPC]: the disk is full.")

    monkeypatch.setattr(slide_module, "iter_execute_plan", full)  # what a slide job runs its plan with
    with pytest.raises(StorageError, match="disk is full"):
        run_cohort("stand-in", [slides["cmu"], slides["tcga"]], tmp_path / "out", SlideInferenceConfig(**CONFIG),
                   model_loader=load, mpp=0.5)
    rows = summary_rows(tmp_path / "out")
    assert [r["status"] for r in rows] == ["failed", "pending"]  # not retried, not tried on every slide


# ---- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64)))
    return path


def test_cli_cohort_of_folders_globs_and_manifests(checkpoint, slides, tmp_path, capsys):
    folder = slides["cmu"].parent
    other = tmp_path / "more"
    other.mkdir()
    (other / "copy.svs").write_bytes(slides["cmu"].read_bytes())
    listed = manifest(tmp_path / "m.csv", [{"slide_path": "slides/" + slides["tcga"].name, "mpp": "0.5"},
                                           {"slide_path": "more/copy.svs"}])  # also found by the glob
    out = tmp_path / "out"
    args = ["infer", "--slide", str(folder), str(tmp_path / "more" / "*.svs"), str(listed), "--checkpoint",
            str(checkpoint), "--output_dir", str(out), "--target_mpp", "8", "--no-tissue", "--reader", "tiffslide",
            "--device", "cpu", "--retries", "0"]
    assert main(args) == 1  # the broken slide failed; every other one finished
    text = capsys.readouterr().out
    assert "4 slides: 3 done, 1 failed" in text and "failed: broken" in text and "Cannot open" in text
    assert "tried tiffslide (" in text and "; openslide (" not in text  # --reader reached open_slide
    rows = {r["name"]: r for r in summary_rows(out)}
    assert {n: r["status"] for n, r in rows.items()} == {
        "CMU-1-Small-Region": "done", "TCGA-CR-7395-01A-01-TS1": "done", "broken": "failed", "copy": "done"}
    assert sorted(outputs(out)) == ["CMU-1-Small-Region.ome.zarr", "TCGA-CR-7395-01A-01-TS1.ome.zarr",
                                    "copy.ome.zarr"]
    before = {name: tree(out / name) for name in outputs(out)}
    slides["broken"].unlink()  # the rerun: finished slides reused, nothing left to fail
    args[3] = str(folder)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "3 slides: 0 done, 3 reused, 0 failed" in text
    assert {name: tree(out / name) for name in outputs(out)} == before
