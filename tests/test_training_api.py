"""Engine training APIs the napari plugin drives: iter_fit, retraining a model, configs from models,
the plot switch, pausing, a held-out validation split and the one device resolver."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch

from pfmseg_engine import ModelConfig, TuningConfig, build_model
from pfmseg_engine.checkpoint import read_checkpoint
from pfmseg_engine.data import annotated_blocks, crop_boxes, split_annotations
from pfmseg_engine.errors import ConfigError, DataError
from pfmseg_engine.training import (
    Callback,
    CancelToken,
    EpochInfo,
    StepInfo,
    TrainConfig,
    build_annotation_trainer,
    train_on_annotations,
)

MODEL = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, class_names=("dark", "red"), input_size=32,
                    tuning=TuningConfig(strategy="cnn_adapter", adapter_channels=(8, 8, 16)))


def scribbles(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Random RGB with strokes of two classes in several 32-px squares (class = red channel)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    for y in range(4, size, 32):
        labels[y:y + 6, 4:size - 4] = 1 + (image[y:y + 6, 4:size - 4, 0] > 127)
    return image, labels


def config(tmp_path, name: str = "run", **sections) -> TrainConfig:
    base = {"system": {"num_workers": 0, "device": "cpu", "seed": 3},
            "training": {"epochs": 2, "batch_size": 2, "samples_per_epoch": 4, "learning_rate": 0.01,
                         "scheduler": {"warmup_epochs": 0}},
            "logging": {"log_dir": str(tmp_path), "experiment_name": name},
            "visualization": {"save_predictions": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return TrainConfig.from_model_config(MODEL, **base)


def annotation_trainer(tmp_path, name: str = "run", callbacks=(), cancel=None, model=None, **sections):
    image, labels = scribbles()
    return build_annotation_trainer(config(tmp_path, name, **sections), [image], [labels], model=model,
                                    val_images=[image[:40, :40]], val_labels=[labels[:40, :40]],
                                    callbacks=callbacks, cancel=cancel)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- iter_fit ---------------------------------------------------------------------------------------
def test_iter_fit_yields_steps_and_epochs_in_the_callers_thread_and_returns_the_result(tmp_path):
    threads = []

    class Where(Callback):
        def on_step_end(self, trainer, info):
            threads.append(threading.get_ident())

    trainer = annotation_trainer(tmp_path, "iter", callbacks=[Where()])
    events = trainer.iter_fit()
    seen = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration as done:
            result = done.value
            break
    assert [kind for kind, _ in seen] == ["step", "step", "epoch", "step", "step", "epoch"]
    assert all(isinstance(info, StepInfo if kind == "step" else EpochInfo) for kind, info in seen)
    assert [(i.epoch, i.batch) for k, i in seen if k == "step"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(threads) == {threading.get_ident()}  # no helper thread: a thread_worker generator drives it
    assert result.status == "completed" and result.epochs_completed == 2
    epochs = [info for kind, info in seen if kind == "epoch"]
    assert [row["train_loss"] for row in result.history] == [e.train_loss for e in epochs]
    # fit() drains the same generator: an identical run gives identical losses
    again = annotation_trainer(tmp_path, "fit").fit()
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in result.history]


def test_closing_iter_fit_early_cancels_and_keeps_the_last_good_checkpoint(tmp_path):
    ended = []

    class End(Callback):
        def on_train_end(self, trainer, result):
            ended.append(result)

    trainer = annotation_trainer(tmp_path, "close", callbacks=[End()], training={"epochs": 5})
    events = trainer.iter_fit()
    for kind, _info in events:
        if kind == "epoch":
            break
    last = trainer.checkpoint_dir / "last.pt"
    saved = last.read_bytes()
    kind, info = next(events)  # part-way into epoch 2
    assert kind == "step" and info.epoch == 1
    events.close()
    assert last.read_bytes() == saved and read_checkpoint(last)["training_state"]["epoch"] == 1
    assert (trainer.checkpoint_dir / "best.pt").is_file()
    assert [(r.status, r.epochs_completed) for r in ended] == [("cancelled", 1)]
    handlers = logging.getLogger("pfmseg_engine").handlers
    assert not any(getattr(h, "baseFilename", "").startswith(str(tmp_path)) for h in handlers)
    resumed = annotation_trainer(tmp_path, "close", training={"epochs": 2}).fit(resume=last)
    assert resumed.status == "completed" and [r["epoch"] for r in resumed.history] == [1, 2]


# --- retraining an existing model ------------------------------------------------------------------
def test_annotation_trainer_continues_from_a_given_model(tmp_path):
    first = annotation_trainer(tmp_path, "first", training={"epochs": 1})
    first.fit()
    trained = weights(first.model)
    fresh = annotation_trainer(tmp_path, "fresh", training={"epochs": 1})
    assert not same(weights(fresh.model), trained)  # without model=: a new model
    again = annotation_trainer(tmp_path, "again", model=first.model, training={"epochs": 1})
    assert again.model is first.model and same(weights(again.model), trained)

    image, labels = scribbles()
    result = train_on_annotations(config(tmp_path, "more", training={"epochs": 1}), [image], [labels],
                                  model=first.model)
    assert result.status == "completed" and not same(weights(first.model), trained)  # trained in place


def test_a_model_that_does_not_fit_the_config_is_refused(tmp_path):
    other = build_model(MODEL.with_changes(num_classes=3, class_names=()))
    with pytest.raises(ConfigError, match=r"num_classes.*from_model_config"):
        annotation_trainer(tmp_path, model=other)


# --- configs from models ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_config", [
    MODEL,
    MODEL.with_changes(tuning=TuningConfig(strategy="lora", rank=4, alpha=8.0, dropout=0.1, lora_mlp=True),
                       feature_indices=(1, 3), mpp=0.5, head="light", strict_weights=False),
    MODEL.with_changes(tuning=TuningConfig(strategy="transformer_adapter", adapter_depth=3, adapter_mlp_ratio=2.0,
                                           adapter_init_values=None, adapter_qk_norm=True,
                                           adapter_drop_path_rate=0.1), input_size=48, weights="w.safetensors"),
])
def test_from_model_config_inverts_model_config(model_config):
    cfg = TrainConfig.from_model_config(model_config)
    assert cfg.model_config() == model_config
    assert cfg.class_names == model_config.class_names and cfg.crop_size == model_config.input_size


def test_from_model_config_merges_sections_and_validates_them():
    cfg = TrainConfig.from_model_config(MODEL, training={"epochs": 3, "augmentation": {"scale": None}},
                                        logging={"plot_history": False})
    assert cfg.training.epochs == 3 and cfg.training.augmentation.scale is None
    assert cfg.crop_size == MODEL.input_size and not cfg.logging.plot_history  # merged, not replaced
    with pytest.raises(ConfigError, match=r"Did you mean 'training\.epochs'"):
        TrainConfig.from_model_config(MODEL, training={"epoch": 3})
    with pytest.raises(ConfigError, match="must be a mapping"):
        TrainConfig.from_model_config(MODEL, training=3)


# --- the per-epoch plot switch ---------------------------------------------------------------------
def test_plot_history_switch(tmp_path, monkeypatch):
    from pfmseg_engine.training.history import History

    calls = []
    real_plot = History.plot
    monkeypatch.setattr(History, "plot", lambda self, path: (calls.append(path), real_plot(self, path)))
    off = annotation_trainer(tmp_path, "off", logging={"plot_history": False}, training={"epochs": 1})
    off.fit()
    assert calls == [] and not (off.output_dir / "training_history.png").exists()
    assert (off.output_dir / "history.csv").is_file()
    on = annotation_trainer(tmp_path, "on", training={"epochs": 1})
    on.fit()
    assert calls == [on.output_dir / "training_history.png"] and calls[0].is_file()


# --- pausing ---------------------------------------------------------------------------------------
#: Seconds a thread may take to get somewhere on a loaded machine: a deadlock guard, never a race decider.
GUARD = 300


class ParkingCondition(threading.Condition):
    """A condition variable that says when a thread sleeps on it (``parked``): tests synchronise on that,
    not on how long things take. It is set while the sleeper holds the lock, so whoever wakes it (which
    needs the lock) always comes after it is asleep."""

    def __init__(self):
        super().__init__()
        self.parked = threading.Event()

    def wait(self, timeout=None):
        self.parked.set()
        return super().wait(timeout)


def parking_token() -> tuple[CancelToken, threading.Event]:
    """A CancelToken whose pause is observable: the event is set once something waits on it."""
    token = CancelToken()
    token._condition = ParkingCondition()
    return token, token._condition.parked


def test_pause_token_blocks_without_spinning_and_cancel_wins():
    token, parked = parking_token()
    assert token.wait_while_paused() and not token.paused and not parked.is_set()
    token.pause()
    assert token.paused and token.wait_while_paused(timeout=0.05) is False  # still paused: do not go on
    outcome = {}

    def wait():
        outcome["go_on"] = token.wait_while_paused()

    for wake, go_on in ((token.resume, True), (token.cancel, False)):  # cancel wakes the waiter, which stops
        token.pause()
        parked.clear()
        waiter = threading.Thread(target=wait)
        waiter.start()
        assert parked.wait(GUARD)  # asleep on the condition variable: no polling loop
        assert waiter.is_alive()
        wake()
        waiter.join(GUARD)
        assert not waiter.is_alive() and outcome["go_on"] is go_on
    token.pause()
    assert token.cancelled and not token.paused and token.wait_while_paused() is False


class SkippingClock:
    """``time`` with a ``perf_counter`` the test can move forward (a pause as long as the test likes)."""

    def __init__(self):
        self.skipped = 0.0

    def __getattr__(self, name):
        return getattr(time, name)

    def perf_counter(self) -> float:
        return time.perf_counter() + self.skipped


def test_trainer_holds_between_batches_while_paused(tmp_path, monkeypatch):
    import pfmseg_engine.training.trainer as trainer_module

    token, parked = parking_token()
    clock = SkippingClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    log = []

    def resume_once_held():
        if parked.wait(GUARD):
            clock.skipped += 1000.0  # the pause lasts 1000 s on the trainer's clock
            log.append("resume")
        token.resume()

    class PauseOnce(Callback):
        def on_step_end(self, trainer, info):
            log.append("step")
            if info.global_step == 1 and log == ["step"]:
                token.pause()
                threading.Thread(target=resume_once_held, daemon=True).start()

    trainer = annotation_trainer(tmp_path, "pause", callbacks=[PauseOnce()], cancel=token,
                                 training={"epochs": 1})
    result = trainer.fit()
    assert log == ["step", "resume", "step"]  # held before the next batch until resumed
    assert result.status == "completed"
    assert 0 < result.history[0]["seconds"] < 1000  # paused time is not epoch time


def test_cancel_releases_a_paused_trainer(tmp_path):
    token, parked = parking_token()
    steps = []

    def cancel_once_held():
        parked.wait(GUARD)
        token.cancel()

    class PauseThenCancel(Callback):
        def on_step_end(self, trainer, info):
            steps.append(info)
            if len(steps) == 1:
                token.pause()
                threading.Thread(target=cancel_once_held, daemon=True).start()

    result = annotation_trainer(tmp_path, "stop", callbacks=[PauseThenCancel()], cancel=token,
                                training={"epochs": 3}).fit()
    assert parked.is_set()  # it was asleep when cancelled
    assert result.status == "cancelled" and result.epochs_completed == 0 and len(steps) == 1


# --- held-out validation squares -------------------------------------------------------------------
def test_split_annotations_holds_out_whole_squares_deterministically():
    _, labels = scribbles(128)
    original = labels.copy()
    train, boxes = split_annotations(labels, 0.25, block=32, seed=7)
    assert np.array_equal(labels, original)  # the input is not modified
    assert len(boxes) == 4  # 16 annotated squares of 32 px, a quarter held out
    assert all(y1 - y0 == 32 and x1 - x0 == 32 and y0 % 32 == 0 and x0 % 32 == 0 for y0, y1, x0, x1 in boxes)
    for y0, y1, x0, x1 in boxes:
        assert not train[y0:y1, x0:x1].any() and original[y0:y1, x0:x1].any()
    kept = original.copy()
    for y0, y1, x0, x1 in boxes:
        kept[y0:y1, x0:x1] = 0
    assert np.array_equal(train, kept)  # only the held-out squares changed
    again, same_boxes = split_annotations(labels, 0.25, block=32, seed=7)
    assert same_boxes == boxes and np.array_equal(again, train)
    assert any(split_annotations(labels, 0.25, block=32, seed=s)[1] != boxes for s in range(8))
    assert [c.shape for c in crop_boxes(labels, boxes)] == [(32, 32)] * 4


def test_split_annotations_edge_cases():
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[10, 10] = 1
    train, boxes = split_annotations(labels, 0.5, block=32)
    assert boxes == [] and np.array_equal(train, labels)  # one annotated square: nothing to hold out
    labels[90, 90] = 2
    train, boxes = split_annotations(labels, 0.9, block=32)
    assert len(boxes) == 1 and train.any()  # one square always stays for training
    assert boxes[0] in [(0, 32, 0, 32), (64, 96, 64, 96)]
    labels[99, 5] = 1
    assert annotated_blocks(labels, 32) == [(0, 32, 0, 32), (64, 96, 64, 96), (96, 100, 0, 32)]  # clipped at the border
    assert split_annotations(labels, 0.0, block=32)[1] == []
    with pytest.raises(DataError, match="share"):
        split_annotations(labels, 1.0, block=32)


def test_annotation_trainer_holds_out_a_validation_share(tmp_path):
    image, labels = scribbles(128)
    cfg = config(tmp_path, "share", system={"seed": 5})
    trainer = build_annotation_trainer(cfg, [image], [labels], validation_share=0.25, validation_block=32)
    _, boxes = split_annotations(labels, 0.25, block=32, seed=5)
    val = trainer.val_source
    assert val.num_images() == len(boxes) == 4
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        got_image, got_mask = val.load(i)
        assert np.array_equal(got_image, image[y0:y1, x0:x1])
        assert np.array_equal(got_mask == 255, labels[y0:y1, x0:x1] == 0)  # the original annotations
        rows = np.concatenate(list(trainer.train_dataset.points.values()))
        inside = (rows[:, 1] >= y0) & (rows[:, 1] < y1) & (rows[:, 2] >= x0) & (rows[:, 2] < x1)
        assert not inside.any()  # never trained on
    with pytest.raises(ConfigError, match="not both"):
        build_annotation_trainer(cfg, [image], [labels], val_images=[image], val_labels=[labels],
                                 validation_share=0.2)


# --- one device resolver -----------------------------------------------------------------------------
def test_one_device_resolver_everywhere(monkeypatch):
    import napari_pfmseg._session as plugin_session
    import pfmseg_engine
    import pfmseg_engine.benchmarking as benchmarking
    import pfmseg_engine.training.trainer as trainer
    from pfmseg_engine.devices import resolve_device

    assert benchmarking.resolve_device is resolve_device is trainer.resolve_device is pfmseg_engine.resolve_device
    assert not hasattr(plugin_session, "resolve_device") or plugin_session.resolve_device is resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None) == resolve_device("CPU")
    with pytest.raises(ConfigError, match=r"'cuda' is not available.*available: cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps") == resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("") == torch.device("cuda")
