"""The application layer: each workflow is one job with one settings object, whichever front end runs it.

The same slide and model must get the same plan and output fingerprint from the CLI (its flags over the
settings), from Python (``predict_slide``'s defaults) and from the settings the napari plugin uses, so each
reuses the others' output instead of refusing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.cli import build_parser
from pfmseg_engine.commands.infer import cohort_settings, prediction_settings
from pfmseg_engine.errors import ConfigError
from pfmseg_engine.inference import plan_slide, predict_slide
from pfmseg_engine.inference.slide import model_fingerprint
from pfmseg_engine.jobs import (
    ChunkDone,
    CohortSettings,
    FineTune,
    FineTuneSettings,
    ModelReady,
    Planned,
    PredictionSettings,
    SlidePrediction,
    Stage,
    Status,
    Step,
)
from pfmseg_engine.slides import open_slide
from test_cohort_support import tree
from test_wsi_support import PixelModel, random_image

MPP = 1.0


@pytest.fixture
def slide_png(tmp_path) -> Path:
    path = tmp_path / "slide.png"
    Image.fromarray(random_image(300, 420, seed=5)).save(path)
    return path


def cli_args(*flags: str):
    return build_parser().parse_args(["infer", "--checkpoint", "unused.pt", "--output_dir", "unused", *flags])


# ---- settings ------------------------------------------------------------------------------------
def test_overrides_keep_defaults_for_none_and_refuse_unknown_names():
    base = PredictionSettings()
    assert base.with_overrides(chunk=None, window=None) == base
    assert base.with_overrides(chunk=256).chunk == 256 and base.chunk == PredictionSettings().chunk
    with pytest.raises(ConfigError, match=r"Unknown prediction setting 'chunk_size'.*chunk"):
        base.with_overrides(chunk_size=256)
    with pytest.raises(ConfigError, match="Unknown export 'tiff'"):
        PredictionSettings(exports=("tiff",))
    cohort = CohortSettings().with_overrides(retries=0, chunk=128, overwrite=True)
    assert (cohort.retries, cohort.prediction.chunk, cohort.prediction.overwrite) == (0, 128, True)
    assert FineTuneSettings().with_overrides(epochs=2, seed=None) == FineTuneSettings(epochs=2)


def test_cli_flags_left_out_are_the_settings_defaults():
    assert prediction_settings(cli_args()) == PredictionSettings()
    given = prediction_settings(cli_args("--chunk_size", "256", "--no-tissue", "--batch_size", "2"))
    assert (given.chunk, given.tissue, given.batch_size) == (256, False, 2)
    assert cohort_settings(cli_args("--retries", "0")).retries == 0
    assert cohort_settings(cli_args()).retries == CohortSettings().retries


def test_the_cli_names_its_own_flag_for_a_roi_without_tissue_detection():
    with pytest.raises(ConfigError, match="--no-tissue"):
        prediction_settings(cli_args("--no-tissue", "--tissue_roi", "roi.geojson"))


# ---- one plan and fingerprint from every front end -------------------------------------------------
def test_cli_python_and_plugin_settings_plan_the_same_run(slide_png, tmp_path):
    model = PixelModel()
    out = tmp_path / "out"
    with open_slide(slide_png, mpp=MPP) as slide:
        python = plan_slide(slide, model, None, output_dir=out)  # what predict_slide plans by default
    cli = SlidePrediction(model, slide_png, out, prediction_settings(cli_args()).with_overrides(mpp=MPP)).plan()
    plugin = SlidePrediction(model, slide_png, out, PredictionSettings().with_overrides(mpp=MPP)).plan()
    weights = model_fingerprint(model)
    for plan in (cli, plugin):
        assert plan.fingerprint(weights) == python.fingerprint(weights)
        assert (plan.window, plan.stride, plan.chunk, plan.shape) == (python.window, python.stride, python.chunk,
                                                                        python.shape)
        assert [c.index for c in plan.finish_order] == [c.index for c in python.finish_order]


def test_each_front_end_reuses_the_others_output(slide_png, tmp_path):
    model = PixelModel()
    out = tmp_path / "out"
    first = predict_slide(model, slide_png, out, mpp=MPP, tissue=False)
    before = tree(first.path)
    plugin = SlidePrediction(model, slide_png, out, PredictionSettings(tissue=False, mpp=MPP)).run()
    assert plugin.status == "reused" and plugin.chunks_run == 0
    cohort = run_cli_cohort(model, slide_png, out, "--no-tissue", "--mpp", str(MPP))
    assert [r.status for r in cohort.records] == ["reused"]
    assert tree(first.path) == before


def test_an_int_from_python_and_a_float_from_the_cli_write_byte_identical_stores(slide_png, tmp_path):
    model = PixelModel()
    python = predict_slide(model, slide_png, tmp_path / "python", mpp=1, tissue=False, target_mpp=2, overlap=0)
    cohort = run_cli_cohort(model, slide_png, tmp_path / "cli", "--no-tissue", "--mpp", "1.0", "--target_mpp", "2.0",
                            "--overlap", "0.0")
    [record] = cohort.records
    assert record.status == "done" and record.result is not None
    assert python.mpp == record.result.mpp == 2.0
    assert tree(python.path) == tree(record.result.path)  # the settings are recorded as 2.0 and 0.0 by both
    assert PredictionSettings(target_mpp=2, overlap=0).to_dict() == PredictionSettings(target_mpp=2.0,
                                                                                       overlap=0.0).to_dict()
    assert isinstance(PredictionSettings(target_mpp=2).target_mpp, float)


def run_cli_cohort(model, slide, out, *flags):
    from pfmseg_engine.distributed import run_cohort

    args = cli_args("--slide", str(slide), *flags)
    settings = cohort_settings(args).with_overrides(progress=False, summary=False)
    return run_cohort("unused.pt", [slide], out, settings, model=model)


# ---- events, cancel, resume, outcome -----------------------------------------------------------------
def test_cancel_stops_after_the_current_chunk_and_the_rerun_resumes_byte_identical(slide_png, tmp_path):
    settings = PredictionSettings(tissue=False, mpp=MPP, window=64, chunk=128)
    clean = SlidePrediction(PixelModel(), slide_png, tmp_path / "clean", settings).run()
    job = SlidePrediction(PixelModel(), slide_png, tmp_path / "out", settings)
    events = job.iter_run()
    assert isinstance(next(events), Planned)
    first = next(events)
    assert isinstance(first, ChunkDone)
    job.cancel()
    with pytest.raises(StopIteration) as stop:
        next(events)
    cancelled = stop.value.value
    assert cancelled.status == "cancelled" and cancelled.chunks_run == 1 and job.outcome is cancelled
    assert not cancelled.path.exists() and job.plan().partial.exists()
    seen = []
    resumed = SlidePrediction(PixelModel(), slide_png, tmp_path / "out", settings).run(seen.append)
    assert resumed.status == "done" and resumed.result is not None and resumed.result.resumed
    assert sum(isinstance(e, ChunkDone) and not e.chunk.computed for e in seen) == 1  # the chunk kept
    assert resumed.chunks_run == clean.chunks_run - 1
    assert tree(resumed.path) == tree(clean.path)


def test_the_outcome_is_typed(slide_png, tmp_path):
    seen = []
    settings = PredictionSettings(tissue=False, mpp=MPP, exports=("geojson",))
    outcome = SlidePrediction(PixelModel(), slide_png, tmp_path, settings).run(seen.append)
    assert outcome.status == "done" and outcome.path == tmp_path / "slide.ome.zarr" and outcome.path.is_dir()
    assert [e.name for e in seen if isinstance(e, Stage)] == ["export", "measure"]
    assert outcome.exports == (tmp_path / "slide.geojson",) and outcome.exports[0].is_file()
    assert outcome.measurements == tmp_path / "slide_measurements.csv" and outcome.measurements.is_file()
    assert outcome.measurement_rows and all(isinstance(row, dict) for row in outcome.measurement_rows)
    assert outcome.plan_summary.startswith("slide: 420x300 px")
    again = SlidePrediction(PixelModel(), slide_png, tmp_path, settings, new_name=True).plan()
    assert again.name == "slide-2"  # never reuses or overwrites a finished output when asked


# ---- fine-tuning -------------------------------------------------------------------------------------
def test_fine_tuning_on_annotations_yields_events_and_keeps_the_best_weights(tmp_path):
    from pfmseg_engine import build_model
    from test_training_api import MODEL, scribbles

    image, labels = scribbles()
    settings = FineTuneSettings(epochs=1, batch_size=2, samples_per_epoch=4, val_fraction=0.25, device="cpu")
    job = FineTune.on_annotations(None, [image], [labels], settings, output_dir=tmp_path / "run",
                                  build=lambda: build_model(MODEL))
    events = []
    outcome = job.run(events.append)
    assert [e.text for e in events if isinstance(e, Status)][:2] == ["building the model", "indexing annotations"]
    assert sum(isinstance(e, ModelReady) for e in events) == 1
    assert sum(isinstance(e, Step) for e in events) == 2  # 4 samples in batches of 2
    assert outcome.status == "completed" and outcome.epochs == 1 and outcome.restored == "best epoch 1"
    assert outcome.output_dir == tmp_path / "run" and not outcome.model.training
    assert np.isfinite(outcome.history[-1]["train_loss"])
