"""The embedded demo: sample slide, derived annotation, and the end-to-end command."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from pfmseg_engine.cli import main
from pfmseg_engine.demo import DEMO_MPP, demo_annotation, demo_image, demo_slide_path
from pfmseg_engine.slides import open_slide


def test_demo_slide_is_a_pyramidal_tiff_with_resolution(tmp_path):
    path = demo_slide_path(tmp_path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and len(page.subifds or []) == 2
    slide = open_slide(path)
    try:
        assert slide.mpp == pytest.approx(DEMO_MPP)
        assert [lvl.shape[:2] for lvl in slide.levels] == [(512, 512), (256, 256), (128, 128)]
        assert np.array_equal(np.asarray(slide.levels[0].compute()), demo_image())
    finally:
        slide.close()
    assert demo_slide_path(tmp_path) == path  # reused, not rewritten


def test_demo_annotation_separates_stains():
    image = demo_image()
    labels = demo_annotation(image)
    assert set(np.unique(labels)) == {0, 1, 2}
    means = [image[labels == k].mean(axis=0) for k in range(3)]
    brightness = [m.mean() for m in means]
    assert brightness[0] > brightness[1] and brightness[0] > brightness[2]  # background is brightest
    # DAB is brown: red over blue; haematoxylin-counterstained tissue is bluish
    assert means[2][0] - means[2][2] > means[1][0] - means[1][2] + 20


@pytest.mark.slow
def test_demo_command_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--output_dir", str(tmp_path), "--epochs", "2", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for expected in ("mIoU", "held-out half", "whole slide", "majority class", "randomly initialised",
                     "napari --plugin pfmseg"):
        assert expected in out
    assert (tmp_path / "demo_overlay.png").is_file()
    assert (tmp_path / "training" / "training_history.png").is_file()
    assert (tmp_path / "training" / "checkpoints" / "best.pt").is_file()
    zarr_path = next(tmp_path.glob("*.ome.zarr"))
    from pfmseg_engine.inference import LabelOutput

    output = LabelOutput(zarr_path)
    labels = np.asarray(output.levels[0][:])
    assert labels.shape == (512, 512)
    assert output.class_names == ["background", "DAB-negative tissue", "DAB-positive tissue"]
    truth = demo_annotation(demo_image())
    prediction = np.where(labels > 0, labels.astype(int) - 1, 0)
    majority = np.bincount(truth.ravel()).max() / truth.size
    assert (prediction == truth).mean() > majority  # even two epochs learn more than the majority class
