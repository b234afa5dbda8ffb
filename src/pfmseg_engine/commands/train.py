"""``train``: train a segmentation model from a seed-style YAML config."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from . import add_command

if TYPE_CHECKING:
    from ..annotations.geojson import ImportOptions


def _class_map(pairs: list[str] | None) -> dict[str, str]:
    from ..errors import ConfigError

    mapping = {}
    for pair in pairs or []:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ConfigError(f"--class_map takes OLD=NEW pairs (e.g. 'Tumour=Tumor'), got '{pair}'.")
        mapping[old.strip()] = new.strip()
    return mapping


def add_import_flags(group: argparse._ArgumentGroup) -> None:
    """The QuPath GeoJSON import flags (``train``, ``compare``); the defaults are the engine's ImportOptions."""
    from ..annotations.geojson import CELL_SHAPES, IGNORE_RULES, ImportOptions

    defaults = ImportOptions()
    group.add_argument("--strict", action="store_true",
                       help="refuse GeoJSON points and lines (default: leave them out with one warning per file)")
    group.add_argument("--ignore_classes", choices=IGNORE_RULES, default=None,
                       help="classes QuPath ignores: 'qupath' trains classes ending in '*' (Ignore*, Artefact*) and "
                            "leaves them out of measurements, and never trains Region*, as QuPath does; 'prefix' "
                            "does not train classes starting with 'Ignore' (their areas read as not annotated) "
                            f"(default {defaults.ignore_classes})")
    group.add_argument("--cells", choices=CELL_SHAPES, default=None,
                       help="QuPath cell objects train on their cell boundary or on their nucleusGeometry "
                            f"(default {defaults.cells})")
    group.add_argument("--skip_unsupported", action="store_true", help=argparse.SUPPRESS)  # deprecated: the default


def import_options(args: argparse.Namespace) -> ImportOptions:
    """The engine's :class:`~pfmseg_engine.annotations.ImportOptions` of the flags given (others: its defaults)."""
    from ..annotations.geojson import ImportOptions
    from ..errors import ConfigError

    if args.skip_unsupported:
        if args.strict:
            raise ConfigError("--skip_unsupported and --strict contradict each other; give --strict to refuse points "
                              "and lines, or neither to leave them out with a warning.")
        print("note: --skip_unsupported is no longer needed (points and lines are left out with a warning by "
              "default) and will be removed; --strict refuses them.", file=sys.stderr)
    given = {"strict": True} if args.strict else {}
    given.update({name: getattr(args, name) for name in ("ignore_classes", "cells") if getattr(args, name)})
    return ImportOptions.of(given)


def _train(args: argparse.Namespace, config, callbacks):
    from ..errors import ConfigError
    from ..jobs.finetune import FineTune

    slide_flags = [args.annotations, args.train_mpp, args.mpp, args.class_map]
    if not args.slides:
        if any(flag is not None for flag in slide_flags):
            raise ConfigError("--annotations, --train_mpp, --mpp and --class_map train from whole slides; name the "
                              "slides with --slides (one per annotation file).")
        return FineTune.from_config(config, resume=args.resume, device=args.device, callbacks=callbacks).run().result

    if not args.annotations:
        raise ConfigError("--slides needs --annotations: one QuPath GeoJSON export (or label store saved from napari) "
                          "per slide, in the same order.")
    if config.system.seeds:
        raise ConfigError("system.seeds is not supported with --slides yet; remove it and train one seed per run.")
    job = FineTune.on_slides(config, args.slides, args.annotations, resume=args.resume, device=args.device,
                             callbacks=callbacks, train_mpp=args.train_mpp, mpp=args.mpp,
                             validation_share=args.validation_share, frame=args.annotation_frame,
                             class_map=_class_map(args.class_map), import_options=import_options(args),
                             clip=args.clip_annotations)
    return job.run().result


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..training import load_config
    from ..training.outputs import claimed_output_dir

    if args.overwrite and args.resume:
        raise ConfigError("--overwrite starts a new run over the old one and --resume continues it; give one of them.")
    options = [*(args.options or []), *(["logging.overwrite=true"] if args.overwrite else [])]
    config = load_config(args.config, options, check_dataset=not args.slides)
    with claimed_output_dir(config, args.resume) as config:  # the run's folder, before anything is built
        return _train_and_report(args, config)


def _train_and_report(args: argparse.Namespace, config) -> int:
    from ..training import TqdmProgress

    callbacks = [] if args.no_progress else [TqdmProgress()]
    try:
        result = _train(args, config, callbacks)
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
        print(f"seed {seed}: {run.status}, {run.epochs_completed} epochs; best validation {monitor} {best}")
    if hasattr(result, "summary"):
        stats = result.summary.get(monitor)
        value = "n/a" if stats is None else f"{stats['mean']:.4f} +- {stats['sd']:.4f} over {stats['n']} seeds"
        print(f"{result.status}: {result.split} {monitor} {value}; summary: {result.summary_csv}")
    else:
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f} (epoch {result.best_epoch})"
        print(f"{result.status}: {result.epochs_completed} epochs; best {monitor} {best}")
    print(f"outputs: {result.output_dir}")
    return 0 if result.status == "completed" else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "train", summary="train a model from a YAML config (seed format) or from whole slides",
        description="Train from a seed-style YAML config (keys: docs/config.md). Checkpoints, history and\n"
                    "curves go to logging.log_dir/logging.experiment_name (unset: a new run-DATE-TIME-NNN\n"
                    "folder per run); an interrupted run resumes (--resume), and a folder that holds a run\n"
                    "is never trained over unless --overwrite.\n"
                    "With --slides and --annotations, train from whole slides annotated in QuPath (GeoJSON\n"
                    "exports) or napari (saved label stores): classes come from the annotations, patches are\n"
                    "read around them at --train_mpp; unannotated pixels are not trained on. Read in QuPath's\n"
                    "terms: points and lines are left out with a warning (--strict refuses them), classes ending\n"
                    "in '*' are trained but not measured, Region* is not trained (docs/qupath.md).",
        examples=["python -m pfmseg_engine train --config my.yaml",
                  "python -m pfmseg_engine train --config my.yaml --slides a.svs b.ndpi "
                  "--annotations a.geojson b.geojson --train_mpp 0.5",
                  "python -m pfmseg_engine train --config my.yaml --options training.epochs=50 "
                  "model.finetune_mode.type=lora model.pfm_weights_path=/models/uni.bin",
                  "python -m pfmseg_engine train --config my.yaml --resume logs/exp/checkpoints/last.pt",
                  "python -m pfmseg_engine train --config my.yaml --options protocol=frozen_light_decoder "
                  "'system.seeds=[0, 1, 2]'"])
    parser.add_argument("--config", required=True, help="YAML config file (see configs/default.yaml)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue from a last.pt checkpoint (or the experiment folder holding it); with "
                             "system.seeds, continue every seed's run")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into an experiment folder that holds a run, deleting its checkpoints, evaluations "
                             "and history first (logging.overwrite); without it such a folder is refused")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 or auto (overrides system.device)")
    parser.add_argument("--options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override config keys, e.g. training.epochs=3 model.finetune_mode.type=lora")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    slides = parser.add_argument_group("training from whole slides (dataset.json_file is then not needed)")
    slides.add_argument("--slides", nargs="+", default=None, metavar="SLIDE",
                        help="whole-slide images to train on (SVS, NDPI, TIFF, MRXS ...)")
    slides.add_argument("--annotations", nargs="+", default=None, metavar="PATH",
                        help="one per slide, same order: QuPath 'Export objects as GeoJSON' files (level-0 pixel "
                             "coordinates) or label stores (.ome.zarr) saved by the napari plugin")
    slides.add_argument("--train_mpp", type=float, default=None, metavar="UM_PER_PX",
                        help="training resolution (default: model.mpp, else the backbone's pretraining "
                             "resolution, else 0.5)")
    slides.add_argument("--mpp", type=float, default=None, help="microns per pixel of slides without one in their "
                                                                 "metadata")
    slides.add_argument("--validation_share", type=float, default=0.2, metavar="SHARE",
                        help="share of annotated regions held out for validation (default 0.2; 0: none)")
    slides.add_argument("--class_map", nargs="+", default=None, metavar="OLD=NEW",
                        help="rename annotation classes, e.g. 'Tumour=Tumor'")
    slides.add_argument("--annotation_frame", choices=("qupath", "file"), default="qupath",
                        help="GeoJSON coordinates as QuPath shows the image (default; cropped to the scanned "
                             "bounds) or in the file's full level-0 frame")
    slides.add_argument("--clip_annotations", action="store_true",
                        help="clip annotations reaching outside their slide instead of stopping")
    add_import_flags(slides)
    parser.set_defaults(func=run)
