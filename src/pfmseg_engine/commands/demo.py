"""``demo``: the whole workflow on an embedded sample slide, offline, in a few minutes."""

from __future__ import annotations

import argparse

from . import add_command


def run(args: argparse.Namespace) -> int:
    from ..demo.run import format_report, run_demo

    result = run_demo(args.output_dir, epochs=args.epochs, device=args.device, progress=not args.no_progress)
    print(format_report(result))
    return 0


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
