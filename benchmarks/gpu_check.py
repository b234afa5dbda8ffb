"""Every GPU question in one run: prints ONE JSON line (``benchmarks/gpu_check.sh`` calls this).

Measured on the first CUDA device, random weights, no network (about 3-6 minutes on one H100):

* ``slide``: ViT-L/16 (the ``uni_v1`` architecture) + ``fast`` head in bfloat16, whole-slide inference of a
  JPEG-tiled TIFF (real H&E texture) end to end in 224 px windows per second, against the same model on
  windows already on the GPU (model only); goal ratio >= 0.9 and >= 2,000 windows/s on an H100;
* ``feature_fill``: the live loop's feature store (:mod:`pfmseg_engine.live`) filling that slide's windows,
  as the store runs it and under bfloat16 autocast, against its own compute on resident windows;
* ``training``: LoRA and the CNN adapter on ViT-L/16 at 512 px, trainer steps/s (data loading included)
  against the model step alone (the ratio step/trainer, goal <= 1.15);
* ``peak_gpu_memory_gib``: the most GPU memory any part held;
* ``identity``: labels of a small slide from the GPU path and the CPU path, byte for byte (a stand-in model
  with exact arithmetic, so any difference is the pipeline's: staging, device stitching, spills), and the
  share of equal labels for the ViT-L in bfloat16 against float32 on the CPU (informative).

A part that fails is named with its error under ``errors`` (the others still run) and the status is 1.
Without a CUDA device it exits with status 2 and one line on stderr saying so. ``--tiny`` (hidden, with
``--device cpu``) runs the same code with small backbones and sizes on the CPU: the tests use it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (HERE, ROOT / "src"):
    if str(_path) not in sys.path:
        sys.path.insert(0 if _path == HERE else len(sys.path), str(_path))

#: What a run without a GPU prints (stderr) before exiting with status 2.
NO_CUDA = ("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with "
           "an NVIDIA GPU and a CUDA build of torch "
           "(check: python -c 'import torch; print(torch.cuda.is_available())').")

NO_CUDA_STATUS = 2

#: The live feature store's API notes; the feature fill is measured when its package imports.
LIVE_PACKAGE = "pfmseg_engine.live"


class NoCudaError(RuntimeError):
    """No CUDA device to check."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="side of the benchmark TIFF (default 16384)")
    parser.add_argument("--batch", type=int, default=128, help="windows per inference batch (default 128)")
    parser.add_argument("--train_batch", type=int, default=8, help="crops per training batch (default 8)")
    parser.add_argument("--train_samples", type=int, default=160, help="training samples per epoch (default 160)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch = min(args.size, 1024), min(args.batch, 8)
        args.train_batch, args.train_samples = min(args.train_batch, 2), min(args.train_samples, 4)
    return args


def require_device(name: str) -> Any:
    """The torch device to check; :class:`NoCudaError` when CUDA is asked for and absent."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoCudaError(NO_CUDA)
    return device


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: Any, into: dict[str, Any], key: str) -> Iterator[None]:
    """Record the peak GPU memory (GiB) of the block under ``into[key]`` (None on the CPU)."""
    import torch

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        into[key] = (round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)


def quiet() -> None:
    import logging

    logging.getLogger("pfmseg_engine").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


def vit_large(tiny: bool, window: int, strategy: str = "frozen") -> Any:
    """ViT-L/16 (``uni_v1``'s architecture, random weights) with the ``fast`` head; tiny: its small variant."""
    import torch

    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    torch.manual_seed(0)
    config = ModelConfig(backbone="uni_v1", tiny=tiny, num_classes=3, class_names=("a", "b", "c"), head="fast",
                         input_size=window, tuning=TuningConfig(strategy=strategy))
    return build_model(config).eval()


# ---- slide inference ------------------------------------------------------------------------------------
def model_only_rate(model: Any, device: Any, batch: int, window: int, steps: int) -> float:
    """Windows/s of the inference runner on uint8 windows already on the device (bfloat16 on CUDA)."""
    import torch

    from pfmseg_engine.inference.runner import ModelRunner

    runner = ModelRunner(model, device=device, batch_size=batch)
    windows = torch.randint(0, 256, (batch, window, window, 3), dtype=torch.uint8, device=device)
    for _ in range(2):
        runner.forward(windows)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward(windows)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def slide_inference(args: argparse.Namespace, device: Any, workdir: Path, model: Any) -> dict[str, Any]:
    from wsi_inference import OVERLAP, WINDOW, he_tiff, run_slide

    path = he_tiff(workdir / f"he_{args.size}.tif", args.size)
    model_rate = model_only_rate(model, device, args.batch, WINDOW, 3 if args.tiny else 30)
    run_slide(model, he_tiff(workdir / "he_warm.tif", 1024), str(device), args.batch)  # warm-up: kernels, pools
    timer, result = run_slide(model, path, str(device), args.batch)
    end_to_end = result.windows_run / timer.wall
    return {"slide_px": args.size, "window": WINDOW, "overlap": OVERLAP, "batch": args.batch,
            "windows": result.windows_run, "seconds": round(timer.wall, 2),
            "end_to_end_windows_per_s": round(end_to_end, 1), "model_only_windows_per_s": round(model_rate, 1),
            "ratio": round(end_to_end / model_rate, 3)}


# ---- the live loop's feature fill ---------------------------------------------------------------------
def live_available() -> str | None:
    """None when the live feature store imports, else why not (the reason goes into the JSON)."""
    try:
        __import__(f"{LIVE_PACKAGE}.store")
        from pfmseg_engine.live import SlideFeatureStore, build_live_model, live_model_config  # noqa: F401
    except Exception as exc:  # not built yet, or broken: the rest of the check still runs
        return f"{LIVE_PACKAGE} is not usable here ({type(exc).__name__}: {exc})"
    return None


def feature_fill(args: argparse.Namespace, device: Any, workdir: Path) -> dict[str, Any]:
    """Windows/s of the feature store filling a slide, against its own compute on resident windows."""
    import numpy as np
    import torch
    from wsi_inference import WINDOW, he_tiff

    from pfmseg_engine.live import SlideFeatureStore, build_live_model, live_model_config
    from pfmseg_engine.slides import open_slide

    size = min(args.size, 8192)
    path = he_tiff(workdir / f"he_{size}.tif", size)
    model = build_live_model(live_model_config("uni_v1", ("a", "b", "c"), tiny=args.tiny, window=WINDOW))
    model = model.to(device).eval()
    rows: dict[str, Any] = {"slide_px": size, "window": WINDOW, "batch": args.batch}
    for label, autocast in (("as_stored", False), ("bf16", True)):
        context = (torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device.type == "cuda"
                   else contextlib.nullcontext())
        with open_slide(path, mpp=0.5) as slide, context:
            store = SlideFeatureStore(model, slide, root=workdir / f"features-{label}", tissue=False)
            windows = store.tissue_windows()
            images = np.stack([store.window_image(w) for w in windows[:args.batch]])
            store.compute(images, device)  # warm-up
            sync(device)
            start = time.perf_counter()
            for _ in range(2 if args.tiny else 5):
                store.compute(images, device)
            sync(device)
            compute_rate = (2 if args.tiny else 5) * len(images) / (time.perf_counter() - start)
            start = time.perf_counter()
            filled = store.fill(device=device, batch_size=args.batch)
            sync(device)
            fill_rate = filled / (time.perf_counter() - start)
        rows[label] = {"windows": filled, "fill_windows_per_s": round(fill_rate, 1),
                       "compute_windows_per_s": round(compute_rate, 1), "ratio": round(fill_rate / compute_rate, 3)}
    return rows


# ---- training -----------------------------------------------------------------------------------------
def training(args: argparse.Namespace, device: Any, workdir: Path) -> dict[str, Any]:
    """LoRA and the CNN adapter on ViT-L/16 at 512 px: trainer against the model step (train_step's measures)."""
    import train_step

    from pfmseg_engine.training.trainer import available_cpus

    options = argparse.Namespace(
        backbone="uni_v1", tiny=args.tiny, head="fast", input_size=128 if args.tiny else 512,
        batch_size=args.train_batch, samples=args.train_samples, amp=device.type == "cuda",
        device=str(device), steps=2 if args.tiny else 10, warmup=1 if args.tiny else 3,
        num_workers=min(8, max(1, available_cpus() - 1)))
    rows = {}
    for strategy in ("lora", "cnn_adapter"):
        row = train_step.measure_pipeline(train_step.image_trainer, options, workdir / f"train-{strategy}", strategy)
        batch = options.batch_size
        rows[strategy] = {"input_px": options.input_size, "batch": batch, "num_workers": row["num_workers"],
                          "trainer_steps_per_s": round(row["trainer_samples_per_s"] / batch, 2),
                          "model_step_steps_per_s": round(row["model_step_samples_per_s"] / batch, 2),
                          "loader_samples_per_s": round(row["loader_samples_per_s"], 1),
                          "step_over_trainer": round(row["model_step_over_trainer"], 3)}
    return rows


# ---- byte identity against the CPU path ---------------------------------------------------------------
def labels_of(model: Any, slide_path: Path, device: str, out: Path, window: int, batch: int) -> Any:
    import numpy as np

    from pfmseg_engine.inference import LabelOutput, predict_slide
    from pfmseg_engine.slides import open_slide

    with open_slide(slide_path, mpp=0.5) as slide:
        result = predict_slide(model, slide, out, window=window, overlap=0.25, tissue=False, batch_size=batch,
                               device=device)
    return [np.asarray(level[:]) for level in LabelOutput(result.path).levels]


def identity(args: argparse.Namespace, device: Any, workdir: Path, model: Any) -> dict[str, Any]:
    import numpy as np
    from wsi_inference import WINDOW, StandIn, he_tiff

    path = he_tiff(workdir / "he_identity.tif", 1024)
    gpu = labels_of(StandIn(), path, str(device), workdir / "id-device", WINDOW, args.batch)
    cpu = labels_of(StandIn(), path, "cpu", workdir / "id-cpu", WINDOW, args.batch)
    same = len(gpu) == len(cpu) and all(a.shape == b.shape and np.array_equal(a, b)
                                        for a, b in zip(gpu, cpu, strict=False))
    small = he_tiff(workdir / "he_identity_small.tif", 512)
    vit_device = labels_of(model, small, str(device), workdir / "vit-device", WINDOW, args.batch)[0]
    vit_cpu = labels_of(model, small, "cpu", workdir / "vit-cpu", WINDOW, args.batch)[0]
    model.to(device)
    return {"slide_px": 1024, "labels_identical": bool(same), "pyramid_levels": len(gpu),
            "vit_label_agreement_vs_cpu_float32": round(float((vit_device == vit_cpu).mean()), 5)}


# ---- the run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = require_device(args.device)
    quiet()
    started = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "model": "ViT-L/16 (uni_v1 architecture, random weights) + fast head"
        + (" [tiny variant]" if args.tiny else ""), "dtype": "bfloat16" if device.type == "cuda" else "float32",
    }
    peaks: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def part(name: str, measure: Any, *extra: Any) -> Any:
        """One part's figures; a part that fails is recorded under ``errors`` and the others still run."""
        with peak_memory(device, peaks, name):
            try:
                return measure(args, device, workdir, *extra)
            except Exception as exc:  # reported in the JSON line, status 1
                errors[name] = f"{type(exc).__name__}: {exc}"
                return None

    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        workdir = Path(folder)
        from wsi_inference import WINDOW

        model = vit_large(args.tiny, WINDOW)
        result["slide"] = part("slide", slide_inference, model)
        reason = live_available()
        fill = part("feature_fill", feature_fill) if reason is None else None
        result["feature_fill"] = fill
        result["feature_fill_windows_per_s"] = fill["as_stored"]["fill_windows_per_s"] if fill else None
        if reason is not None or fill is None:
            result["feature_fill_reason"] = reason or errors.get("feature_fill")
        result["training"] = part("training", training)
        result["identity"] = part("identity", identity, model)
    result["errors"] = errors
    known = [v for v in peaks.values() if v is not None]
    result["peak_gpu_memory_gib"] = max(known) if known else None
    result["peak_gpu_memory_gib_by_part"] = peaks
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except NoCudaError as exc:
        print(exc, file=sys.stderr)
        return NO_CUDA_STATUS
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
