"""``demo``: the whole workflow on an embedded sample slide, offline, in a few minutes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import add_command

if TYPE_CHECKING:
    from ..demo.run import DemoResult


def run(args: argparse.Namespace) -> int:
    from ..demo.run import run_demo

    result = run_demo(args.output_dir, epochs=args.epochs, device=args.device, progress=not args.no_progress)
    print(format_report(result))
    return 0


def format_report(result: DemoResult) -> str:
    """What the demo prints: scores, where everything is, how to look at it, and the caveat."""
    from ..demo.run import DEMO_BACKBONE
    from ..demo.sample import DEMO_CLASS_NAMES

    rows = [f"{'':16s}{'mIoU':>8s}{'mean Dice':>11s}{'pixel acc':>11s}"]
    for name, m in result.metrics.items():
        rows.append(f"{name:16s}{m['mIoU']:8.3f}{m['Mean_Dice']:11.3f}{m['Pixel_Accuracy']:11.3f}")
    rows.append(f"{'majority class':16s}{'':8s}{'':11s}{result.baseline_pixel_accuracy:11.3f}")
    return "\n".join([
        "",
        "pfmseg demo: scores against the colour-deconvolution annotation "
        f"({', '.join(DEMO_CLASS_NAMES)})",
        *rows,
        "",
        f"training  {result.seconds_training:6.1f} s   checkpoint   {result.checkpoint}",
        f"                     training curve {result.training_curve}",
        f"inference {result.seconds_inference:6.1f} s   OME-Zarr     {result.prediction}",
        f"                     overlay        {result.overlay}",
        f"                     slide          {result.slide}",
        "",
        "Look at it in napari (pip install 'pfmseg[napari]'):",
        f"  napari --plugin pfmseg {result.slide} {result.prediction}",
        "",
        f"NOTE: this demo uses a small, randomly initialised {DEMO_BACKBONE} backbone because no pretrained",
        "weights can be assumed offline; the CNN adapter does the learning. Real use needs a pathology",
        "foundation model's published weights: 'python -m pfmseg_engine models' lists them, and",
        "model.pfm_weights_path (or --weights) points at the file or hf-hub id.",
    ])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "demo", summary="annotate, fine-tune and segment an embedded sample slide (offline, a few minutes)",
        description="Builds a small pyramidal TIFF from scikit-image's IHC image, derives a 3-class annotation\n"
                    "by colour deconvolution, fine-tunes a small backbone with a CNN adapter on half of it,\n"
                    "segments the whole slide through the whole-slide pipeline and scores the held-out half.",
        examples=["python -m pfmseg_engine demo", "python -m pfmseg_engine demo --output_dir demo_out --epochs 3"])
    parser.add_argument("--output_dir", default="pfmseg-demo", help="where everything is written")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 5)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
