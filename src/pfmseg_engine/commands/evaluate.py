"""``evaluate``: score a trained checkpoint on a split of a seed JSON dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_command


def _checkpoint_path(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
    return path


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint
    from ..data.dataset import SegmentationDataset
    from ..data.seed_json import load_seed_json
    from ..devices import resolve_device
    from ..errors import DataError
    from ..training.evaluation import evaluate_model
    from ..training.visualize import palette, save_panel

    checkpoint = _checkpoint_path(args.checkpoint)
    device = resolve_device(args.device)
    model = load_checkpoint(checkpoint, weights=args.weights, device=device)
    dataset_json = load_seed_json(args.input_json)
    if dataset_json.num_classes != model.num_classes:
        raise DataError(
            f"Dataset '{dataset_json.path}' has {dataset_json.num_classes} classes but checkpoint "
            f"'{checkpoint}' predicts {model.num_classes}; evaluate on a dataset with the same classes."
        )
    dataset = SegmentationDataset(dataset_json.split(args.split), model.num_classes, args.ignore_index,
                                  class_colors=dataset_json.class_colors, cache=False)
    output_dir = Path(args.output_dir) if args.output_dir else checkpoint.parent / f"eval_{args.split}"
    window = args.input_size or model.config.input_size
    colours = palette(model.num_classes, dataset_json.class_colors)

    def save(index, image, mask, prediction):
        if args.save_vis:
            save_panel(output_dir / "visualizations" / f"{dataset.name(index)}.png", image, mask, prediction, colours)

    report = evaluate_model(model, dataset, split=args.split, window=window, mode=args.resize_or_windowslide,
                            overlap=args.overlap, batch_size=args.batch_size, device=device,
                            n_bootstrap=args.n_bootstrap, seed=args.seed, on_image=save)
    json_path, csv_path = report.write(output_dir)
    print(f"{checkpoint} on {dataset_json.path.name} [{args.split}], {len(report.per_image)} images, "
          f"{args.resize_or_windowslide} {window}px")
    print(report.table())
    if report.skipped:
        print(f"\n{len(report.skipped)} images without mask were not scored.")
    print(f"\nwrote {json_path} and {csv_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "evaluate", summary="score a checkpoint on a dataset split (metrics table, JSON, CSV)",
        description="Predict every image of a split at native resolution and report pooled metrics with\n"
                    "95 % bootstrap confidence intervals (metrics.json, metrics.csv). The bootstrap resamples the\n"
                    "dataset's groups (a 'group' per item, else the TCGA patient in the file name, else each\n"
                    "image), so tiles of one slide or patient count as one unit.",
        examples=["python -m pfmseg_engine evaluate --checkpoint logs/exp --input_json data.json",
                  "python -m pfmseg_engine evaluate --checkpoint best.pt --input_json data.json --split val "
                  "--output_dir scores --save_vis"])
    parser.add_argument("--checkpoint", required=True, help="best.pt / last.pt, or an experiment folder")
    parser.add_argument("--input_json", required=True, help="dataset JSON in the seed format")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--output_dir", default=None, help="where metrics.json/metrics.csv go "
                        "(default: eval_<split> beside the checkpoint)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 or auto")
    parser.add_argument("--weights", default=None, help="backbone weights file, if not where training found it")
    parser.add_argument("--input_size", type=int, default=None, help="window size (default: training input size)")
    parser.add_argument("--resize_or_windowslide", choices=("windowslide", "resize"), default="windowslide",
                        help="sliding windows at native resolution, or one resized window")
    parser.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction (windowslide)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--ignore_index", type=int, default=255, help="mask value that is never scored")
    parser.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=42, help="bootstrap random seed")
    parser.add_argument("--save_vis", action="store_true", help="write image | mask | prediction panels")
    parser.set_defaults(func=run)
