"""``train``: train a segmentation model from a seed-style YAML config."""

from __future__ import annotations

import argparse
import sys

from . import add_command


def run(args: argparse.Namespace) -> int:
    from ..training import TqdmProgress, load_config, train_from_config

    config = load_config(args.config, args.options)
    callbacks = [] if args.no_progress else [TqdmProgress()]
    try:
        result = train_from_config(config, resume=args.resume, device=args.device, callbacks=callbacks)
    except KeyboardInterrupt:
        if config.system.seeds:
            print(f"interrupted: every seed's completed epochs are kept under {config.output_dir}; continue with "
                  f"--resume {config.output_dir}", file=sys.stderr)
            return 130
        last = config.output_dir / "checkpoints" / "last.pt"
        hint = f"continue with --resume {last}" if last.is_file() else "no epoch was completed"
        print(f"interrupted: completed epochs are kept in {last.parent}; {hint}", file=sys.stderr)
        return 130
    monitor = config.validation.monitor
    for seed, run in getattr(result, "runs", {}).items():  # system.seeds: one line per seed's run
        best = "n/a" if run.best_metric is None else f"{run.best_metric:.4f} (epoch {run.best_epoch})"
        print(f"seed {seed}: {run.status}, {run.epochs_completed} epochs; best {monitor} {best}")
    if hasattr(result, "summary"):
        stats = result.summary.get(monitor)
        value = "n/a" if stats is None else f"{stats['mean']:.4f} +- {stats['sd']:.4f} over {stats['n']} seeds"
        print(f"{result.status}: {monitor} {value}; summary: {result.summary_csv}")
    else:
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f} (epoch {result.best_epoch})"
        print(f"{result.status}: {result.epochs_completed} epochs; best {monitor} {best}")
    print(f"outputs: {result.output_dir}")
    return 0 if result.status == "completed" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "train", summary="train a model from a YAML config (seed format)",
        description="Train from a seed-style YAML config (keys: docs/config.md). Checkpoints, history and\n"
                    "curves go to logging.log_dir/logging.experiment_name; an interrupted run resumes.",
        examples=["python -m pfmseg_engine train --config my.yaml",
                  "python -m pfmseg_engine train --config my.yaml --options training.epochs=50 "
                  "model.finetune_mode.type=lora model.pfm_weights_path=/models/uni.bin",
                  "python -m pfmseg_engine train --config my.yaml --resume logs/exp/checkpoints/last.pt",
                  "python -m pfmseg_engine train --config my.yaml --options protocol=frozen_light_decoder "
                  "'system.seeds=[0, 1, 2]'"])
    parser.add_argument("--config", required=True, help="YAML config file (see configs/default.yaml)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a last.pt checkpoint (or the experiment folder holding it); with "
                             "system.seeds, continue every seed's run")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 or auto (overrides system.device)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config keys, e.g. training.epochs=3 model.finetune_mode.type=lora")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.set_defaults(func=run)
