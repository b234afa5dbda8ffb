"""The trainer: exact resume, crash safety, cancellation, outputs, accumulation, native-size validation."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pfmseg_engine.checkpoint import read_checkpoint
from pfmseg_engine.data import SegmentationDataset, load_seed_json
from pfmseg_engine.training import (
    Callback,
    CancelToken,
    Trainer,
    TrainingError,
    config_from_dict,
    train_from_config,
    train_on_annotations,
)
from pfmseg_engine.training.runner import build_datasets, build_model_for
from pfmseg_engine.training.validation import validate


def make_dataset(root, n_train=4, n_val=2, size=(40, 48)):
    """Random RGB tiles whose class is decided by the red channel (learnable, cheap)."""
    (root / "img").mkdir(parents=True)
    (root / "msk").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_train + 2 * n_val):  # train, val, then as many test images (splits never share an image)
        shape = size if i < n_train else (37, 53)  # validation images are not patch multiples
        image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        mask = (image[..., 0] > 127).astype(np.uint8)
        mask[:2] = 255
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(mask, mode="L").save(root / "msk" / f"{i}.png")
        entries.append({"image_path": f"img/{i}.png", "mask_path": f"msk/{i}.png"})
    data = {"num_classes": 2, "class_names": ["dark", "red"],
            "data": {"train": entries[:n_train], "val": entries[n_train:n_train + n_val],
                     "test": entries[n_train + n_val:]}}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def tiny_config(tmp_path, options=(), name="exp"):
    json_file = tmp_path / "data" / "dataset.json"
    if not json_file.exists():
        make_dataset(tmp_path / "data")
    base = {
        "dataset": {"json_file": str(json_file)},
        "system": {"num_workers": 0, "device": "cpu", "seed": 3},
        "model": {"pfm_name": "kaiko-vits16", "tiny": True, "finetune_mode": {"type": "cnn_adapter"},
                  "cnn_adapter": {"channels": [8, 8, 16]}},
        "training": {"batch_size": 2, "epochs": 2, "learning_rate": 0.01, "optimizer": {"type": "AdamW"},
                     "augmentation": {"RandomResizedCropSize": 32}, "scheduler": {"warmup_epochs": 1}},
        "validation": {"augmentation": {"ResizedSize": 32}},
        "logging": {"log_dir": str(tmp_path / "logs"), "experiment_name": name},
        "visualization": {"save_interval": 1, "num_vis_samples": 1},
    }
    return config_from_dict(base, options=list(options))


class CancelAfterEpoch(Callback):
    def __init__(self, token: CancelToken, epoch: int):
        self.token, self.epoch = token, epoch

    def on_epoch_end(self, trainer, info):
        if info.epoch == self.epoch:
            self.token.cancel()


def trainable_state(path):
    return read_checkpoint(path)["state"]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # LoRA with dropout consumes the global RNG; accumulation over 3 batches leaves a partial group
    options = ["training.epochs=4", "model.finetune_mode.type=lora", "model.finetune_mode.dropout=0.2",
               "training.accumulate_grad_batches=2", "training.samples_per_epoch=6", "training.clip_grad_norm=1.0"]
    full = train_from_config(tiny_config(tmp_path, options, "full"))
    assert full.status == "completed" and full.epochs_completed == 4

    interrupted_cfg = tiny_config(tmp_path, options, "split")
    token = CancelToken()
    first = train_from_config(interrupted_cfg, callbacks=[CancelAfterEpoch(token, 2)], cancel=token)
    assert first.status == "cancelled" and first.epochs_completed == 2
    last = first.last_checkpoint
    assert read_checkpoint(last)["training_state"]["epoch"] == 2
    resumed = train_from_config(interrupted_cfg, resume=last)
    assert resumed.epochs_completed == 4

    losses_full = [row["train_loss"] for row in full.history]
    losses_resumed = [row["train_loss"] for row in resumed.history]
    assert losses_full == losses_resumed  # bit-exact, not approximately equal
    assert [r["mIoU"] for r in full.history] == [r["mIoU"] for r in resumed.history]
    a, b = trainable_state(full.last_checkpoint), trainable_state(resumed.last_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CrashInEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_step_end(self, trainer, info):
        if info.epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_crash_leaves_last_good_checkpoint_and_resume_finishes(tmp_path):
    cfg = tiny_config(tmp_path, ["training.epochs=3"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_from_config(cfg, callbacks=[CrashInEpoch(epoch=1)])
    last = cfg.output_dir / "checkpoints" / "last.pt"
    assert read_checkpoint(last)["training_state"]["epoch"] == 1
    result = train_from_config(cfg, resume=cfg.output_dir)  # the experiment folder works too
    assert result.epochs_completed == 3 and [r["epoch"] for r in result.history] == [1, 2, 3]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, ["training.epochs=2"])
    import pfmseg_engine.checkpoint as checkpoint

    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if obj.get("metadata", {}).get("epoch") == 2 and obj["metadata"]["kind"] == "last":
            handle.write(b"partial")
            raise KeyboardInterrupt  # Ctrl-C in the middle of writing
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg)
    payload = read_checkpoint(cfg.output_dir / "checkpoints" / "last.pt")
    assert payload["training_state"]["epoch"] == 1
    assert not [p for p in (cfg.output_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


class BestWatcher(Callback):
    """Checks at every epoch end that best.pt already holds the best epoch so far."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, trainer, info):
        best = read_checkpoint(trainer.checkpoint_dir / "best.pt")
        self.seen.append((info.epoch, info.is_best, best["metadata"]["epoch"], best["metrics"]["mIoU"]))


def test_outputs_and_best_checkpoint_written_as_soon_as_it_appears(tmp_path):
    cfg = tiny_config(tmp_path, ["training.epochs=3", "validation.eval_interval=1"])
    watcher = BestWatcher()
    result = train_from_config(cfg, callbacks=[watcher])
    out = cfg.output_dir
    for epoch, is_best, best_epoch, _ in watcher.seen:
        if is_best:
            assert best_epoch == epoch
        assert best_epoch <= epoch
    assert watcher.seen[-1][2] == result.best_epoch
    assert watcher.seen[-1][3] == pytest.approx(result.best_metric)
    # resolved config, log, history, curve, visualisations, checkpoints
    assert config_from_dict(yaml.safe_load((out / "config.yaml").read_text())) == cfg
    log = (out / "training.log").read_text()
    assert "Epoch 3/3 - Train Loss" in log and "New best mIoU" in log
    rows = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("Mean_Dice" in r for r in rows)
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_loss", "lr", "mIoU", "Mean_F1", "IoU_Class_1"} <= set(header)
    assert (out / "training_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = sorted(p.name for p in (out / "visualizations").iterdir())
    assert panels == ["epoch_001_sample_00.png", "epoch_002_sample_00.png", "epoch_003_sample_00.png"]
    with Image.open(out / "visualizations" / panels[0]) as panel:
        assert panel.size == (53 * 3 + 8, 37)  # image | truth | prediction at native size
    best = read_checkpoint(out / "checkpoints" / "best.pt")
    assert best["training_state"] is None and best["config"]["class_names"] == ["dark", "red"]


def test_cancel_from_another_thread(tmp_path):
    cfg = tiny_config(tmp_path, ["training.epochs=50"])
    token = CancelToken()
    started = threading.Event()

    class Signal(Callback):
        def on_step_end(self, trainer, info):
            started.set()

    results = []
    worker = threading.Thread(target=lambda: results.append(train_from_config(cfg, callbacks=[Signal()],
                                                                              cancel=token)))
    worker.start()
    assert started.wait(120)
    token.cancel()
    worker.join(120)
    assert results and results[0].status == "cancelled" and results[0].epochs_completed < 50


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    common = ["training.epochs=1", "training.optimizer.type=SGD", "training.optimizer.momentum=0",
              "training.clip_grad_norm=null", "training.scheduler.type=constant", "training.scheduler.warmup_epochs=0",
              "training.augmentation.transforms=null", "validation.eval_interval=5"]
    big = tiny_config(tmp_path, [*common, "training.batch_size=4"], "big")
    small = tiny_config(tmp_path, [*common, "training.batch_size=2", "training.accumulate_grad_batches=2"], "small")
    results = []
    for cfg in (big, small):
        train, _ = build_datasets(cfg)
        trainer = Trainer(cfg, build_model_for(cfg), train, None)
        trainer.fit()
        results.append({k: v.clone() for k, v in trainer.model.trainable_state_dict().items()})
        assert trainer.global_step == 1
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


def test_validation_is_at_native_resolution(tmp_path):
    cfg = tiny_config(tmp_path)
    model = build_model_for(cfg)
    val = SegmentationDataset(load_seed_json(cfg.dataset.json_file).split("val"), 2)
    result = validate(model, val, num_classes=2, ignore_index=255, window=32, mode="windowslide")
    masks = [val.load(i)[1] for i in range(2)]
    assert result.meter.total.sum() == sum(int((m != 255).sum()) for m in masks)
    assert [cm.sum() for cm in result.meter.per_image] == [int((m != 255).sum()) for m in masks]
    resized = validate(model, val, num_classes=2, ignore_index=255, window=32, mode="resize")
    assert resized.meter.total.sum() == result.meter.total.sum()


def test_bfloat16_autocast_on_cpu_and_nan_loss_is_reported(tmp_path):
    cfg = tiny_config(tmp_path, ["training.epochs=1", "training.amp_dtype=bfloat16", "validation.eval_interval=5"])
    train, _ = build_datasets(cfg)
    trainer = Trainer(cfg, build_model_for(cfg), train, None)
    assert trainer.amp_dtype == torch.bfloat16
    result = trainer.fit()
    assert np.isfinite(result.history[0]["train_loss"])

    class NaNImages(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), float("nan")), "label": torch.zeros(32, 32, dtype=torch.long)}

    plain = tiny_config(tmp_path, ["training.epochs=1"], "nan")
    with pytest.raises(TrainingError, match="loss became nan"):
        Trainer(plain, build_model_for(plain), NaNImages(), None).fit()


def test_training_on_sparse_annotations(tmp_path):
    cfg = tiny_config(tmp_path, ["training.epochs=1", "training.batch_size=4"], "sparse")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
    labels = np.zeros((80, 90), dtype=np.uint8)
    labels[10:14, 5:80] = 1
    labels[60:70, 40:60] = 2
    result = train_on_annotations(cfg, [image], [labels], val_images=[image], val_labels=[labels],
                                  samples_per_epoch=8)
    assert result.status == "completed"
    assert 0.0 <= result.history[0]["mIoU"] <= 1.0


def test_results_do_not_depend_on_data_loader_workers(tmp_path):
    options = ["training.epochs=1", "training.samples_per_epoch=4", "validation.eval_interval=5"]
    losses = []
    for workers in (0, 2):
        cfg = tiny_config(tmp_path, [*options, f"system.num_workers={workers}"], f"w{workers}")
        result = train_from_config(cfg)
        losses.append(result.history[0]["train_loss"])
    assert losses[0] == losses[1]


@pytest.mark.parametrize(("bf16", "setting", "expected"), [
    (True, "auto", torch.bfloat16),  # Ampere and newer: bfloat16, no gradient scaler needed
    (False, "auto", torch.float16),  # older GPUs: float16 with a gradient scaler
    (True, "float16", torch.float16),
    (False, "bfloat16", torch.float16),  # asked for but unsupported: float16, with a warning
    (True, "bfloat16", torch.bfloat16),
])
def test_cuda_autocast_prefers_bfloat16_where_supported(monkeypatch, bf16, setting, expected):
    from pfmseg_engine.training.trainer import choose_amp_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert choose_amp_dtype(setting, "cuda") == expected
    assert choose_amp_dtype(setting, torch.device("cuda:1")) == expected


def test_cpu_autocast_only_when_asked_for_bfloat16():
    from pfmseg_engine.training.trainer import choose_amp_dtype

    assert choose_amp_dtype("auto", "cpu") is None and choose_amp_dtype("float16", "cpu") is None
    assert choose_amp_dtype("bfloat16", "cpu") == torch.bfloat16



def test_an_unnamed_trainer_that_resumes_writes_into_the_resumed_run(tmp_path):
    options = ["validation.eval_interval=5"]
    first = tiny_config(tmp_path, [*options, "training.epochs=1"], name=None)
    train, _ = build_datasets(first)
    trainer = Trainer(first, build_model_for(first), train, None)
    trainer.fit()
    run = trainer.output_dir
    longer = tiny_config(tmp_path, [*options, "training.epochs=2"], name=None)
    resumed = Trainer(longer, build_model_for(longer), train, None)
    assert resumed.output_dir != run  # a new folder of its own until it resumes
    resumed.fit(resume=run / "checkpoints" / "last.pt")
    assert resumed.output_dir == run and resumed.config.output_dir == run
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [run.name]  # the unused new folder is gone
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1, 2]


def test_a_second_run_into_a_folder_in_use_is_refused_until_the_first_ends(tmp_path):
    from pfmseg_engine.storage import OutputBusyError
    from pfmseg_engine.training.outputs import RunLock

    cfg = tiny_config(tmp_path, ["training.epochs=1", "validation.eval_interval=5"])
    train, _ = build_datasets(cfg)
    first = Trainer(cfg, build_model_for(cfg), train, None).iter_fit()
    next(first)  # the first run is training: it holds the folder, with no checkpoint written yet
    assert not (cfg.output_dir / "checkpoints" / "last.pt").exists()
    with pytest.raises(OutputBusyError, match=r"Another training run .* is writing into"):
        Trainer(cfg, build_model_for(cfg), train, None).fit()
    first.close()  # cancelled before its first checkpoint: the folder is free again
    with RunLock(cfg.output_dir):  # released: taken again at once
        pass
    assert Trainer(cfg, build_model_for(cfg), train, None).fit().status == "completed"
