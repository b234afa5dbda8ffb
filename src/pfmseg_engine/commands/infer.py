"""``infer``: predict an image set (seed form) or whole slides.

Image set (flags as in the seed's ``scripts/infer.py``)::

    python -m pfmseg_engine infer --checkpoint best.pt --input_json data.json --output_dir out \\
        --input_size 512 --resize_or_windowslide windowslide --batch_size 8 --device cuda

Whole slides::

    python -m pfmseg_engine infer --slide a.svs b.ndpi --checkpoint best.pt --output_dir out \\
        [--mpp 0.25] [--target_mpp 0.5] [--no-tissue] [--overlap 0.25] [--blend gaussian] \\
        [--export ome-tiff geojson]

Cohorts (files, globs, folders and manifest CSVs mixed; one task per slide on a local cluster or a
running dask scheduler)::

    python -m pfmseg_engine infer --slide cohort/ 'more/**/*.ndpi' manifest.csv --checkpoint best.pt \
        --output_dir out [--scheduler local|local:N|tcp://host:8786] [--retries 1] [--recycle_after K]

Slides go to ``<output_dir>/<name>.ome.zarr`` (plus a tissue QC PNG); an interrupted run resumes
when the same command is run again, and finished slides are reused. Each slide's plan (resolution,
window and stride, windows and chunks, output path) is printed first; ``--dry_run`` prints only the
plans. A slide that fails is retried ``--retries`` times, then recorded as failed while the others go
on; ``summary.csv``/``.json``/``.md`` in the output folder say what happened to each slide, and the
exit code is 1 when any failed (a run of one slide stops with its error, exit code 2).
A slide predicted at a resolution more than 25 % away from the scale the model was trained at (a model
trained with area-scale crops has seen its images several times smaller) gets a warning on stderr that
names the ``--target_mpp`` matching training.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..distributed.cluster import SCHEDULER_CONNECT_TIMEOUT
from ..errors import CheckpointError, ConfigError, PfmsegError, TrainingScaleWarning
from ..jobs.cohort import CohortSettings
from ..jobs.prediction import EXPORTS, PredictionSettings
from ..paths import check_input_path
from ..slides import READER_HELP, READERS
from . import add_command
from .hints import flag_hint

if TYPE_CHECKING:
    from ..distributed import CohortSummary, SlideJob, SlideRecord
    from ..inference.plan import SlidePlan
    from ..training_scale import ScaleMismatch, TrainingScale

log = logging.getLogger(__name__)

#: Where the flags' defaults come from: the jobs' settings (flags left out keep them).
DEFAULTS = PredictionSettings()
COHORT_DEFAULTS = CohortSettings()
CHECKPOINT_NAMES = ("checkpoints/best.pt", "best.pt", "checkpoints/last.pt", "last.pt")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best one inside a training output folder (as the seed allowed)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"No checkpoint in folder '{path}' (looked for {', '.join(CHECKPOINT_NAMES)})."
        )
    return check_input_path(path, "Checkpoint", error=CheckpointError)  # a pipe would block the first read


def load_model(args: argparse.Namespace):
    from ..checkpoint import load_checkpoint

    return load_checkpoint(resolve_checkpoint(args.checkpoint), weights=args.weights, device="cpu")


def _seed_config(path: str | None) -> dict[str, Any]:
    """The few keys inference takes from a seed/training YAML (the checkpoint describes the model)."""
    if not path:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(check_input_path(path, "Config file", error=ConfigError).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read config '{path}': {exc}.") from exc
    return raw if isinstance(raw, dict) else {}


def run_image_set(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..inference.imageset import infer_image_set

    if not args.input_json:
        raise ConfigError("Give --input_json (image set) or --slide PATH (whole slides).")
    config = _seed_config(args.config)
    ignore_index = int((config.get("dataset") or {}).get("ignore_index", 255))
    model = load_model(args)
    input_size = args.input_size or model.config.input_size
    bar = tqdm(desc="Inference Progress", unit="image")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    settings = prediction_settings(args)
    result = infer_image_set(model, args.input_json, args.output_dir, input_size=input_size,
                             mode=args.resize_or_windowslide, batch_size=settings.batch_size, device=args.device,
                             overlap=settings.overlap, blend=settings.blend, split=args.split,
                             ignore_index=ignore_index, progress=progress)
    bar.close()
    if result.metrics:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()
                            if "_Class_" not in k and v is not None)
        print(f"Metrics: {summary}")
    print(f"Wrote {result.count} masks to {Path(args.output_dir) / 'predictions_masks'}")
    return 0


def scale_warning_text(mismatch: ScaleMismatch) -> str:
    """A :class:`~pfmseg_engine.training_scale.ScaleMismatch` in the CLI's words (names ``--target_mpp``)."""
    return (f"warning: {mismatch.summary()} Pass --target_mpp {mismatch.suggested_mpp:g} to predict at the "
            "training scale.")


class ScaleReporter:
    """Prints the engine's training-scale check for each resolution slides are predicted at, once per resolution.

    The engine's own :class:`~pfmseg_engine.errors.TrainingScaleWarning` (worded for Python users) is
    silenced while the CLI runs (:func:`cli_words_for_scale`), so each mismatch is reported once, here.
    """

    def __init__(self, training_scale: TrainingScale | None, write: Callable[[str], object]):
        self.training_scale = training_scale
        self.write = write
        self.seen: set[float] = set()

    def __call__(self, mpp: float | None) -> None:
        from ..training_scale import check_training_scale

        mismatch = check_training_scale(self.training_scale, mpp)
        if mismatch is not None and round(mismatch.prediction_mpp, 6) not in self.seen:
            self.seen.add(round(mismatch.prediction_mpp, 6))
            self.write(scale_warning_text(mismatch))


@contextlib.contextmanager
def cli_words_for_scale() -> Iterator[None]:
    """Silence the engine's Python-worded training-scale warning; :class:`ScaleReporter` words it for the CLI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingScaleWarning)
        yield


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _report(record: SlideRecord, write: Callable[[str], object] = print) -> None:
    """One slide's outcome (a :class:`~pfmseg_engine.distributed.SlideRecord`) for people."""
    result = record.result
    if result is None or record.outcome is None:
        error = record.error or ""
        write(f"FAILED {record.name} ({record.slide}): {error[:200]}{'...' if len(error) > 200 else ''}"
              f"{flag_hint(record.exception)}")
        return
    tissue = f", tissue {result.tissue_fraction:.0%}" if result.tissue_fraction is not None else ""
    state = "reused" if record.status == "reused" else f"{result.chunks_run}/{result.chunks_total} chunks run"
    write(f"{result.path}  ({result.shape[1]}x{result.shape[0]} px at {result.mpp:.4g} um/px, {state}{tissue})")
    for path in record.exports:
        write(f"  exported {path}")
    if record.outcome.measurements is not None:
        write(f"  measurements {record.outcome.measurements}")


def prediction_settings(args: argparse.Namespace) -> PredictionSettings:
    """The flags given, over :class:`~pfmseg_engine.jobs.PredictionSettings` (flags left out are None: the
    settings' defaults stay)."""
    if getattr(args, "tissue_roi", None) and args.tissue is False:
        raise ConfigError("--tissue_roi limits where tissue is; it needs tissue detection on (drop --no-tissue).")
    return DEFAULTS.with_overrides(
        target_mpp=getattr(args, "target_mpp", None), window=getattr(args, "window", None) or args.input_size,
        overlap=args.overlap, blend=args.blend, batch_size=args.batch_size,
        chunk=getattr(args, "chunk_size", None), tissue=getattr(args, "tissue", None),
        clip_to_tissue=getattr(args, "clip_to_tissue", None),
        probabilities=getattr(args, "probabilities", None), ngff=getattr(args, "ngff", None),
        device=args.device, mpp=getattr(args, "mpp", None), reader=getattr(args, "reader", None),
        overwrite=getattr(args, "overwrite", None), wait=getattr(args, "wait", None),
        exports=tuple(args.export) if getattr(args, "export", None) else None)


def cohort_settings(args: argparse.Namespace, progress: bool = True) -> CohortSettings:
    """The cohort flags (and every prediction flag) over :class:`~pfmseg_engine.jobs.CohortSettings`;
    ``progress``: GeoJSON exports show a bar (not on a cluster's workers)."""
    import dataclasses

    prediction = prediction_settings(args).with_overrides(geojson_options=geojson_options(args, progress))
    cohort = COHORT_DEFAULTS.with_overrides(retries=args.retries, recycle_after=args.recycle_after,
                                            weights=args.weights, progress=True)
    return dataclasses.replace(cohort, prediction=prediction)


def collect(args: argparse.Namespace) -> list[SlideJob]:
    """The slides ``--slide`` names (files, globs, folders, manifests), with the run's --mpp and --region."""
    from ..distributed import collect_slides

    return collect_slides(args.slide, mpp=args.mpp, region=args.region, tissue_roi=args.tissue_roi)


def geojson_options(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """The ``--geojson_*`` flags as :func:`~pfmseg_engine.inference.export_geojson` options (``progress``: a
    bar over the chunks traced)."""
    return {"per_region": args.geojson_per_region, "object_type": args.geojson_object_type,
            "min_area_um2": args.geojson_min_area_um2, "frame": args.geojson_frame,
            "level": args.geojson_level, "mpp": args.geojson_mpp, "progress": progress}


def plan_only(args: argparse.Namespace, settings: PredictionSettings, jobs: list[SlideJob]) -> int:
    """``--dry_run``: print each slide's plan (geometry, windows, chunks, paths) without building the model."""
    import dataclasses

    from ..checkpoint import checkpoint_training_scale, read_checkpoint
    from ..distributed.jobs import job_settings
    from ..inference.plan import ModelInfo
    from ..jobs.prediction import SlidePrediction

    payload = read_checkpoint(resolve_checkpoint(args.checkpoint))
    info = dataclasses.replace(ModelInfo.from_model_config(payload["config"]),
                               training_scale=checkpoint_training_scale(payload))
    check_scale = ScaleReporter(info.training_scale, _stderr)
    failed = 0
    for job in jobs:
        prediction = SlidePrediction(info, job.path, args.output_dir, job_settings(settings, job),
                                     region=job.region, name=job.name)
        try:
            with cli_words_for_scale():
                plan = prediction.plan()
                print(plan.summary())
                check_scale(plan.mpp)
                state = ("complete" if plan.final.exists() else
                         "partial: resumes" if plan.partial.exists() else "new")
                print(f"  output {state}; tissue QC {plan.qc_path or 'off'}; pyramid "
                      f"{' '.join(f'{w}x{h}' for h, w in plan.pyramid_shapes)}")
        except PfmsegError as exc:
            if len(jobs) == 1:
                raise
            failed += 1
            print(f"FAILED {job.label} ({job.path}): {exc}{flag_hint(exc)}")
        finally:
            prediction.close()
    if failed:
        print(f"{failed} of {len(jobs)} slides cannot be planned.")
    return 1 if failed else 0


def finish(cohort: CohortSummary) -> int:
    """Print the run's outcome; exit code 1 when any slide failed. A run of one slide that failed stops
    with that slide's error (one message, exit code 2)."""
    if len(cohort.records) == 1 and cohort.failed and isinstance(cohort.failed[0].exception, PfmsegError | OSError):
        exc = cohort.failed[0].exception
        raise exc  # the CLI's error line adds the flag that fixes it
    print(cohort.line() + f"; summary: {Path(cohort.output_dir) / 'summary.md'}")
    for record in cohort.failed:
        print(f"  failed: {record.name} ({record.slide}): {record.error}{flag_hint(record.exception)}")
    if cohort.failed:
        print("Run the same command again to retry the failed slides (finished ones are reused).")
    print("Open in napari: napari --plugin pfmseg <slide> (or drag the .ome.zarr onto the viewer).")
    return 1 if cohort.failed else 0


def run_on_cluster(args: argparse.Namespace, jobs: list[SlideJob]) -> int:
    """One slide per task on a local cluster (``local[:N]``) or the scheduler at ``--scheduler``."""
    from tqdm import tqdm

    from ..checkpoint import read_training_scale
    from ..distributed import run_cohort
    from ..distributed.cluster import open_client

    checkpoint = resolve_checkpoint(args.checkpoint)
    check_scale = ScaleReporter(read_training_scale(checkpoint), lambda text: tqdm.write(text, file=sys.stderr))

    def on_record(record: SlideRecord) -> None:  # slides are planned on the workers: check each one's mpp
        _report(record, tqdm.write)
        check_scale(record.result.mpp if record.result is not None else None)

    dashboard = None if str(args.dashboard).lower() in ("none", "off", "") else args.dashboard
    with open_client(args.scheduler, dashboard=dashboard, debug=bool(getattr(args, "debug", False)),
                     connect_timeout=args.scheduler_timeout) as client:
        cohort = run_cohort(checkpoint, jobs, args.output_dir, cohort_settings(args, progress=False),
                            client=client, on_record=on_record)
    return finish(cohort)


def run_slides(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..distributed import run_cohort
    from ..training_scale import training_scale_of

    jobs = collect(args)
    if args.dry_run:
        return plan_only(args, prediction_settings(args), jobs)
    if args.scheduler:
        return run_on_cluster(args, jobs)
    if args.recycle_after:
        log.warning("--recycle_after restarts cluster workers; without --scheduler it has no effect.")
    model = load_model(args)
    check_scale = ScaleReporter(training_scale_of(model), lambda text: tqdm.write(text, file=sys.stderr))

    def on_plan(plan: SlidePlan) -> None:
        tqdm.write(plan.summary())
        check_scale(plan.mpp)

    with cli_words_for_scale():
        cohort = run_cohort(resolve_checkpoint(args.checkpoint), jobs, args.output_dir, cohort_settings(args),
                            model=model, on_plan=on_plan, on_record=lambda record: _report(record, tqdm.write))
    return finish(cohort)


def run(args: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..storage import ensure_output_dir

    ensure_output_dir(args.output_dir)  # a file in the way or a read-only folder fails before any work
    if not getattr(args, "scheduler", None):  # on a cluster each worker resolves its own device
        args.device = str(resolve_device(args.device))
    return run_slides(args) if args.slide else run_image_set(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "infer", summary="predict an image set (seed JSON) or whole slides",
        description="Predict whole slides into <output_dir>/<name>.ome.zarr (plus a tissue QC PNG; an\n"
                    "interrupted run resumes when the same command runs again), or an image set in the\n"
                    "seed framework's form (masks, overlays and, with masks, metrics.json). Cohorts: --slide\n"
                    "takes files, globs, folders and manifest CSVs; failed slides are retried, then recorded\n"
                    "in summary.csv/json/md while the others go on; --scheduler spreads slides over workers.",
        examples=["python -m pfmseg_engine infer --slide a.svs b.ndpi --checkpoint best.pt --output_dir out "
                  "--export ome-tiff geojson",
                  "python -m pfmseg_engine infer --slide a.svs --checkpoint logs/exp --output_dir out --mpp 0.25 "
                  "--target_mpp 0.5 --region 1000 2000 4096 4096",
                  "python -m pfmseg_engine infer --slide cohort/ 'more/*.ndpi' manifest.csv --checkpoint best.pt "
                  "--output_dir out --scheduler local --recycle_after 50",
                  "python -m pfmseg_engine infer --checkpoint best.pt --input_json data.json --output_dir out "
                  "--input_size 512 --resize_or_windowslide windowslide --batch_size 8 --device cuda"])
    common = parser.add_argument_group("model and output")
    common.add_argument("--checkpoint", required=True,
                        help="pfmseg checkpoint file, or a training output folder")
    common.add_argument("--weights", help="backbone weights file, if not where the checkpoint says")
    common.add_argument("--output_dir", required=True, help="folder for the predictions")
    common.add_argument("--device", default=None,
                        help="auto, cuda, cuda:1, mps or cpu (default auto: cuda, then mps, then cpu)")
    common.add_argument("--batch_size", type=int, help=f"windows per model call (default {DEFAULTS.batch_size})")
    common.add_argument("--input_size", type=int, default=None,
                        help="window size / resize size in pixels (default: the model's training size)")
    common.add_argument("--overlap", type=float, help=f"window overlap fraction (default {DEFAULTS.overlap:g})")
    common.add_argument("--blend", choices=("gaussian", "constant"),
                        help="weighting of overlapping windows (default gaussian)")
    images = parser.add_argument_group("image set (seed form)")
    images.add_argument("--config", help="seed/training YAML (only dataset.ignore_index is used)")
    images.add_argument("--input_json", help="seed dataset JSON")
    images.add_argument("--split", default="test", help="dataset split to predict (default test)")
    images.add_argument("--resize_or_windowslide", choices=("resize", "windowslide"), default="windowslide",
                        help="resize images to --input_size, or slide windows over them (default)")
    slides = parser.add_argument_group("whole slides")
    slides.add_argument("--slide", nargs="+", metavar="PATH",
                        help="slides: files (SVS, NDPI, TIFF, OME-TIFF, MRXS, DICOM, PNG/JPEG, zarr, ...), globs "
                             "('cohort/**/*.svs', quoted), folders (the slide files inside) and manifest CSVs (a "
                             "slide_path column, optional mpp, name, region 'x y w h', target_mpp), mixed freely")
    slides.add_argument("--reader", choices=READERS, help=READER_HELP)
    slides.add_argument("--mpp", type=float,
                        help="level-0 microns per pixel, for slides without it (a manifest's mpp column wins)")
    slides.add_argument("--target_mpp", type=float,
                        help="resolution to predict at (default: the model's training mpp, else level 0); a "
                             "warning names the value matching the scale the model was trained at when they "
                             "differ by more than 25 %%")
    slides.add_argument("--window", type=int, help="window size (default: --input_size or the model's)")
    slides.add_argument("--tissue", action=argparse.BooleanOptionalAction,
                        help="skip background found by tissue detection (default on)")
    slides.add_argument("--clip_to_tissue", action=argparse.BooleanOptionalAction,
                        help="leave glass unlabelled inside windows that touch tissue (default on)")
    slides.add_argument("--chunk_size", type=int, help=f"output chunk side (default {DEFAULTS.chunk})")
    slides.add_argument("--probabilities", action="store_true", default=None, help="also store class probabilities")
    slides.add_argument("--ngff", choices=("0.4", "0.5"),
                        help="OME-Zarr version (default 0.4)")
    slides.add_argument("--export", nargs="+", choices=EXPORTS,
                        help="also write pyramidal OME-TIFF / GeoJSON")
    slides.add_argument("--tissue_roi", metavar="PATH",
                        help="your own tissue mask or region of interest (QuPath GeoJSON, label store or mask "
                             "image) instead of tissue detection; per slide: a manifest's tissue_roi column")
    slides.add_argument("--geojson_per_region", action="store_true",
                        help="GeoJSON export: one object per connected region (default: one per class)")
    slides.add_argument("--geojson_object_type", choices=("annotation", "detection"), default="annotation",
                        help="GeoJSON export: QuPath object type (default annotation)")
    slides.add_argument("--geojson_min_area_um2", type=float, default=0.0, metavar="UM2",
                        help="GeoJSON export: drop regions smaller than this many µm² (default 0)")
    slides.add_argument("--geojson_frame", choices=("qupath", "file"), default="qupath",
                        help="GeoJSON export coordinates: QuPath's (cropped to the scanned bounds, default) or "
                             "the file's full level-0 frame")
    resolution = slides.add_mutually_exclusive_group()
    resolution.add_argument("--geojson_level", type=int, metavar="K",
                            help="GeoJSON export: trace pyramid level K of the output (default 0: full "
                                 "resolution, every region, chunk by chunk in bounded memory)")
    resolution.add_argument("--geojson_mpp", type=float, metavar="UM",
                            help="GeoJSON export: trace the coarsest pyramid level at least this fine (µm/px)")
    slides.add_argument("--overwrite", action="store_true", default=None, help="redo slides whose output is complete")
    slides.add_argument("--wait", type=float, metavar="SECONDS",
                        help="if another process is writing the same output, wait this long for it (then reuse "
                             "its result) instead of stopping at once (default 0)")
    slides.add_argument("--region", nargs=4, type=int, metavar=("X", "Y", "W", "H"),
                        help="predict only this level-0 pixel rectangle of each slide (output keeps the offset; "
                             "a manifest's region column wins)")
    slides.add_argument("--retries", type=int, metavar="N",
                        help="attempts after a slide's first failure before it is recorded as failed and the run "
                             f"goes on (default {COHORT_DEFAULTS.retries}); the exit code is 1 when any slide failed")
    slides.add_argument("--scheduler", metavar="ADDRESS",
                        help="run one slide per task on dask.distributed: 'local' (a local cluster, one worker "
                             "process per GPU, else half the CPU cores), 'local:N' (N workers) or the address of "
                             "a running scheduler (tcp://host:8786)")
    slides.add_argument("--scheduler_timeout", type=float, default=SCHEDULER_CONNECT_TIMEOUT, metavar="SECONDS",
                        help="how long a --scheduler address gets to answer before the run stops with the reason "
                             f"(default {SCHEDULER_CONNECT_TIMEOUT:g}); dask's own logs show with --debug")
    slides.add_argument("--recycle_after", type=int, metavar="K",
                        help="with --scheduler: restart each worker process after K slides (frees leaked memory)")
    slides.add_argument("--dashboard", default=":8787", metavar="ADDRESS",
                        help="dashboard address of a --scheduler local cluster (default :8787; none: off)")
    slides.add_argument("--dry_run", action="store_true",
                        help="print each slide's plan (resolution, window and stride, windows, chunks, output "
                             "paths) and stop; the model is not built")
    parser.set_defaults(func=run)
