"""A saved live head is an ordinary checkpoint: ``evaluate`` and the compare engine score what it predicts.

The dataset's images are windows of the live loop's slide, so the scores can be checked against the
labels the live head itself predicted there from stored features (full width, and a reduced width
folded back into the backbone's own width on save).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pfmseg_engine.cli import main
from pfmseg_engine.live import LiveLoop, LiveSettings
from pfmseg_engine.metrics import confusion_matrix
from test_live_loop import SETTINGS, run_until, stroke
from test_live_store import CLASSES, WINDOW, half_tissue_image, half_tissue_slide, tiny_live_model

#: Store windows (row, column) the dataset's images are cut from: glass (column 4), tissue (5 and 6).
SPLITS = {"train": [(0, 4), (1, 5)], "val": [(2, 5)], "test": [(0, 5), (1, 6), (2, 4), (3, 6)]}


def trained_live_head(tmp_path, width: int | None) -> LiveLoop:
    """A live loop trained on two strokes, stopped (float32 store, so its predictions are the checkpoint's)."""
    image = half_tissue_image()
    settings = LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path / "store"), "width": width,
                               "dtype": "float32"})
    loop = LiveLoop(tiny_live_model(), half_tissue_slide(), settings)
    loop.set_view((256, 0, 192, 256))
    loop.update_labels(stroke(image, 0, 128, 256, 448), offset=(256, 0))
    events = loop.iter_run()
    run_until(events, "prediction")
    loop.cancel()
    assert list(events)[-1].kind == "stopped"
    return loop


def window_dataset(tmp_path) -> tuple[str, dict[tuple[int, int], np.ndarray]]:
    """A seed-JSON dataset of store windows (masks: brightness classes 0..2); returns its path and the masks."""
    image = half_tissue_image()
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    masks, splits = {}, {}
    for split, windows in SPLITS.items():
        entries = []
        for r, c in windows:
            y0, x0 = r * WINDOW, c * WINDOW
            name = f"w{r}_{c}"
            masks[(r, c)] = stroke(image, y0, y0 + WINDOW, x0, x0 + WINDOW) - 1
            Image.fromarray(image[y0:y0 + WINDOW, x0:x0 + WINDOW]).save(root / "img" / f"{name}.png")
            Image.fromarray(masks[(r, c)], mode="L").save(root / "msk" / f"{name}.png")
            entries.append({"image_path": f"img/{name}.png", "mask_path": f"msk/{name}.png"})
        splits[split] = entries
    path = root / "dataset.json"
    path.write_text(json.dumps({"num_classes": len(CLASSES), "class_names": list(CLASSES), "data": splits}))
    return str(path), masks


def live_confusion(loop: LiveLoop, masks: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Confusion matrix of what the live head predicts (from stored features) on the test windows."""
    windows = SPLITS["test"]
    loop.store.fill(windows=windows)  # glass windows too: the loop stores tissue only
    labels, _ = loop.predict_windows(windows)
    return sum(confusion_matrix(lab.astype(np.int64) - 1, masks[w], len(CLASSES), 255)
               for w, lab in zip(windows, labels, strict=True))


def close_confusions(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to a few pixels: the folded head computes the reduced one's logits within float error."""
    assert found.sum() == expected.sum() == len(SPLITS["test"]) * WINDOW ** 2
    assert np.abs(found - expected).sum() <= 0.002 * expected.sum()


@pytest.mark.parametrize("width", [None, 16], ids=["full-width", "reduced-width"])
def test_evaluate_and_compare_score_a_saved_live_head(tmp_path, capsys, width):
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.compare import CompareData, score_model
    from pfmseg_engine.training.config import TrainConfig

    loop = trained_live_head(tmp_path, width)
    assert (loop.head is loop.model.head) == (width is None)
    checkpoint = loop.save(tmp_path / "live.pt")
    dataset, masks = window_dataset(tmp_path)
    expected = live_confusion(loop, masks)
    assert expected.trace() < expected.sum() or len(np.unique(expected.nonzero()[0])) > 1  # not a trivial map

    # evaluate on the command line: one window per image, so it predicts exactly the live head's windows
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--input_json", dataset, "--output_dir", str(out),
                 "--device", "cpu", "--n_bootstrap", "20", "--input_size", str(WINDOW)]) == 0
    assert "mIoU" in capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["per_image"]) == len(SPLITS["test"])
    close_confusions(np.asarray(report["confusion_matrix"]), expected)

    # the compare engine scores a checkpoint with the training config that describes its model
    model = load_checkpoint(checkpoint, device="cpu")
    assert model.config.tuning.strategy == "frozen" and model.config.input_size == WINDOW
    config = TrainConfig.from_model_config(model.config, dataset={"json_file": dataset},
                                           system={"device": "cpu", "num_workers": 0})
    assert config.window_size == WINDOW
    data = CompareData.from_seed_json(config)
    scores = score_model(model, data.test, config, device="cpu")
    assert len(scores["names"]) == len(SPLITS["test"])
    close_confusions(np.sum(scores["confusions"], axis=0), expected)
    assert scores["metrics"]["mIoU"] == pytest.approx(report["metrics"]["mIoU"], abs=1e-9)


def test_compare_cached_forward_serves_a_saved_live_head(tmp_path):
    """Compare's frozen-backbone path (cached backbone grids + the head) gives the checkpoint's own logits."""
    import torch

    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.compare import cache_refusal, cached_forward

    loop = trained_live_head(tmp_path, 16)
    model = load_checkpoint(loop.save(tmp_path / "live.pt"), device="cpu").eval()
    assert cache_refusal(model) is None
    x = torch.from_numpy(np.stack([loop.store.window_image(w) for w in [(0, 5), (1, 6)]]))
    x = x.permute(0, 3, 1, 2).float() / 255.0
    backbone = model.encoder.backbone
    with torch.no_grad():
        grids = backbone.features((x - model.mean) / model.std, indices=backbone.feature_indices)  # as cached
        torch.testing.assert_close(cached_forward(model, {"features": grids}, x), model(x), rtol=0, atol=1e-5)
