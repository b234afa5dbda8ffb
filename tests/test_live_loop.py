"""The live loop: strokes in, warm-started training, refreshed predictions out, cancel, a normal checkpoint."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch

from pfmseg_engine.errors import DataError
from pfmseg_engine.live import LabelBuffer, LiveLoop, LiveSettings, SlideFeatureStore
from test_live_store import WINDOW, half_tissue_image, half_tissue_slide, tiny_live_model

SETTINGS = LiveSettings(device="cpu", crop=32, batch_size=2, first_steps=3, first_seconds=float("inf"),
                        predict_every=5, max_steps=10, fill_outward=False)


def stroke(image: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Labels of a rectangle painted by brightness: 1 = glass, 2 = stroma, 3 = nuclei (0 elsewhere)."""
    grey = image[y0:y1, x0:x1].mean(-1)
    return np.where(grey > 225, 1, np.where(grey > 120, 2, 3)).astype(np.uint8)


def make_loop(tmp_path, settings: LiveSettings = SETTINGS) -> LiveLoop:
    return LiveLoop(tiny_live_model(), half_tissue_slide(), LiveSettings(**{**settings.__dict__,
                                                                           "store_root": str(tmp_path)}))


def run_until(events, kind: str):
    for event in events:
        if event.kind == kind:
            return event
    raise AssertionError(f"the loop ended without a {kind} event")


def test_labels_are_resampled_into_windows_and_erased():
    store = SlideFeatureStore(tiny_live_model(), half_tissue_slide(), mpp=2.0)  # 2 level-0 px per model px
    buffer = LabelBuffer(store.geometry, 3)
    labels = np.zeros((40, 40), np.uint8)
    labels[:, 20:] = 2
    # a labels layer at 4 level-0 px per pixel, placed at level-0 (x, y) = (96, 64)
    touched = buffer.paint(labels, offset=(96, 64), scale=4.0)
    # model px y 32..112, x 48..128; class 2 from model x 88: windows of column 0 get only zeros, so no labels
    assert touched == [(0, 1), (1, 1)] and buffer.get((0, 0)) is None
    right = buffer.get((0, 1))
    assert right is not None and (right[32:, 24:] == 2).all() and right[32:, :24].max() == right[:32].max() == 0
    assert buffer.pixel_counts().tolist() == [0, 80 * 40, 0]
    buffer.paint(np.zeros((40, 40), np.uint8), offset=(96, 64), scale=4.0)  # painting 0 erases
    assert buffer.windows() == [] and buffer.pixel_counts().sum() == 0
    with pytest.raises(DataError, match="beyond the 3 classes"):
        buffer.paint(np.full((2, 2), 4, np.uint8))


def test_strokes_train_warm_and_refresh_the_view(tmp_path):
    image = half_tissue_image()
    loop = make_loop(tmp_path)
    loop.set_view((256, 0, 320, 256))  # glass windows (x < 320) are not predicted
    loop.update_labels(stroke(image, 0, 128, 256, 448), offset=(256, 0))  # glass and tissue labelled
    events = loop.iter_run()
    first = run_until(events, "prediction")
    assert first.step == SETTINGS.first_steps and first.latency is not None and first.latency > 0
    # previewed at the fast head's own 1/4 resolution: a pixel covers 4 x 4 model (= level-0) pixels
    assert first.labels.shape == first.uncertainty.shape == (64, 64) and first.scale == 4.0
    assert first.box == (0, 256, 320, 576) and first.offset == (320.0, 0.0)
    assert set(np.unique(first.labels)) <= {1, 2, 3} and 0 <= first.uncertainty.min() <= first.uncertainty.max() <= 1
    assert sum(first.areas_mm2.values()) == pytest.approx(256 * 256 / 1e6)
    optimizer = loop.optimizer
    head = {k: v.clone() for k, v in loop.model.head.state_dict().items()}
    adam_steps = {id(p): int(s["step"]) for p, s in optimizer.state.items()}
    assert set(adam_steps.values()) == {SETTINGS.first_steps}
    # a second stroke elsewhere: training continues from the same head and optimizer state
    loop.update_labels(stroke(image, 192, 320, 320, 448), offset=(320, 192))
    step = run_until(events, "step")
    assert step.step == SETTINGS.first_steps + 1 and step.labels_version == 2
    assert loop.optimizer is optimizer
    assert {int(s["step"]) for s in optimizer.state.values()} == {SETTINGS.first_steps + 1}
    moved = [not torch.equal(head[k], v) for k, v in loop.model.head.state_dict().items() if v.is_floating_point()]
    assert any(moved)  # one more step from the old weights, not a fresh head
    second = run_until(events, "prediction")
    assert second.labels_version == 2 and second.step == 2 * SETTINGS.first_steps
    loop.cancel()
    final = list(events)
    assert final[-1].kind == "stopped" and final[-1].steps == second.step


def test_cancel_from_another_thread_keeps_the_head(tmp_path):
    image = half_tissue_image()
    loop = make_loop(tmp_path, LiveSettings(**{**SETTINGS.__dict__, "max_steps": 10_000}))
    initial = {k: v.clone() for k, v in loop.model.head.state_dict().items()}
    loop.set_view((320, 0, 128, 128))
    loop.update_labels(stroke(image, 0, 128, 320, 448), offset=(320, 0))
    seen: queue.Queue = queue.Queue()

    def worker() -> None:
        for event in loop.iter_run():
            seen.put(event)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while seen.get(timeout=120).kind != "prediction":
        pass
    loop.cancel()
    thread.join(timeout=120)
    assert not thread.is_alive()
    rest = []
    while not seen.empty():
        rest.append(seen.get())
    assert rest[-1].kind == "stopped" and rest[-1].steps < 10_000
    changed = [not torch.equal(initial[k], v) for k, v in loop.model.head.state_dict().items()]
    assert any(changed)
    # live mode on again: the same head and optimizer go on
    step = run_until(loop.iter_run(), "step")
    assert step.step == rest[-1].steps + 1


def test_live_prediction_equals_the_model_on_its_windows(tmp_path):
    loop = make_loop(tmp_path)
    windows = [(0, 5), (2, 7)]
    loop.store.fill(windows=windows)
    labels, uncertainty = loop.predict_windows(windows)
    model = loop.model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([loop.store.window_image(w) for w in windows])).permute(0, 3, 1, 2) / 255.0
        probabilities = model(x.float()).softmax(1)
    np.testing.assert_array_equal(labels, probabilities.argmax(1).numpy() + 1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1) / np.log(3)
    np.testing.assert_allclose(uncertainty, entropy.numpy(), atol=1e-4)


def test_preview_at_the_heads_resolution_matches_the_full_prediction(tmp_path):
    full = make_loop(tmp_path, LiveSettings(**{**SETTINGS.__dict__, "full_resolution": True}))
    quick = LiveLoop(full.model, half_tissue_slide(),
                     LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path)}))
    view = (320, 0, 192, 192)
    full.store.fill(windows=full._view_windows(view))
    a, b = full._predict(view, 0, 0, latency=False), quick._predict(view, 0, 0, latency=False)
    assert a is not None and b is not None and (a.box, a.offset, a.scale, b.scale) == (b.box, b.offset, 1.0, 4.0)
    assert a.labels.shape == (192, 192) and b.labels.shape == (48, 48)
    # nearest-neighbour enlargement of the preview = the model's labels except near class edges
    enlarged = b.labels.repeat(4, 0).repeat(4, 1)
    assert (enlarged == a.labels).mean() > 0.9 and len(np.unique(a.labels)) > 1
    np.testing.assert_allclose(b.uncertainty.repeat(4, 0).repeat(4, 1).mean(), a.uncertainty.mean(), atol=0.02)
    assert sum(b.areas_mm2.values()) == pytest.approx(sum(a.areas_mm2.values()))
    for name in a.areas_mm2:
        assert b.areas_mm2[name] == pytest.approx(a.areas_mm2[name], abs=0.1 * 192 * 192 / 1e6)


def test_live_head_is_a_checkpoint_infer_accepts(tmp_path):
    from pfmseg_engine import load_checkpoint
    from pfmseg_engine.inference import predict_slide

    image = half_tissue_image()
    loop = make_loop(tmp_path / "store")
    loop.set_view((320, 0, 128, 128))
    loop.update_labels(stroke(image, 0, 128, 320, 448), offset=(320, 0))
    events = loop.iter_run()
    run_until(events, "prediction")
    loop.cancel()
    assert list(events)[-1].kind == "stopped"
    path = loop.save(tmp_path / "live.pt")
    model = load_checkpoint(path)
    assert model.config.tuning.strategy == "frozen" and model.config.input_size == WINDOW
    assert model.config.mpp == pytest.approx(1.0)
    x = torch.from_numpy(loop.store.window_image((1, 6))).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), loop.model.eval()(x))
    result = predict_slide(model, half_tissue_slide(), tmp_path / "out", window=WINDOW, overlap=0.0, chunk=128)
    assert result.path.exists() and result.windows_run > 0


@pytest.mark.parametrize("kind", ["entropy", "margin"])
def test_plane_by_plane_summary_matches_the_softmax(kind):
    from pfmseg_engine.live.head import labels_and_uncertainty, uncertainty_map

    logits = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    labels, uncertainty = labels_and_uncertainty(logits, kind)
    probabilities = logits.softmax(1)
    assert torch.equal(labels, (probabilities.argmax(1) + 1).to(torch.uint8))
    torch.testing.assert_close(uncertainty, uncertainty_map(probabilities, kind), rtol=0, atol=1e-5)
    flat = torch.zeros(1, 4, 2, 2)  # every class equally likely: the most uncertain
    assert torch.allclose(labels_and_uncertainty(flat, kind)[1], torch.ones(1, 2, 2))


def test_reduced_width_live_head_saves_as_the_full_model(tmp_path):
    from pfmseg_engine import load_checkpoint

    image = half_tissue_image()
    loop = LiveLoop(tiny_live_model(), half_tissue_slide(),
                    LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path), "width": 16}))
    loop.set_view((320, 0, 128, 128))
    loop.update_labels(stroke(image, 0, 128, 320, 448), offset=(320, 0))
    events = loop.iter_run()
    prediction = run_until(events, "prediction")
    loop.cancel()
    assert list(events)[-1].kind == "stopped"
    assert loop.head is not loop.model.head and loop.store.summary()["channels"] == 16
    model = load_checkpoint(loop.save(tmp_path / "live.pt"))  # folded: reads the backbone's own 48 channels
    windows = [(0, 5), (1, 6)]
    x = torch.from_numpy(np.stack([loop.store.window_image(w) for w in windows])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        expected = loop.head.eval()(loop.features(windows), [], out_size=(WINDOW, WINDOW))
        torch.testing.assert_close(model(x.float()), expected, rtol=0, atol=2e-3)  # float16 store
    labels, _ = loop.predict_windows(windows)
    assert labels.shape == (2, WINDOW, WINDOW) and prediction.labels.max() >= 1
    # stopping already left the trained head in loop.model: a new loop on it starts from exactly that head
    again = LiveLoop(loop.model, half_tissue_slide(),
                     LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path), "width": 16}))
    with torch.no_grad():
        torch.testing.assert_close(again.head.eval()(again.features(windows), [], out_size=(WINDOW, WINDOW)),
                                   expected, rtol=0, atol=1e-4)


def test_rare_classes_weigh_as_much_as_broad_strokes(tmp_path):
    loop = make_loop(tmp_path)
    labels = np.ones((40, 50), np.uint8)
    labels[:, :5] = 2  # a tenth of the pixels
    loop.update_labels(labels, offset=(320, 0))
    weights = loop._class_weights()
    assert weights is not None and weights.tolist() == pytest.approx([1 / 1.8, 5.0, 0.0])
    unweighted = LiveLoop(tiny_live_model(), half_tissue_slide(),
                          LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path), "balance": False}))
    assert unweighted._class_weights() is None


def test_idle_work_gives_way_to_strokes_views_and_requests(tmp_path):
    loop = make_loop(tmp_path)
    for ask in (lambda: loop.update_labels(np.ones((8, 8), np.uint8), offset=(320, 0)),
                lambda: loop.set_view((0, 0, 64, 64)), lambda: loop.request_suggestions(2), loop.cancel):
        asked = loop._idle_interrupted(loop.labels.version, loop._view_version)
        assert not asked()
        ask()
        assert asked()
        loop._suggest = None  # requests stay pending until answered: clear them for the next case
        loop._cancel.clear()


@pytest.mark.parametrize("head", ["light", "multilevel", "cup"])
def test_every_head_previews_the_view_at_a_resolution_that_tiles_it(tmp_path, head):
    loop = LiveLoop(tiny_live_model(head), half_tissue_slide(),
                    LiveSettings(**{**SETTINGS.__dict__, "store_root": str(tmp_path)}))
    view = (320, 0, 128, 128)
    loop.store.fill(windows=loop._view_windows(view))
    prediction = loop._predict(view, 0, 0, latency=False)
    assert prediction is not None and prediction.box == (0, 128, 320, 448)
    assert prediction.labels.shape[0] * prediction.scale == 128 and prediction.labels.min() >= 1
    # light upsamples by the patch size, multilevel and cup decode every model pixel: nothing coarser to show
    assert prediction.scale == 1.0


def test_two_heads_disagreement_as_uncertainty(tmp_path):
    from pfmseg_engine.live.head import disagreement

    same = torch.randn(1, 3, 4, 4)
    assert torch.allclose(disagreement(same, same), torch.zeros(1, 4, 4))
    sure = torch.full((1, 3, 1, 1), -30.0)
    one, other = sure.clone(), sure.clone()
    one[:, 0], other[:, 2] = 30.0, 30.0  # each head certain, of another class
    assert torch.allclose(disagreement(one, other), torch.ones(1, 1, 1))

    image = half_tissue_image()
    loop = make_loop(tmp_path, LiveSettings(**{**SETTINGS.__dict__, "uncertainty": "disagreement"}))
    loop.set_view((320, 0, 128, 128))
    loop.update_labels(stroke(image, 0, 128, 320, 448), offset=(320, 0))
    events = loop.iter_run()
    first = run_until(events, "prediction")
    loop.cancel()
    assert list(events)[-1].kind == "stopped"
    twin = loop.twin
    assert twin is not loop.head and type(twin) is type(loop.head)
    # the twin trained too (its optimizer took every step), from other weights than the head's
    assert loop._twin_optimizer is not None
    assert {int(s["step"]) for s in loop._twin_optimizer.state.values()} == {SETTINGS.first_steps}
    head_state = loop.head.state_dict()
    assert any(not torch.equal(v, head_state[k]) for k, v in twin.state_dict().items() if v.is_floating_point())
    assert first.uncertainty.min() >= 0 and 0 < first.uncertainty.max() <= 1
    loop.store.fill(windows=[(3, 5), (3, 6)])  # unlabelled tissue to suggest
    assert len(loop.suggest(2)) == 2  # ranked by the head's entropy
