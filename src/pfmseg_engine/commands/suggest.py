"""``suggest``: where to annotate next, as QuPath GeoJSON annotations.

    python -m pfmseg_engine suggest --checkpoint live.pt --slide a.svs --output_dir out [-k 8] [--box 256]

For each slide the model's uncertainty and its features rank tissue windows at the model's resolution
(k-center greedy over features, weighted by uncertainty: see :mod:`pfmseg_engine.live.suggest`); the
``k`` regions go to ``<output_dir>/<slide>_suggestions.geojson`` (class "Suggestion", named by rank,
scores as measurements) and ``.json``. A frozen model's features are stored in (or read from) the
feature store, so a second run costs only the head.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..slides import READER_HELP, READERS
from . import add_command

if TYPE_CHECKING:
    from ..live.store import FillProgress


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..checkpoint import load_checkpoint
    from ..devices import resolve_device
    from ..live.suggest import suggest_regions, suggestions_json, write_suggestions
    from ..slides import open_slide
    from ..storage import ensure_output_dir, writing
    from .infer import resolve_checkpoint

    output = ensure_output_dir(args.output_dir)
    device = resolve_device(args.device)
    model = load_checkpoint(resolve_checkpoint(args.checkpoint), weights=args.weights, device=device)
    if args.annotations and len(args.annotations) != len(args.slide):
        raise ConfigError(f"Give one --annotations file per --slide ({len(args.slide)} slide(s), "
                          f"{len(args.annotations)} annotation file(s)), in the same order.")
    for index, path in enumerate(args.slide):
        with open_slide(path, mpp=args.mpp, reader=args.reader) as slide:
            bars: dict[str, Any] = {}

            def bar(name: str, done: int, total: int, bars: dict[str, Any] = bars, slide: Any = slide) -> None:
                if name not in bars:
                    bars[name] = tqdm(total=total, desc=f"{name} {slide.name}", unit="window")
                bars[name].total = total
                bars[name].update(done - bars[name].n)

            def on_fill(event: FillProgress, bar: Callable[[str, int, int], None] = bar) -> None:
                bar("features", event.done, event.total)

            def on_score(done: int, total: int, bar: Callable[[str, int, int], None] = bar) -> None:
                bar("scoring", done, total)

            regions = suggest_regions(
                model, slide, k=args.k, box=args.box, mpp=args.target_mpp, window=args.window or args.input_size,
                tissue=args.tissue, store_root=args.store, use_store=args.store_features, width=args.width,
                uncertainty=args.uncertainty,
                batch_size=args.batch_size, device=device, region=args.region,
                annotations=args.annotations[index] if args.annotations else None,
                on_fill=on_fill, progress=on_score)
            for item in bars.values():
                item.close()
            target = output / f"{slide.name}_suggestions.geojson"
            write_suggestions(regions, target, slide=slide, frame=args.geojson_frame)
            with writing(target, "the suggested regions"):
                target.with_suffix(".json").write_text(suggestions_json(regions), encoding="utf-8")
            print(f"{slide.name}: {len(regions)} regions -> {target}")
            for region in regions:
                print(f"  {region.rank}. x {region.x:.0f} y {region.y:.0f} {region.width:.0f}x{region.height:.0f} px"
                      f"  uncertainty {region.uncertainty:.3f}  diversity {region.distance:.3f}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "suggest", summary="propose regions to annotate next (QuPath GeoJSON)",
        description="Rank each slide's tissue windows by the model's uncertainty and their diversity in\n"
                    "feature space, and write the best K as QuPath GeoJSON annotations\n"
                    "(<output_dir>/<slide>_suggestions.geojson) so QuPath users can label them next.",
        examples=["python -m pfmseg_engine suggest --checkpoint live.pt --slide a.svs --output_dir out -k 8",
                  "python -m pfmseg_engine suggest --checkpoint logs/exp --slide a.svs b.ndpi --output_dir out "
                  "--target_mpp 0.5 --box 256"])
    parser.add_argument("--checkpoint", required=True, help="pfmseg checkpoint file, or a training output folder")
    parser.add_argument("--weights", help="backbone weights file, if not where the checkpoint says")
    parser.add_argument("--slide", nargs="+", required=True, metavar="PATH", help="slide files")
    parser.add_argument("--output_dir", required=True, help="folder for the GeoJSON (and JSON) suggestions")
    parser.add_argument("-k", "--regions", dest="k", type=int, default=8, help="regions per slide (default 8)")
    parser.add_argument("--box", type=int, metavar="PX",
                        help="side of a suggested square in model pixels (default: the window)")
    parser.add_argument("--device", default=None, help="auto, cuda, cuda:1, mps or cpu (default auto)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per model call (default 4)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="window size in pixels (default: the model's training size)")
    parser.add_argument("--window", type=int, help="window size (default: --input_size or the model's)")
    parser.add_argument("--reader", choices=READERS, default="auto", help=READER_HELP)
    parser.add_argument("--mpp", type=float, help="level-0 microns per pixel, for slides without it")
    parser.add_argument("--target_mpp", type=float,
                        help="resolution to rank at (default: the model's training mpp, else level 0)")
    parser.add_argument("--tissue", action=argparse.BooleanOptionalAction, default=True,
                        help="suggest tissue only (default on)")
    parser.add_argument("--region", nargs=4, type=float, metavar=("X", "Y", "W", "H"),
                        help="suggest only within this level-0 rectangle")
    parser.add_argument("--annotations", nargs="+", metavar="GEOJSON",
                        help="what is labelled already (QuPath GeoJSON, one per slide): never suggested, and "
                             "suggestions move away from it in feature space")
    parser.add_argument("--uncertainty", choices=("entropy", "margin"), default="entropy",
                        help="per-pixel uncertainty (default entropy)")
    parser.add_argument("--store", help="feature store folder (default: <pfmseg cache>/features)")
    parser.add_argument("--width", type=int, metavar="R",
                        help="read a store of R principal components (see 'features --width'; default: full width)")
    parser.add_argument("--store_features", action=argparse.BooleanOptionalAction, default=True,
                        help="keep a frozen model's features in the feature store (default on)")
    parser.add_argument("--geojson_frame", choices=("qupath", "file"), default="qupath",
                        help="GeoJSON coordinates: QuPath's (default) or the file's full level-0 frame")
    parser.set_defaults(func=run)


__all__ = ["register", "run"]
