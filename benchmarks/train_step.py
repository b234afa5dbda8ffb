"""Seconds per training step for frozen, LoRA and full fine-tuning of the same model.

Each strategy builds the same backbone and head, then times complete optimizer steps (forward,
loss, backward, AdamW step) on random data after a few warm-up steps; the table reports the median
step time and its ratio to the frozen strategy. Examples::

    python benchmarks/train_step.py                                   # kaiko-vits16 (full size), 224 px
    python benchmarks/train_step.py --backbone uni_v1 --device cuda --batch_size 8 --amp
    python benchmarks/train_step.py --tiny --steps 5 --strategies frozen lora full cnn_adapter

Backbones are randomly initialised (timing does not depend on the weights), so no download happens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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
