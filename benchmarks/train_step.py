"""Training speed: seconds per step per tuning strategy, and the input pipelines against the model step.

Strategies (default): each strategy builds the same backbone and head, then times complete optimizer
steps (forward, loss, backward, AdamW step) on random data after a few warm-up steps; the table reports
the median step time and its ratio to the frozen strategy.

Pipelines (``--pipelines images slides``): a :class:`~pfmseg_engine.training.trainer.Trainer` is built the
way the engine builds it, on a seed-format image dataset (PNG tiles and masks cut from the shipped CMU
slide) and on whole-slide training from QuPath GeoJSON annotations (the CMU slide itself), and three
rates are measured in samples per second:

* the model step alone (the trainer's own model, loss, optimizer and autocast on one batch held on the
  device, loss read back every step as the trainer does);
* the trainer's data loader alone (its ``num_workers`` and prefetching, a whole epoch, second pass);
* the trainer (``iter_fit`` over the second of two epochs, no validation: loading, step, callbacks,
  the epoch's checkpoint).

The goal is the trainer within 1.15x of the model step alone (data loading hidden behind compute).
Examples::

    python benchmarks/train_step.py                                   # kaiko-vits16 (full size), 224 px
    python benchmarks/train_step.py --backbone uni_v1 --device cuda --batch_size 8 --amp
    python benchmarks/train_step.py --tiny --steps 5 --strategies frozen lora full cnn_adapter
    python benchmarks/train_step.py --pipelines images slides --tiny --strategies cnn_adapter_small

Backbones are randomly initialised (timing does not depend on the weights), so no download happens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfmseg_engine import ModelConfig, TuningConfig, build_model
from pfmseg_engine.training.config import LossSection
from pfmseg_engine.training.losses import build_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_strategy(args: argparse.Namespace, strategy: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    config = ModelConfig(backbone=args.backbone, tiny=args.tiny, num_classes=args.num_classes,
                         input_size=args.input_size, head=args.head, tuning=TuningConfig(strategy=strategy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(config).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    criterion = build_loss(LossSection(type="cross_entropy"))
    images = torch.rand(args.batch_size, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch_size, args.input_size, args.input_size), device=device)
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=args.amp):
            logits = model(images)
        loss = criterion(logits, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"strategy": strategy, "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "seconds_per_step": statistics.median(times), "peak_gib": peak}


# ---- input pipelines against the model step ------------------------------------------------------------
CMU = Path(__file__).resolve().parents[1] / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"


def image_dataset(root: Path, count: int = 16, size: int = 512) -> Path:
    """A seed-format dataset: ``count`` PNG tiles of ``size`` px from the CMU slide with 3 brightness classes."""
    import tiffslide
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    with tiffslide.TiffSlide(CMU) as slide:
        width, height = slide.dimensions
        for i in range(count):
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            rgb = np.asarray(slide.read_region((x, y), 0, (size, size)).convert("RGB"))
            mask = 2 - np.digitize(rgb.mean(-1), [150, 210])
            Image.fromarray(rgb).save(root / "images" / f"tile{i}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"tile{i}.png")
            entries.append({"image_path": f"images/tile{i}.png", "mask_path": f"masks/tile{i}.png"})
    data = {"num_classes": 3, "class_names": ["dark", "pale", "glass"], "data": {"train": entries}}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def slide_annotations(path: Path) -> Path:
    """QuPath GeoJSON over the CMU slide: tissue and glass rectangles of two classes, level-0 pixels."""
    boxes = {"Tumor": [(200, 300, 900, 1000), (1200, 1500, 2000, 2300)],
             "Stroma": [(300, 1700, 1000, 2500), (1400, 400, 2100, 1100)]}
    features = []
    for name, rects in boxes.items():
        for x0, y0, x1, y1 in rects:
            ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
            features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                             "properties": {"objectType": "annotation", "classification": {"name": name}}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def pipeline_config(args: argparse.Namespace, root: Path, strategy: str, **dataset: Any) -> Any:
    """The training config of the pipeline runs: 2 epochs of ``--samples`` crops, no validation or plots."""
    from pfmseg_engine.training.config import config_from_dict

    system: dict[str, Any] = {"device": args.device, "seed": 0}
    if args.num_workers is not None:
        system["num_workers"] = args.num_workers
    return config_from_dict({
        "dataset": dataset,
        "system": system,
        "model": {"pfm_name": args.backbone, "tiny": args.tiny, "head": args.head,
                  "finetune_mode": {"type": strategy}},
        "training": {"epochs": 2, "batch_size": args.batch_size, "samples_per_epoch": args.samples,
                     "use_amp": args.amp, "scheduler": {"warmup_epochs": 0},
                     "augmentation": {"RandomResizedCropSize": args.input_size}},
        "validation": {"eval_interval": 1000},
        "logging": {"log_dir": str(root / "logs"), "plot_history": False, "experiment_name": f"run-{strategy}",
                    "overwrite": True},
        "visualization": {"save_predictions": False},
    }, check_dataset=False)


def image_trainer(args: argparse.Namespace, root: Path, strategy: str) -> Any:
    from pfmseg_engine.training.runner import build_datasets, build_model_for
    from pfmseg_engine.training.trainer import Trainer

    json_file = image_dataset(root / "images")
    config = pipeline_config(args, root / "image-run", strategy, json_file=str(json_file), num_classes=3)
    train, _ = build_datasets(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Trainer(config, build_model_for(config), train, None)


def slide_trainer(args: argparse.Namespace, root: Path, strategy: str) -> Any:
    from pfmseg_engine.training.slides import build_slide_trainer

    config = pipeline_config(args, root / "slide-run", strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_slide_trainer(config, [CMU], [slide_annotations(root / "cmu.geojson")], validation_share=0.0,
                                   train_mpp=0.5)


def loader_rate(trainer: Any) -> float:
    """Samples per second of the trainer's loader alone over one epoch (after one untimed pass)."""
    rates = []
    for epoch in range(2):
        trainer.sampler.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for batch in trainer.loader:
            count += len(batch["image"])
        rates.append(count / (time.perf_counter() - start))
    return rates[-1]


def loader_cpu_per_sample(trainer: Any, count: int) -> float:
    """Process CPU seconds per item of the trainer's dataset read in this process (after one untimed item)."""
    dataset = trainer.train_dataset
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    dataset[0]
    count = max(1, min(count, len(dataset) - 1))
    start = time.process_time()
    for index in range(1, count + 1):
        dataset[index]
    return (time.process_time() - start) / count


def model_step_rate(trainer: Any, steps: int, warmup: int) -> float:
    """Samples per second of the trainer's own step (forward, loss, backward, optimizer) on a resident batch."""
    batch = next(iter(trainer.loader))
    images = batch["image"].to(trainer.device)
    labels = batch["label"].to(trainer.device).long()
    model, times, cpu = trainer.model.train(), [], []
    for step in range(warmup + steps):
        cpu_start = time.process_time()
        _sync(trainer.device)
        start = time.perf_counter()
        with trainer._autocast():
            logits = model(images)
        loss = trainer.criterion(logits, labels)
        trainer.scaler.scale(loss).backward()
        trainer._optimizer_step()
        float(loss.detach())  # the trainer reads every step's loss back
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    trainer.step_cpu_per_sample = statistics.median(cpu) / len(images)
    return len(images) / statistics.median(times)


def trainer_rate(trainer: Any) -> tuple[float, float]:
    """Samples per second of ``iter_fit`` over its second epoch (and over the first, with start-up)."""
    marks = [time.perf_counter()]
    for kind, _ in trainer.iter_fit():
        if kind == "epoch":
            marks.append(time.perf_counter())
    samples = len(trainer.train_dataset)
    return samples / (marks[2] - marks[1]), samples / (marks[1] - marks[0])


def measure_pipeline(build: Any, args: argparse.Namespace, root: Path, strategy: str) -> dict[str, Any]:
    """Loader alone, model step alone and trainer samples/s of the trainer ``build`` makes (one model build:
    the step is timed first, then the loader, then two epochs of ``iter_fit``)."""
    torch.manual_seed(0)
    trainer = build(args, root, strategy)
    step = model_step_rate(trainer, args.steps, args.warmup)
    loader_cpu = loader_cpu_per_sample(trainer, 2 * args.batch_size)
    loader = loader_rate(trainer)
    steady, first = trainer_rate(trainer)
    return {"strategy": strategy, "num_workers": trainer.loader.num_workers,
            "loader_samples_per_s": loader, "model_step_samples_per_s": step,
            "trainer_samples_per_s": steady, "trainer_first_epoch_samples_per_s": first,
            "model_step_over_trainer": step / steady,
            "loader_cpu_s_per_sample": loader_cpu, "step_cpu_s_per_sample": trainer.step_cpu_per_sample,
            # what the trainer costs against the step where loading and the step share the same cores (CPU)
            "cpu_bound_ratio": 1.0 + loader_cpu / trainer.step_cpu_per_sample}


PIPELINES = {"images": image_trainer, "slides": slide_trainer}


def run_pipelines(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.pipelines:
            for strategy in args.strategies:
                row = measure_pipeline(PIPELINES[name], args, Path(folder), strategy)
                rows.append({"pipeline": name, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="kaiko-vits16")
    parser.add_argument("--tiny", action="store_true", help="small variant of the backbone family")
    parser.add_argument("--head", default="multilevel")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per strategy")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--strategies", nargs="+", default=["frozen", "lora", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--pipelines", nargs="*", default=None, choices=sorted(PIPELINES),
                        help="measure these input pipelines against the model step instead of the strategy table")
    parser.add_argument("--samples", type=int, default=64, help="samples per epoch of the pipeline runs")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="system.num_workers of the pipeline runs (default: the config's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.pipelines:
        import logging

        logging.getLogger("pfmseg_engine").setLevel(logging.WARNING)
        rows = run_pipelines(args)
        if args.json:
            print(json.dumps({"settings": vars(args), "results": rows}, indent=1))
            return
        name = f"{args.backbone}{' (tiny)' if args.tiny else ''}"
        print(f"{name}, head {args.head}, {args.batch_size}x{args.input_size}px, {device}"
              f"{', amp' if args.amp else ''}, {args.samples} samples per epoch; samples/s")
        print(f"{'pipeline':<8} {'strategy':<18} {'workers':>7} {'loader':>9} {'model step':>10} {'trainer':>9} "
              f"{'step/trainer':>12} {'CPU-bound':>9}  (goal <= 1.15; CPU-bound: 1 + loader/step CPU seconds)")
        for r in rows:
            print(f"{r['pipeline']:<8} {r['strategy']:<18} {r['num_workers']:>7} {r['loader_samples_per_s']:>9.1f} "
                  f"{r['model_step_samples_per_s']:>10.1f} {r['trainer_samples_per_s']:>9.1f} "
                  f"{r['model_step_over_trainer']:>12.2f} {r['cpu_bound_ratio']:>9.3f}")
        return
    rows = [time_strategy(args, s, device) for s in args.strategies]
    base = next((r["seconds_per_step"] for r in rows if r["strategy"] == "frozen"), rows[0]["seconds_per_step"])
    for row in rows:
        row["ratio_to_frozen"] = row["seconds_per_step"] / base
    if args.json:
        print(json.dumps({"settings": vars(args), "results": rows}, indent=1))
        return
    name = f"{args.backbone}{' (tiny)' if args.tiny else ''}"
    print(f"{name}, head {args.head}, {args.batch_size}x{args.input_size}px, {device}"
          f"{', amp' if args.amp else ''}, median of {args.steps} steps")
    print(f"{'strategy':<20} {'trainable':>12} {'s/step':>9} {'x frozen':>9}")
    for row in rows:
        print(f"{row['strategy']:<20} {row['trainable_params']:>12,} {row['seconds_per_step']:>9.4f} "
              f"{row['ratio_to_frozen']:>9.2f}")


if __name__ == "__main__":
    main()
