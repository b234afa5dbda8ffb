"""The trainer's data loader: persistent workers that still draw each epoch's crops, and end with the run."""

from __future__ import annotations

import multiprocessing

import torch

from pfmseg_engine.data.sampler import EpochSampler
from pfmseg_engine.training import trainer as trainer_module
from pfmseg_engine.training.trainer import PREFETCH_BATCHES, build_loader, loader_workers, stop_workers


class EpochEcho:
    """Items that say which epoch the dataset had selected when they were read (and in which process)."""

    def __init__(self, length: int = 6):
        self.length, self.epoch = length, 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.full((3, 2, 2), float(index)), "label": torch.zeros(2, 2, dtype=torch.long),
                "index": index, "epoch": self.epoch}


def epochs_seen(loader, sampler, epochs: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        seen, order = [], []
        for batch in loader:
            seen += batch["epoch"].tolist()
            order += batch["index"].tolist()
        out.append((seen, order))
    return out


def test_persistent_workers_draw_each_epochs_items():
    """Workers outlive the epoch, yet every item is read under its own epoch, in the sampler's order."""
    dataset = EpochEcho()
    sampler = EpochSampler(len(dataset), seed=5)
    loader = build_loader(dataset, sampler, batch_size=4, num_workers=1, pin_memory=False)
    assert loader.num_workers == 1 and loader.persistent_workers and loader.prefetch_factor == PREFETCH_BATCHES
    try:
        with_workers = epochs_seen(loader, sampler, 3)
    finally:
        stop_workers(loader)
    in_process = epochs_seen(build_loader(EpochEcho(), EpochSampler(6, seed=5), 4, 0, False), EpochSampler(6, seed=5),
                             1)
    for epoch, (seen, order) in enumerate(with_workers):
        assert seen == [epoch] * len(dataset)
        sampler.set_epoch(epoch)
        assert order == list(sampler)
    assert with_workers[0] == in_process[0]


def test_workers_end_when_stopped():
    dataset = EpochEcho()
    sampler = EpochSampler(len(dataset))
    loader = build_loader(dataset, sampler, batch_size=2, num_workers=1, pin_memory=False)
    before = set(multiprocessing.active_children())
    for _ in loader:
        pass
    assert set(multiprocessing.active_children()) - before  # the worker stays for the next epoch
    stop_workers(loader)
    assert not set(multiprocessing.active_children()) - before
    stop_workers(loader)  # a second stop is harmless


def test_worker_count_is_capped_by_the_cores(monkeypatch):
    monkeypatch.setattr(trainer_module, "available_cpus", lambda: 3)
    assert loader_workers(0) == 0  # 0 keeps loading in the training thread (the GUI's choice)
    assert loader_workers(2) == 2
    assert loader_workers(16) == 3
    assert loader_workers(None) == 2  # automatic: every core but the training thread's
    monkeypatch.setattr(trainer_module, "available_cpus", lambda: 64)
    assert loader_workers(None) == trainer_module.AUTO_WORKERS
    monkeypatch.setattr(trainer_module, "available_cpus", lambda: 1)
    assert loader_workers(None) == 1
    loader = build_loader(EpochEcho(), EpochSampler(6), 2, 0, False)
    assert loader.num_workers == 0 and not loader.persistent_workers


def test_a_run_with_workers_equals_one_without_and_leaves_no_workers(tmp_path):
    """Two epochs with a persistent worker give the losses of loading in the training thread, bit for bit
    (augmentations depend on (seed, epoch, index) only), and the worker is gone when the run ends."""
    from pfmseg_engine.training.runner import train_from_config
    from test_training_trainer import tiny_config

    before = set(multiprocessing.active_children())
    runs = {}
    for workers in (0, 1):
        config = tiny_config(tmp_path, [f"system.num_workers={workers}", "training.samples_per_epoch=6",
                                        "logging.plot_history=false"], name=f"w{workers}")
        runs[workers] = train_from_config(config)
        assert not set(multiprocessing.active_children()) - before
    assert [r["train_loss"] for r in runs[0].history] == [r["train_loss"] for r in runs[1].history]
