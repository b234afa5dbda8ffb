"""``features``: fill a slide's feature store (the backbone's token features live mode and suggestions read).

    python -m pfmseg_engine features --slide a.svs --checkpoint live.pt [--store DIR]
    python -m pfmseg_engine features --slide a.svs --backbone kaiko-vits16 --weights kaiko.safetensors \\
        --target_mpp 0.5 --window 512

The store is keyed by backbone, weights content, resolution, normalisation, position kernel and window,
so a later live session or ``suggest`` run with the same model reads it instead of running the backbone.
An interrupted fill resumes; a second process filling the same store waits ``--wait`` seconds or stops
naming the holder.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..errors import ConfigError
from ..slides import READER_HELP, READERS
from . import add_command


def build_model(args: argparse.Namespace) -> Any:
    """The model whose features are stored: a checkpoint's, or a live head on ``--backbone``."""
    if args.checkpoint:
        from ..checkpoint import load_checkpoint
        from .infer import resolve_checkpoint

        return load_checkpoint(resolve_checkpoint(args.checkpoint), weights=args.weights, device="cpu")
    if not args.backbone:
        raise ConfigError("Give --checkpoint CK (its model's features) or --backbone NAME (a live head's features).")
    from ..live.head import build_live_model, live_model_config

    blocks = tuple(args.blocks) if args.blocks else (-1,)
    config = live_model_config(args.backbone, ("class_1", "class_2"), weights=args.weights, tiny=args.tiny,
                               blocks=blocks, window=args.window or 512, mpp=args.target_mpp)
    return build_live_model(config)


def store_width(args: argparse.Namespace) -> int | None:
    """``--width``; by default what its reader uses: live mode's width for a live head on ``--backbone``,
    the full width for a checkpoint (what ``suggest`` reads)."""
    if args.width is not None:
        return None if args.width <= 0 else int(args.width)
    if args.checkpoint:
        return None
    from ..live.loop import LiveSettings

    return LiveSettings().width


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..devices import resolve_device
    from ..live.store import SlideFeatureStore
    from ..slides import open_slide

    device = resolve_device(args.device)
    model = build_model(args).to(device)
    for path in args.slide:
        with open_slide(path, mpp=args.mpp, reader=args.reader) as slide:
            store = SlideFeatureStore(model, slide, root=args.store, mpp=args.target_mpp, window=args.window,
                                      dtype=args.dtype, tissue=args.tissue, width=store_width(args))
            windows = store.tissue_windows(args.region)
            bar = tqdm(total=len(windows), desc=f"features {slide.name}", unit="window")
            began = time.perf_counter()

            def progress(event: Any, bar: Any = bar) -> None:
                bar.total = event.total
                bar.update(event.done - bar.n)

            computed = store.fill(args.region, windows=windows, device=device, batch_size=args.batch_size,
                                  wait=args.wait, progress=progress)
            bar.close()
            seconds = time.perf_counter() - began
            summary = {"slide": str(path), **store.summary(), "windows_computed": computed,
                       "windows_per_s": round(computed / seconds, 3) if computed and seconds > 0 else None}
            if args.json:
                print(json.dumps(summary))
                continue
            per_mm2 = summary["bytes_per_mm2"]
            size = f", {per_mm2 / 1e6:.2f} MB per mm² stored" if per_mm2 else ""
            print(f"{slide.name}: {summary['windows_stored']} windows stored ({computed} computed now), "
                  f"{summary['disk_bytes'] / 1e6:.1f} MB{size} -> {summary['directory']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "features", summary="store a slide's backbone features for live mode and suggestions",
        description="Compute a frozen backbone's token features of each slide's tissue once, at the model's\n"
                    "resolution, into a compressed zarr store keyed by backbone, weights, resolution,\n"
                    "normalisation and window (resumable; one writer at a time). Live mode and 'suggest'\n"
                    "read them instead of running the backbone again.",
        examples=["python -m pfmseg_engine features --slide a.svs --checkpoint live.pt",
                  "python -m pfmseg_engine features --slide a.svs b.ndpi --backbone kaiko-vits16 "
                  "--weights kaiko.safetensors --target_mpp 0.5 --store /data/features"])
    parser.add_argument("--slide", nargs="+", required=True, metavar="PATH", help="slide files")
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--checkpoint", help="a frozen-strategy pfmseg checkpoint (e.g. a saved live head)")
    model.add_argument("--backbone", help="a backbone name: store what a live head on it reads")
    parser.add_argument("--weights", help="backbone weights file (default: where the checkpoint says)")
    parser.add_argument("--tiny", action="store_true", help="with --backbone: its tiny test variant")
    parser.add_argument("--blocks", nargs="+", type=int, metavar="K",
                        help="with --backbone: the blocks a live head reads (default: the last)")
    parser.add_argument("--store", help="feature store folder (default: <pfmseg cache>/features)")
    parser.add_argument("--reader", choices=READERS, default="auto", help=READER_HELP)
    parser.add_argument("--mpp", type=float, help="level-0 microns per pixel, for slides without it")
    parser.add_argument("--target_mpp", type=float,
                        help="resolution of the features (default: the model's training mpp, else level 0)")
    parser.add_argument("--window", type=int, help="window side in pixels (default: the model's input size)")
    parser.add_argument("--width", type=int, metavar="R",
                        help="store wider tokens as R principal components (0: the full width; default: live "
                             "mode's width with --backbone, the full width with --checkpoint)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="stored precision (default float16: half the disk)")
    parser.add_argument("--tissue", action=argparse.BooleanOptionalAction, default=True,
                        help="store tissue windows only (default on)")
    parser.add_argument("--region", nargs=4, type=float, metavar=("X", "Y", "W", "H"),
                        help="store only windows touching this level-0 rectangle")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per backbone call (default 4)")
    parser.add_argument("--device", default=None, help="auto, cuda, cuda:1, mps or cpu (default auto)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for another process filling the same store (default 0: stop)")
    parser.add_argument("--json", action="store_true", help="print one JSON line per slide")
    parser.set_defaults(func=run)
