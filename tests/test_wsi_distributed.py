"""One slide per dask.distributed task (an in-process client); reruns are idempotent (finished slides are
not recomputed). Worker processes, killed workers and failures: test_cohort_cluster.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.inference import LabelOutput, SlideInferenceConfig
from test_wsi_support import PixelModel, decided, pixel_labels, random_image

pytest.importorskip("distributed")


def pixel_loader(checkpoint, weights, device):
    return PixelModel()


def test_slides_over_a_cluster(tmp_path):
    from distributed import Client

    from pfmseg_engine.distributed import predict_slides

    images = {f"slide{i}": random_image(120 + 10 * i, 150, seed=i) for i in range(2)}
    paths = []
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    config = SlideInferenceConfig(window=32, chunk=64, tissue=False)
    done = []
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        results = predict_slides("unused.pt", paths, tmp_path / "out", config, client=client, mpp=1.0,
                                 model_loader=pixel_loader, on_done=done.append)
        assert [r.name for r in results] == ["slide0", "slide1"] and len(done) == 2
        for result, image in zip(results, images.values(), strict=True):
            labels = np.asarray(LabelOutput(result.path).levels[0][:])
            ok = decided(image)
            np.testing.assert_array_equal(labels[ok], pixel_labels(image)[ok])
        again = predict_slides("unused.pt", paths, tmp_path / "out", config, client=client, mpp=1.0,
                               model_loader=pixel_loader)
        assert [r.chunks_run for r in again] == [0, 0]
        assert [r.status for r in again] == ["reused", "reused"]
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",reused," in line for line in summary[1:])
