"""``benchmark``: model-only throughput of a backbone + strategy on this machine."""

from __future__ import annotations

import argparse

from . import add_command


def run(args: argparse.Namespace) -> int:
    import torch

    from ..benchmarking import measure_throughput
    from ..devices import resolve_device
    from ..model import ModelConfig, build_model
    from ..tuning import TuningConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = ModelConfig(backbone=args.backbone, weights=args.weights, tiny=args.tiny, num_classes=args.num_classes,
                         tuning=TuningConfig(strategy=args.strategy), head=args.head, input_size=args.input_size)
    model = build_model(config)
    result = measure_throughput(model, args.input_size, args.batch_size, args.steps, device=device, train=args.train)
    mode = "train step" if args.train else "inference"
    head = "own decoder" if model.spec.from_scratch else config.head  # unet: its expanding path is the head
    print(f"{config.backbone}{' (tiny)' if args.tiny else ''} / {config.tuning.strategy} / {head} on {result.device}, "
          f"{mode}, batch {result.batch_size} x {result.input_size}px: {result.images_per_second:.2f} images/s "
          f"({result.seconds_per_batch * 1000:.1f} ms per batch)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "benchmark", summary="measure model-only throughput (images/s)",
        description="Time forward passes (or training steps with --train) of one backbone + strategy + head on\n"
                    "random input: the model-only rate that whole-slide throughput is compared against.",
        examples=["python -m pfmseg_engine benchmark --backbone uni_v1 --strategy lora --train --device cuda",
                  "python -m pfmseg_engine benchmark --backbone kaiko-vits16 --input_size 224 --threads 2"])
    parser.add_argument("--backbone", default="kaiko-vits16")
    parser.add_argument("--weights", default=None, help="backbone weights (random weights time the same)")
    parser.add_argument("--tiny", action="store_true", help="use the small variant of the family")
    # validated by TuningConfig (with a "did you mean"), so the parser need not import torch
    parser.add_argument("--strategy", default="frozen",
                        help="frozen, full, lora, dora, cnn_adapter or transformer_adapter")
    parser.add_argument("--head", default="multilevel")
    parser.add_argument("--num_classes", type=int, default=3)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--train", action="store_true", help="time forward + backward + optimizer step")
    parser.set_defaults(func=run)
