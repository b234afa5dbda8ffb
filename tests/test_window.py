"""Window placement, blending weights and exact stitching of in-memory images."""

from __future__ import annotations

import numpy as np
import pytest

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.inference.window import (
    MIN_WEIGHT,
    blend_weights,
    predict_image,
    softmax,
    stride_for,
    window_starts,
)
from test_wsi_support import PixelModel, pixel_logits, random_image


@pytest.mark.parametrize(
    ("length", "window", "stride", "expected"),
    [
        (100, 32, 24, [0, 24, 48, 68]),  # last window shifted inward to end at 100
        (96, 32, 32, [0, 32, 64]),
        (32, 32, 16, [0]),
        (20, 32, 16, [0]),  # smaller than the window: one window, caller pads
        (33, 32, 32, [0, 1]),
    ],
)
def test_window_starts(length, window, stride, expected):
    starts = window_starts(length, window, stride)
    assert starts == expected
    if length >= window:
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s:s + window] = True
        assert covered.all() and starts[-1] + window == length


def test_window_starts_rejects_gaps():
    with pytest.raises(ConfigError, match="stride 40 is larger than window 32"):
        window_starts(100, 32, 40)


def test_blend_weights():
    w = blend_weights(32, "gaussian")
    assert w.shape == (32, 32) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=1e-3) and w.min() >= MIN_WEIGHT
    assert np.allclose(w, w[::-1, ::-1]) and w[16, 16] > w[8, 16] > w[0, 0]
    assert np.all(blend_weights((8, 12), "constant") == 1.0)
    with pytest.raises(ConfigError, match="Unknown blend mode 'cosine'"):
        blend_weights(8, "cosine")


def test_stride_is_monais_scan_interval():
    # MONAI's _get_scan_interval: int(roi * (1 - overlap)), at least 1; never rounded to a patch multiple
    assert stride_for(224, 0.25) == 168  # not a multiple of the 16-px patch: only the window must be
    assert stride_for(512, 0.25) == 384
    assert stride_for(224, 0.3) == int(224 * (1 - 0.3)) == 156  # truncated like MONAI (224 * 0.7 = 156.8)
    assert stride_for(32, 0.0) == 32
    assert stride_for(16, 0.9) == 1  # int(1.6) = 1
    assert stride_for(16, 0.97) == 1  # int(0.48) = 0 -> 1
    with pytest.raises(ConfigError, match="overlap"):
        stride_for(32, 1.0)


def monai_starts(length: int, roi: int, overlap: float) -> list[int]:
    """MONAI's window starts along one axis, written out from ``monai.inferers.utils._get_scan_interval`` and
    ``monai.data.utils.dense_patch_slices`` (the image is first padded up to the roi)."""
    size = max(length, roi)
    interval = roi if roi == size else max(1, int(roi * (1 - overlap)))
    num = -(-size // interval)
    scan = next((d for d in range(num) if d * interval + roi >= size), None)
    count = scan + 1 if scan is not None else 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


@pytest.mark.parametrize("overlap", [0.0, 0.1, 0.25, 0.3, 0.5, 0.625, 0.75, 0.9])
@pytest.mark.parametrize("window", [16, 48, 224, 256, 512])
def test_window_count_and_places_equal_monai(window, overlap):
    stride = stride_for(window, overlap)
    for length in (window - 5, window, window + 1, 1000, 2220, 2967, 8192, 10_001):
        assert window_starts(length, window, stride) == monai_starts(length, window, overlap), (length, stride)
    # the case: an 8192 px side at 224 px and overlap 0.25 -> 49 windows, as MONAI (51 before)
    assert len(window_starts(8192, 224, stride_for(224, 0.25))) == 49


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("window", [16, 32, 48])
def test_stitching_equals_direct(window, overlap, blend):
    model = PixelModel()
    for shape in [(50, 70), (13, 20), (64, 48), (window, window + 1)]:
        image = random_image(*shape, seed=sum(shape))
        got = predict_image(model, image, window=window, overlap=overlap, blend=blend, batch_size=3)
        assert got.shape == (3, *shape) and got.dtype == np.float32
        np.testing.assert_allclose(got, softmax(pixel_logits(image)), atol=2e-6)


def test_float_input_and_batches():
    image = random_image(40, 41)
    model = PixelModel()
    a = predict_image(model, image.astype(np.float32) / 255.0, window=16, overlap=0.5, batch_size=1)
    calls_one = model.calls
    model.calls = 0
    b = predict_image(model, image, window=16, overlap=0.5, batch_size=64)
    assert model.calls == 1 < calls_one
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_window_must_be_patch_multiple():
    with pytest.raises(ConfigError, match="window 40 is not a positive multiple of the model's patch size"):
        predict_image(PixelModel(), random_image(50, 50), window=40)
