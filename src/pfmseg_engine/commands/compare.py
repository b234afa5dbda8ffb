"""``compare``: which foundation model and tuning strategy for this dataset? A ranked leaderboard with CIs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from . import add_command
from .train import add_import_flags

if TYPE_CHECKING:
    from ..compare import Phase


class CacheBar:
    """A tqdm bar over the feature-cache fill (the ``cache`` phase events; training has its own bars)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: Any = None

    def show(self, phase: Phase) -> None:
        if not self.enabled or phase.name != "cache":
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.total != phase.total:  # a new fill (another backbone's cache)
            self.close()
            self.bar = tqdm(total=phase.total, desc="caching backbone features", unit="window", leave=False,
                            file=sys.stderr)
        self.bar.update(phase.done - self.bar.n)
        if phase.done >= phase.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    from ..compare import CompareSpec, Comparison
    from ..training import TqdmProgress, load_config

    data = None
    if args.slides or args.annotations:
        from ..compare.data import compare_on_slides
        from .train import import_options

        config = load_config(args.config, args.options, check_dataset=False)
        # prepare_slides checks that there is one annotation file per slide
        config, data = compare_on_slides(config, args.slides or [], args.annotations or [],
                                         train_mpp=args.train_mpp, mpp=args.mpp, import_options=import_options(args))
    else:
        config = load_config(args.config, args.options)
    spec = CompareSpec(
        pfms=args.pfms or (), strategies=args.strategies or (), seeds=args.seeds or (), weights=args.weights or {},
        tiny=args.tiny, feature_cache=args.feature_cache, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype,
        crop_stride=args.crop_stride, time_budget_s=args.time_budget, budget_s=args.budget,
        n_bootstrap=args.n_bootstrap, throughput_steps=args.throughput_steps, device=args.device,
        checkpoints=tuple(args.checkpoints or ()),
    )
    callbacks = [] if args.no_progress else [TqdmProgress()]
    comparison = Comparison(config, spec, args.output_dir, data=data, callbacks=callbacks, config_path=args.config)
    events = comparison.iter_run()
    bars = CacheBar(enabled=not args.no_progress)
    try:
        while True:
            kind, value = next(events)
            if kind == "run":
                print(f"[{value.index}/{value.total}] {value.combination} seed {value.seed}", file=sys.stderr,
                      flush=True)
            elif kind == "result" and value.get("source"):
                print(f"checkpoint {value['source']}: " + ("scored" if value.get("status") == "ok" else "failed"),
                      file=sys.stderr, flush=True)
                if value.get("status") == "failed":
                    print(f"  failed: {value['error']}", file=sys.stderr, flush=True)
            elif kind == "result" and value.get("status") == "failed":
                print(f"  failed: {value['error']}", file=sys.stderr, flush=True)
            elif kind == "phase":
                bars.show(value)
    except StopIteration as done:
        result = done.value
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are kept and ranked in {comparison.output_dir}; run the same command "
              "again to do the rest.", file=sys.stderr)
        return 130
    finally:
        bars.close()
    board = result.leaderboard
    print(f"\nScored on {board.eval_split}; metrics pooled over images and seeds; 95 % CIs and Holm-adjusted "
          "p-values from a hierarchical bootstrap (seeds, then groups of images).")
    print(board.table())
    for note in board.notes:
        print(f"note: {note}")
    print(f"\nleaderboard: {', '.join(str(p) for p in result.files.values())}")
    if board.winner is not None:
        print("\n" + "\n".join(board.next_steps))
    if result.failed:
        print(f"\n{len(board.failed)} combination(s) failed; see the error column (fix and rerun: finished runs are "
              "reused).", file=sys.stderr)
        return 1
    return 0 if result.status == "completed" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "compare", summary="rank foundation models x tuning strategies on your dataset (leaderboard)",
        description="Train every backbone x strategy x seed on the config's dataset, score each on the test split\n"
                    "(the val split when test has no masks) and write leaderboard.csv/.md/.png: mIoU, mean Dice,\n"
                    "pixel accuracy and per-class Dice with 95 % CIs (bootstrap over seeds, then slides/patients\n"
                    "or images), Holm-adjusted p-values versus the best row, trainable parameters, training\n"
                    "time and inference speed. Rerunning the same command only runs what is missing; a failing\n"
                    "combination is recorded and the others go on. Frozen backbones reuse cached features when\n"
                    "the augmentation is limited to flips and rotations. --checkpoints ranks already trained\n"
                    "models (a saved live head, an earlier train run) as they are, scored on the same images.",
        examples=["python -m pfmseg_engine compare --config my.yaml --pfms uni_v1,phikon,kaiko-vits16,unet "
                  "--strategies frozen,cnn_adapter,lora --seeds 3 --output_dir cmp --weights "
                  "uni_v1=/models/uni.bin phikon=hf-hub: kaiko-vits16=/models/kaiko_s16.safetensors",
                  "python -m pfmseg_engine compare --config my.yaml --pfms virchow_v2,uni_v2 --output_dir cmp "
                  "--options protocol=frozen_light_decoder training.augmentation.zoom=null "
                  "'training.augmentation.transforms={color_jitter: {p: 0}, hed_jitter: {p: 0}}'",
                  "python -m pfmseg_engine compare --config my.yaml --pfms kaiko-vits16,lunit_vits8,unet --tiny "
                  "--seeds 2 --output_dir demo_cmp --options training.epochs=2",
                  "python -m pfmseg_engine compare --config my.yaml --pfms uni_v1,phikon --slides a.svs b.ndpi "
                  "--annotations a.geojson b.geojson --train_mpp 0.5 --output_dir cmp",
                  "python -m pfmseg_engine compare --config my.yaml --pfms uni_v1 --strategies frozen,lora "
                  "--checkpoints live_head.pt runs/uni/checkpoints/best.pt --weights uni_v1=/models/uni.bin "
                  "--output_dir cmp"])
    parser.add_argument("--config", required=True, help="YAML training config (seed format; its dataset is used)")
    parser.add_argument("--pfms", default=None,
                        help="comma-separated backbones; 'unet' adds the UNet baseline row (may be left out with "
                             "--checkpoints)")
    parser.add_argument("--checkpoints", nargs="+", default=None, metavar="PATH",
                        help="trained checkpoints (.pt) to rank as they are, not retrained: each is a row named "
                             "after its file, scored on the same images; its classes must be the dataset's")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated tuning strategies (default: the config's finetune_mode.type)")
    parser.add_argument("--seeds", default=None,
                        help="number of seeds (3: seeds 0,1,2) or a list (0,5,7); default: system.seeds, else "
                             "system.seed")
    parser.add_argument("--output_dir", required=True, help="folder for runs/, the leaderboard and the cache")
    parser.add_argument("--slides", nargs="+", metavar="SLIDE",
                        help="compare on whole slides instead of the config's dataset (with --annotations)")
    parser.add_argument("--annotations", nargs="+", metavar="FILE",
                        help="one QuPath GeoJSON or saved label store per --slides entry, in the same order; a "
                             "share of the annotated regions is held out and scored")
    parser.add_argument("--train_mpp", type=float, default=None,
                        help="resolution to train and score slides at (default: the model's, else 0.5 µm/px)")
    parser.add_argument("--mpp", type=float, default=None, help="level-0 µm/px, for slides without it")
    add_import_flags(parser.add_argument_group("QuPath GeoJSON import (with --slides)"))
    parser.add_argument("--weights", nargs="+", default=None, metavar="NAME=PATH",
                        help="backbone weights, e.g. uni_v1=/models/uni.bin phikon=hf-hub: (the config's "
                             "pfm_weights_path applies to its own pfm_name)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config keys for every run, as in train")
    parser.add_argument("--tiny", action="store_true",
                        help="small random-weight variants (tests and demos: the scores are meaningless)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 or auto (overrides system.device)")
    parser.add_argument("--feature_cache", choices=("auto", "on", "off"), default="auto",
                        help="auto: fixed crop set + cached frozen features when the augmentation allows it "
                             "(flips/rotations only, zoom null); on: require it; off: train as 'train' does")
    parser.add_argument("--cache_dir", default=None, help="feature cache folder (default: OUTPUT_DIR/feature_cache)")
    parser.add_argument("--cache_dtype", choices=("float32", "float16"), default="float32",
                        help="cached feature precision (float32 is exact, float16 halves the disk)")
    parser.add_argument("--crop_stride", type=int, default=None,
                        help="step of the fixed crop grid in pixels (default: half the crop)")
    parser.add_argument("--time_budget", type=float, default=None, metavar="SECONDS",
                        help="training time per run (combination x seed); stops at the epoch that would exceed it")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="wall time of the whole comparison (cache fill, training, scoring); runs that would "
                             "start after it are not run and say so")
    parser.add_argument("--n_bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    parser.add_argument("--throughput_steps", type=int, default=5,
                        help="batches timed for the inference windows/s column (0: skip)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    parser.set_defaults(func=run)
