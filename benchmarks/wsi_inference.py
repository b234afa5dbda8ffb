"""Whole-slide inference benchmark: is the model, not the pipeline, the bottleneck?

Prints three ratios (goals from issue 5):

1. end-to-end slide throughput / model-only throughput on the same windows, model, batch size and
   thread count (goal >= 0.9). Model-only runs the exact windows the slide run computes, already
   decoded in memory; end-to-end adds reading/decoding, tissue detection, blending, spills, zarr
   writing and the pyramid.
2. peak memory versus slide size on lazily generated virtual slides with the same tissue area,
   each in its own subprocess (goal: flat; printed as largest / smallest peak).
3. time with tissue skipping / time without, on a slide with about 30 % tissue (goal <= 0.4).

Usage::

    PYTHONPATH=src python benchmarks/wsi_inference.py [--quick] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


class Timer:
    """Wall and process CPU seconds (CPU time is robust to other users of a shared machine)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def best(timers: list[Timer]) -> tuple[float, float]:
    return min(t.wall for t in timers), min(t.cpu for t in timers)


def small_model(window: int):
    """The smallest real model: tiny Kaiko ViT-S/16 with the CNN adapter and multi-level head."""
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, class_names=("a", "b", "c"),
                             tuning=TuningConfig(strategy="cnn_adapter"), head="multilevel",
                             input_size=window)
        return build_model(config).eval()


def model_only_seconds(model, slide, window: int, overlap: float, batch: int,
                       device: str) -> tuple[float, int]:
    """Time the model alone on every window of the slide's grid, pre-read into memory."""
    from pfmseg_engine.inference.runner import ModelRunner
    from pfmseg_engine.inference.window import pad_to_window, stride_for, window_starts

    runner = ModelRunner(model, device=device, batch_size=batch)
    image = slide.levels[0].compute()
    stride = stride_for(window, overlap, runner.patch_size)
    ys = window_starts(image.shape[0], window, stride)
    xs = window_starts(image.shape[1], window, stride)
    windows = [pad_to_window(image[y:y + window, x:x + window], window) for y in ys for x in xs]
    list(runner.predict_windows(windows[:batch]))  # warm-up
    with Timer() as timer:
        for _ in runner.predict_windows(windows):
            pass
    return timer, len(windows)


def end_to_end_seconds(model, slide, window: int, overlap: float, batch: int, device: str,
                       **options) -> tuple:
    """Time a whole-slide run; ``result.extra["model_seconds"]`` is the time spent in model calls."""
    from pfmseg_engine.inference import predict_slide
    from pfmseg_engine.inference.runner import ModelRunner

    spent = [0.0]
    call = ModelRunner.__call__

    def timed(self, batch_array):
        start = time.perf_counter()
        try:
            return call(self, batch_array)  # returns host arrays, so GPU work is finished here
        finally:
            spent[0] += time.perf_counter() - start

    ModelRunner.__call__ = timed
    try:
        with tempfile.TemporaryDirectory() as out, Timer() as timer:
            result = predict_slide(model, slide, out, window=window, overlap=overlap, batch_size=batch,
                                   device=device, **options)
    finally:
        ModelRunner.__call__ = call
    result.extra["model_seconds"] = spent[0]
    return timer, result


MEMORY_SCRIPT = r"""
import json, resource, sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[4])
from wsi_inference import small_model
from pfmseg_engine.inference import predict_slide
from pfmseg_engine.slides.virtual import virtual_slide
size = int(sys.argv[1])
slide = virtual_slide(size, size, mpp=0.25, tissue=[(2000, 3024, 2000, 3024)])
predict_slide(small_model(224), slide, sys.argv[2], window=224, batch_size=8)
print(json.dumps({"size": size, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_memory(sizes: list[int], threads: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as out:
            here = str(Path(__file__).parent)
            command = [sys.executable, "-c", MEMORY_SCRIPT, str(size), out, str(threads), here]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def thirty_percent_slide(size: int):
    """Virtual slide whose tissue covers 30 % of its area (two pieces, as on many biopsy slides)."""
    from pfmseg_engine.slides.virtual import virtual_slide

    big, small = int(size * np.sqrt(0.20)), int(size * np.sqrt(0.10))
    boxes = [(size // 20, size // 20 + big, size // 20, size // 20 + big),
             (size - size // 20 - small, size - size // 20, size - size // 20 - small, size - size // 20)]
    return virtual_slide(size, size, mpp=0.5, tissue=boxes, name="thirty")


def window_fraction(size: int, window: int, overlap: float, patch: int = 16) -> float:
    """Fraction of windows tissue skipping keeps on a 30 % slide of ``size`` (planning only, no model)."""
    from pfmseg_engine.inference.grid import WindowGrid
    from pfmseg_engine.inference.window import stride_for
    from pfmseg_engine.slides import detect_tissue

    slide = thirty_percent_slide(size)
    stride = stride_for(window, overlap, patch)
    tissue = detect_tissue(slide, halo_um=(window - stride) * slide.mpp)
    grid = WindowGrid((size, size), window, stride, 1024)
    kept = sum(len(p.windows) for p in grid.plan(lambda b: tissue.any_in(*b)).values())
    total = sum(len(p.windows) for p in grid.plan().values())
    return kept / total


def efficiency(args, model, window, overlap, batch, device) -> None:
    """[1] pipeline efficiency on a real slide (JPEG tiles), every window computed."""
    from pfmseg_engine.slides import open_slide

    slide = open_slide(SLIDE)
    model_times, e2e_times, busy = [], [], []
    for _ in range(args.repeats):
        timer, n = model_only_seconds(model, slide, window, overlap, batch, device)
        model_times.append(timer)
        timer, result = end_to_end_seconds(model, slide, window, overlap, batch, device, tissue=False)
        assert result.windows_run == n, (result.windows_run, n)
        e2e_times.append(timer)
        busy.append(result.extra["model_seconds"] / timer.wall)
    (model_wall, model_cpu), (e2e_wall, e2e_cpu) = best(model_times), best(e2e_times)
    print(f"[1] {n} windows: model only {model_wall:.2f}s wall ({n / model_wall:.2f} win/s), end to end "
          f"{e2e_wall:.2f}s ({n / e2e_wall:.2f} win/s) -> throughput ratio {model_wall / e2e_wall:.3f} wall, "
          f"{model_cpu / e2e_cpu:.3f} CPU time (goal >= 0.9)")
    print(f"    same ratio measured inside each end-to-end run (model-call time / total time, immune to "
          f"load changes between runs): {', '.join(f'{b:.3f}' for b in busy)}")


def memory(args) -> None:
    """[2] peak memory versus slide size."""
    sizes = [8192, 16384] if args.quick else [8192, 16384, 32768]
    rows = peak_memory(sizes, args.threads)
    peaks = [r["peak_mb"] for r in rows]
    listing = ", ".join(f"{r['size']}^2: {r['peak_mb']:.0f} MB" for r in rows)
    print(f"[2] peak memory {listing} -> largest / smallest {max(peaks) / min(peaks):.3f} (goal: flat, ~1.0)")


def skipping(args, model, window, overlap, batch, device) -> None:
    """[3] tissue skipping on a ~30 % tissue slide."""
    size = 3072 if args.quick else 8192
    full_times, skip_times = [], []
    for _ in range(args.repeats):
        timer, full = end_to_end_seconds(model, thirty_percent_slide(size), window, overlap, batch, device,
                                         tissue=False)
        full_times.append(timer)
        timer, skip = end_to_end_seconds(model, thirty_percent_slide(size), window, overlap, batch, device,
                                         tissue=True)
        skip_times.append(timer)
    (full_s, full_cpu), (skip_s, skip_cpu) = best(full_times), best(skip_times)
    print(f"[3] {size}^2 slide, tissue {skip.tissue_fraction:.0%}: "
          f"{skip.windows_run}/{full.windows_run} windows, "
          f"{skip_s:.2f}s vs {full_s:.2f}s -> time ratio {skip_s / full_s:.3f} wall, "
          f"{skip_cpu / full_cpu:.3f} CPU time (goal <= 0.4)")
    sizes = (3072, 8192, 16384, 32768)
    fractions = ", ".join(f"{s}^2: {window_fraction(s, window, overlap):.3f}" for s in sizes)
    print(f"    windows kept (time follows it, the model dominates) on larger 30 % slides: {fractions}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller slides (a few minutes on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats; best of each is kept")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3], help="which measurements to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    window, overlap, batch, device = args.window, 0.25, args.batch, args.device
    model = small_model(window).to(device)
    print(f"device {device}, torch threads {args.threads}, window {window}, overlap {overlap}, batch {batch}")

    if 1 in args.parts:
        efficiency(args, model, window, overlap, batch, device)
    if 2 in args.parts:
        memory(args)
    if 3 in args.parts:
        skipping(args, model, window, overlap, batch, device)


if __name__ == "__main__":
    main()
