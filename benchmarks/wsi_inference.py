"""Whole-slide inference benchmark: is the model, not the pipeline, the bottleneck?

Parts (``--parts``, default 1 2 3 4):

1. pipeline rate with a stand-in model that costs nothing (it returns its input as 3-class logits) on
   an 8192 x 8192 JPEG-tiled TIFF (512 px tiles, real H&E texture from the shipped CMU slide), in
   224 px windows per second and as a multiple of the time tifffile needs to decode the same level
   (goal >= 1,000 windows/s on 2 cores, i.e. at most ~4x the decode time), both as wall time and as
   process CPU time (steadier on a shared machine), with the tiles decoded in the reader threads (the
   default) and, alternating, through tiffslide's zarr store (the earlier path); a per-stage breakdown
   (thread CPU seconds) from one extra instrumented run; and the real ViT-S/16 (kaiko-vits16 + ``fast``)
   end to end both ways against model only (``--vit_size``, default 2048; goal: no slower);
2. per-window time of the whole pipeline against MONAI's ``sliding_window_inference`` on the same
   real model (tiny kaiko-vits16 + the ``fast`` head), the same image and overlap (same windows:
   asserted), MONAI given the decoded image in memory; each run in its own process, with its peak
   memory; ours is also run on a slide twice as wide (goal: <= 0.9x, memory flat);
3. head cost as a share of the backbone forward at 224 px for every head (ViT-S/16 backbone);
4. with ``--device cuda``: end-to-end throughput against model-only throughput for a ViT-L/16
   (uni_v1 architecture, random weights) in bfloat16 on the same TIFF (goal >= 0.9).

Earlier measurements, still available: 5 = end-to-end / model-only on the CMU slide with the tiny
CNN-adapter model, 6 = peak memory against virtual slide size, 7 = tissue skipping on ~30 % tissue.

Usage::

    PYTHONPATH=src python benchmarks/wsi_inference.py [--parts 1 2 3] [--size 8192] [--threads 2]
        [--device cpu|cuda] [--repeats 3] [--quick]

``pip install monai`` for part 2 (not a dependency of pfmseg). Timings on shared machines are noisy:
each figure is the best of ``--repeats`` runs, and ratios are taken between runs made alternately.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
WINDOW, OVERLAP = 224, 0.25


def quiet() -> None:
    """No "random weights" warnings: every model here is random on purpose."""
    import logging

    logging.getLogger("pfmseg_engine").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


class Timer:
    """Wall and process CPU seconds (CPU time is robust to other users of a shared machine)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


class StandIn(nn.Module):
    """Costs nothing: the normalised RGB input is returned as the logits of 3 classes."""

    patch_size = 16
    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def he_tiff(path: Path, size: int) -> Path:
    """A size x size JPEG-compressed TIFF tiled 512, mirrored tiles of the shipped CMU H&E slide."""
    import tifffile

    from pfmseg_engine.slides import open_slide

    if path.exists():
        return path
    with open_slide(CMU) as slide:
        base = np.asarray(slide.readers[0][:, :])
    reps = (-(-size // base.shape[0]), -(-size // base.shape[1]))
    rows = [np.concatenate([base if (i + j) % 2 == 0 else base[:, ::-1] for j in range(reps[1])], 1)
            for i in range(reps[0])]
    image = np.ascontiguousarray(np.concatenate(rows, 0)[:size, :size])
    tifffile.imwrite(path, image, tile=(512, 512), compression="jpeg", photometric="rgb")
    return path


def decode_seconds(path: Path, threads: int, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds of tifffile decoding the whole level, best of ``repeats``."""
    import tifffile

    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        with Timer() as timer:
            tifffile.imread(path, maxworkers=threads)
        best = min(best, (timer.wall, timer.cpu))
    return best


@contextlib.contextmanager
def decoding(path_name: str):
    """Decode TIFF tiles the ``direct`` way (tifffile in each reader thread, the default) or through
    tiffslide's ``zarr`` store (one event-loop thread for every reader: the earlier path), for A/B runs."""
    from pfmseg_engine.slides import readers

    original = readers.tiff_level_page
    if path_name == "zarr":
        readers.tiff_level_page = lambda handle, level: None
    try:
        yield
    finally:
        readers.tiff_level_page = original


def run_slide(model, path: Path, device: str, batch: int, **options):
    from pfmseg_engine.inference import predict_slide
    from pfmseg_engine.slides import open_slide

    with tempfile.TemporaryDirectory() as out, open_slide(path, mpp=0.5) as slide, Timer() as timer:
        result = predict_slide(model, slide, out, window=WINDOW, overlap=OVERLAP, tissue=False, batch_size=batch,
                               device=device, **options)
    return timer, result


@contextlib.contextmanager
def stage_counters():
    """Thread CPU seconds spent in each stage of the executor (wraps its methods while active)."""
    import importlib

    slide = importlib.import_module("pfmseg_engine.inference.slide")
    stitch = importlib.import_module("pfmseg_engine.inference.stitch")
    runner = importlib.import_module("pfmseg_engine.inference.runner")
    tilecache = importlib.import_module("pfmseg_engine.inference.tilecache")
    # the label store and spill classes are found where the executor imports them from
    store, spill_store = slide.LabelStore, slide.SpillStore

    totals: dict[str, float] = collections.defaultdict(float)
    lock = threading.Lock()
    targets = [(slide._Executor, "read", "read + cut windows (reader threads)"),
               (tilecache.TileCache, "_load", "  of which: read + decode tiles into the cache (reader threads)"),
               (stitch.Staging, "upload", "upload uint8 batch"),
               (runner.ModelRunner, "forward", "normalise + model"),
               (stitch.Stitcher, "add", "weight + add into accumulators"),
               (slide._Executor, "_complete", "hand on spills"),
               (spill_store, "get", "read spills"),
               (stitch.Stitcher, "finish", "divide, argmax (softmax)"),
               (store, "write", "zarr write level 0 (writer)"),
               (store, "_update_pyramid", "zarr pyramid update (writer)"),
               (spill_store, "save", "save spills (writer)"),
               (slide._Output, "mark_done", "done records (writer)")]
    originals = []
    for owner, name, label in targets:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.thread_time()
            try:
                return _original(*args, **kwargs)
            finally:
                with lock:
                    totals[_label] += time.thread_time() - start

        setattr(owner, name, functools.wraps(original)(timed))
    try:
        yield totals
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def vit_small():
    """The real ViT-S/16 (kaiko-vits16, full size, random weights), frozen, with the ``fast`` head."""
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ModelConfig(backbone="kaiko-vits16", num_classes=3, class_names=("a", "b", "c"),
                             tuning=TuningConfig(strategy="frozen"), head="fast", input_size=WINDOW)
        return build_model(config).eval()


def model_only_seconds(model, windows: int, batch: int, device: str = "cpu") -> Timer:
    """Wall and CPU seconds the inference runner needs for ``windows`` random uint8 windows already in memory."""
    from pfmseg_engine.inference.runner import ModelRunner

    runner = ModelRunner(model, device=device, batch_size=batch)
    data = torch.randint(0, 256, (batch, WINDOW, WINDOW, 3), dtype=torch.uint8, device=device)
    runner.forward(data)
    steps = -(-windows // batch)
    with Timer() as timer:
        for _ in range(steps):
            runner.forward(data)
    timer.wall, timer.cpu = timer.wall * windows / (steps * batch), timer.cpu * windows / (steps * batch)
    return timer


def part_pipeline(args) -> None:
    """[1] stand-in model on an 8192^2 JPEG-tiled TIFF: windows/s and multiple of the decode time, tiles
    decoded directly in the reader threads against through tiffslide's zarr store; the real ViT-S/16 both ways."""
    from pfmseg_engine.inference.window import stride_for, window_starts

    path = he_tiff(Path(args.workdir) / f"he_{args.size}.tif", args.size)
    n_side = len(window_starts(args.size, WINDOW, stride_for(WINDOW, OVERLAP)))
    decode, decode_cpu = decode_seconds(path, args.threads, args.repeats)
    decode_one, _ = decode_seconds(path, 1, args.repeats)
    print(f"[1] {args.size}^2 JPEG TIFF (512 px tiles): tifffile decodes it in {decode:.2f}s wall, {decode_cpu:.2f}s "
          f"CPU ({args.threads} threads), {decode_one:.2f}s (1 thread); {n_side ** 2} windows of {WINDOW} px at "
          f"overlap {OVERLAP}")
    torch.set_num_threads(1)  # the stand-in needs no compute threads: the cores go to reading and writing
    best: dict[str, Timer] = {}
    for _ in range(args.repeats):  # alternating, so load changes hit both
        for way in ("direct", "zarr"):
            with decoding(way):
                timer, result = run_slide(StandIn(), path, "cpu", args.batch)
            assert result.windows_run == n_side ** 2, (result.windows_run, n_side ** 2)
            if way not in best or timer.wall < best[way].wall:
                best[way] = timer
    for way, timer in best.items():
        print(f"    stand-in, tiles decoded {'in the reader threads' if way == 'direct' else 'in zarr event loop'}"
              f" ({way}): {timer.wall:.2f}s wall, {timer.cpu:.2f}s CPU -> {n_side ** 2 / timer.wall:,.0f} windows/s "
              f"= {timer.wall / decode:.1f}x the decode time, CPU {timer.cpu / decode_cpu:.1f}x "
              "(goal >= 1,000 windows/s, <= 4x)")
    with stage_counters() as totals:
        timer, _ = run_slide(StandIn(), path, "cpu", args.batch)
    print(f"    where the time goes (one instrumented run, direct, {timer.wall:.2f}s wall, {timer.cpu:.2f}s CPU; "
          "thread CPU seconds, nested stages overlap):")
    for label, seconds in totals.items():
        print(f"      {label:<72s} {seconds:6.3f}")
    torch.set_num_threads(args.threads)
    if args.vit_size:
        small = he_tiff(Path(args.workdir) / f"he_{args.vit_size}.tif", args.vit_size)
        model = vit_small()
        vit: dict[str, Timer] = {}
        windows = 0
        for _ in range(max(1, args.repeats - 1)):  # alternating, so load changes hit all three
            for way in ("direct", "zarr", "model only"):
                if way == "model only":
                    timer = model_only_seconds(model, windows, args.batch)
                else:
                    with decoding(way):
                        timer, result = run_slide(model, small, "cpu", args.batch)
                    windows = result.windows_run
                if way not in vit or timer.wall < vit[way].wall:
                    vit[way] = timer
        alone, direct, zarr = vit["model only"], vit["direct"], vit["zarr"]
        print(f"    real ViT-S/16 (kaiko-vits16 + fast head), {args.vit_size}^2, {windows} windows, {args.threads} "
              f"torch threads: model only {windows / alone.wall:,.1f} windows/s ({alone.cpu:.1f}s CPU); end to end "
              f"direct {windows / direct.wall:,.1f} windows/s ({direct.cpu:.1f}s CPU, throughput ratio "
              f"{alone.wall / direct.wall:.3f}), zarr {windows / zarr.wall:,.1f} windows/s ({zarr.cpu:.1f}s CPU, ratio "
              f"{alone.wall / zarr.wall:.3f}); direct / zarr time {direct.wall / zarr.wall:.3f}, CPU "
              f"{direct.cpu / zarr.cpu:.3f} (goal <= 1: no slower)")


MONAI_SCRIPT = r"""
import json, resource, sys, tempfile, time, warnings
warnings.simplefilter("ignore")
import numpy as np, torch
tool, path, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
sys.path.insert(0, sys.argv[5])
from wsi_inference import quiet, tiny_model, WINDOW, OVERLAP
quiet()
from pfmseg_engine.slides import open_slide
model = tiny_model()
with torch.inference_mode():
    model(torch.rand(batch, 3, WINDOW, WINDOW))  # warm-up
if tool == "monai":
    from monai.inferers import sliding_window_inference
    with open_slide(path, mpp=0.5) as slide:
        image = np.asarray(slide.readers[0][:, :])
    start = time.perf_counter()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)
    with torch.inference_mode():
        out = sliding_window_inference(x, WINDOW, batch, model, overlap=OVERLAP, mode="gaussian", sigma_scale=0.125)
        labels = (out[0].argmax(0) + 1).to(torch.uint8).numpy()
    seconds = time.perf_counter() - start
else:
    from pfmseg_engine.inference import predict_slide
    with tempfile.TemporaryDirectory() as out, open_slide(path, mpp=0.5) as slide:
        start = time.perf_counter()
        predict_slide(model, slide, out, window=WINDOW, overlap=OVERLAP, tissue=False, batch_size=batch)
        seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def tiny_model():
    """A real, small segmentation model: tiny kaiko-vits16, frozen, the ``fast`` head (random weights)."""
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, class_names=("a", "b", "c"),
                             tuning=TuningConfig(strategy="frozen"), head="fast", input_size=WINDOW)
        return build_model(config).eval()


def _subprocess(tool: str, path: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", MONAI_SCRIPT, tool, str(path), str(args.threads), str(args.batch),
               str(Path(__file__).parent)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_monai(args) -> None:
    """[2] the whole pipeline against MONAI's sliding_window_inference, same model, image and overlap."""
    try:
        import monai  # noqa: F401
    except ImportError:
        print("[2] skipped: pip install monai to compare with sliding_window_inference")
        return
    from pfmseg_engine.inference.window import stride_for, window_starts

    size = args.monai_size
    path = he_tiff(Path(args.workdir) / f"he_{size}.tif", size)
    wide = he_tiff(Path(args.workdir) / f"he_{2 * size}.tif", 2 * size)
    windows = len(window_starts(size, WINDOW, stride_for(WINDOW, OVERLAP))) ** 2
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternating, so load changes hit both
        ours.append(_subprocess("ours", path, args))
        theirs.append(_subprocess("monai", path, args))
    a, b = min(r["seconds"] for r in ours), min(r["seconds"] for r in theirs)
    print(f"[2] {size}^2 H&E TIFF, {windows} windows (the same grid as MONAI's), tiny kaiko-vits16 + fast head, "
          f"batch {args.batch}, {args.threads} threads:")
    print(f"    pfmseg (read, decode, stitch, write OME-Zarr + pyramid) {1e3 * a / windows:.2f} ms/window, "
          f"MONAI sliding_window_inference on the decoded image {1e3 * b / windows:.2f} ms/window "
          f"-> {a / b:.2f}x (goal <= 0.9)")
    big = min((_subprocess("ours", wide, args) for _ in range(max(1, args.repeats - 1))), key=lambda r: r["seconds"])
    big_monai = _subprocess("monai", wide, args)
    print(f"    peak memory {size}^2 -> {2 * size}^2: pfmseg {max(r['peak_mb'] for r in ours):.0f} -> "
          f"{big['peak_mb']:.0f} MB, MONAI {max(r['peak_mb'] for r in theirs):.0f} -> {big_monai['peak_mb']:.0f} MB "
          f"(4x the pixels); pfmseg at {2 * size}^2: {1e3 * big['seconds'] / (4 * windows):.2f} ms/window")


def part_heads(args) -> None:
    """[3] head cost as a share of the backbone forward (ViT-S/16 kaiko-vits16, 224 px)."""
    from pfmseg_engine.heads import HEADS
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    x = torch.rand(args.head_batch, 3, WINDOW, WINDOW, device=args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.head_threads)  # one thread: steadier on a shared machine

    def seconds(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    rows = []
    for head in HEADS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build_model(ModelConfig(backbone="kaiko-vits16", num_classes=3, head=head, input_size=WINDOW,
                                                tuning=TuningConfig(strategy="frozen"))).eval().to(args.device)
        except Exception as exc:  # a head that needs other settings
            rows.append(f"{head}: not built ({type(exc).__name__}: {exc})")
            continue
        params = sum(p.numel() for p in model.head.parameters())

        def encoder(m=model):
            return m.encoder(m.encoder.backbone.pad_to_patch_multiple((x - m.mean) / m.std))

        whole, alone = [], []
        with torch.inference_mode():
            model(x)
            for _ in range(args.repeats + 2):  # alternating, best of each
                alone.append(seconds(encoder))
                whole.append(seconds(lambda m=model: m(x)))
        w, e = min(whole), min(alone)
        rows.append(f"{head}: {params / 1e6:.2f} M parameters, head {max(0.0, w - e) / e:.0%} of the backbone "
                    f"forward ({1e3 * w / len(x):.1f} vs {1e3 * e / len(x):.1f} ms/window)")
    torch.set_num_threads(threads)
    print(f"[3] heads on ViT-S/16 (kaiko-vits16, frozen), {WINDOW} px, batch {args.head_batch}, {args.device}, "
          f"{args.head_threads} thread(s):")
    for row in rows:
        print(f"    {row}")


def part_gpu(args) -> None:
    """[4] ViT-L/16 in bfloat16 on CUDA: end-to-end / model-only throughput."""
    if args.device != "cuda" or not torch.cuda.is_available():
        print("[4] skipped: needs --device cuda and a GPU")
        return
    from pfmseg_engine.inference.runner import ModelRunner
    from pfmseg_engine.model import ModelConfig, build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ModelConfig(backbone="uni_v1", num_classes=3, head="fast", input_size=WINDOW)).eval()
    runner = ModelRunner(model, device="cuda", batch_size=args.gpu_batch)
    batch = torch.randint(0, 256, (args.gpu_batch, WINDOW, WINDOW, 3), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        runner.forward(batch)
    torch.cuda.synchronize()
    steps = 30
    start = time.perf_counter()
    for _ in range(steps):
        runner.forward(batch)
    torch.cuda.synchronize()
    model_rate = steps * args.gpu_batch / (time.perf_counter() - start)
    path = he_tiff(Path(args.workdir) / f"he_{args.size}.tif", args.size)
    timer, result = run_slide(model, path, "cuda", args.gpu_batch)
    e2e = result.windows_run / timer.wall
    print(f"[4] ViT-L/16 (uni_v1 architecture), bfloat16, batch {args.gpu_batch}: model only {model_rate:,.0f} "
          f"windows/s, end to end {e2e:,.0f} windows/s on {args.size}^2 -> {e2e / model_rate:.2f} (goal >= 0.9); "
          f"{torch.cuda.get_device_name()}")


# ---- earlier measurements (parts 5-7) ------------------------------------------------------------
def cnn_model(window: int):
    """The earlier benchmark's model: tiny kaiko-vits16 with the CNN adapter and the multilevel head."""
    from pfmseg_engine.model import ModelConfig, build_model
    from pfmseg_engine.tuning import TuningConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, class_names=("a", "b", "c"),
                             tuning=TuningConfig(strategy="cnn_adapter"), head="multilevel", input_size=window)
        return build_model(config).eval()


def part_efficiency(args) -> None:
    """[5] end-to-end / model-only throughput on the CMU slide, every window computed."""
    from pfmseg_engine.inference.runner import ModelRunner
    from pfmseg_engine.inference.window import pad_to_window, stride_for, window_starts
    from pfmseg_engine.slides import open_slide

    model = cnn_model(WINDOW).to(args.device)
    with open_slide(CMU) as slide:
        image = slide.levels[0].compute()
    stride = stride_for(WINDOW, OVERLAP)
    ys, xs = window_starts(image.shape[0], WINDOW, stride), window_starts(image.shape[1], WINDOW, stride)
    windows = [pad_to_window(image[y:y + WINDOW, x:x + WINDOW], WINDOW) for y in ys for x in xs]
    runner = ModelRunner(model, device=args.device, batch_size=args.batch)
    list(runner.predict_windows(windows[:args.batch]))
    model_best = e2e_best = float("inf")
    for _ in range(args.repeats):
        with Timer() as timer:
            for _ in runner.predict_windows(windows):
                pass
        model_best = min(model_best, timer.wall)
        timer, result = run_slide(model, CMU, args.device, args.batch)
        assert result.windows_run == len(windows)
        e2e_best = min(e2e_best, timer.wall)
    print(f"[5] CMU-1-Small-Region, {len(windows)} windows, tiny kaiko-vits16 + CNN adapter: model only "
          f"{model_best:.2f}s, end to end {e2e_best:.2f}s -> throughput ratio {model_best / e2e_best:.3f} "
          "(goal >= 0.9)")


MEMORY_SCRIPT = r"""
import json, resource, sys, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(int(sys.argv[3]))
sys.path.insert(0, sys.argv[4])
from wsi_inference import cnn_model, quiet
quiet()
from pfmseg_engine.inference import predict_slide
from pfmseg_engine.slides.virtual import virtual_slide
size = int(sys.argv[1])
slide = virtual_slide(size, size, mpp=0.25, tissue=[(2000, 3024, 2000, 3024)])
predict_slide(cnn_model(224), slide, sys.argv[2], window=224, batch_size=8)
print(json.dumps({"size": size, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def part_memory(args) -> None:
    """[6] peak memory against slide size (same tissue), each in its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for size in ([8192, 16384] if args.quick else [8192, 16384, 32768]):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-c", MEMORY_SCRIPT, str(size), out, str(args.threads),
                       str(Path(__file__).parent)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    peaks = [r["peak_mb"] for r in rows]
    listing = ", ".join(f"{r['size']}^2: {r['peak_mb']:.0f} MB" for r in rows)
    print(f"[6] peak memory {listing} -> largest / smallest {max(peaks) / min(peaks):.3f} (goal: flat)")


def thirty_percent_slide(size: int):
    from pfmseg_engine.slides.virtual import virtual_slide

    big, small = int(size * np.sqrt(0.20)), int(size * np.sqrt(0.10))
    boxes = [(size // 20, size // 20 + big, size // 20, size // 20 + big),
             (size - size // 20 - small, size - size // 20, size - size // 20 - small, size - size // 20)]
    return virtual_slide(size, size, mpp=0.5, tissue=boxes, name="thirty")


def part_skipping(args) -> None:
    """[7] time with tissue skipping / time without, on a slide with about 30 % tissue."""
    from pfmseg_engine.inference import predict_slide

    size, model = (3072 if args.quick else 8192), cnn_model(WINDOW).to(args.device)
    best = {True: float("inf"), False: float("inf")}
    runs = {}
    for _ in range(args.repeats):
        for tissue in (False, True):
            with tempfile.TemporaryDirectory() as out, Timer() as timer:
                runs[tissue] = predict_slide(model, thirty_percent_slide(size), out, window=WINDOW, overlap=OVERLAP,
                                             batch_size=args.batch, device=args.device, tissue=tissue)
            best[tissue] = min(best[tissue], timer.wall)
    print(f"[7] {size}^2 slide, tissue {runs[True].tissue_fraction:.0%}: {runs[True].windows_run}/"
          f"{runs[False].windows_run} windows, time ratio {best[True] / best[False]:.3f} (goal <= 0.4)")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


PARTS = {1: part_pipeline, 2: part_monai, 3: part_heads, 4: part_gpu, 5: part_efficiency, 6: part_memory,
         7: part_skipping}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2, 3, 4], choices=sorted(PARTS))
    parser.add_argument("--size", type=int, default=8192, help="side of the TIFF of parts 1 and 4 (default 8192)")
    parser.add_argument("--vit_size", type=int, default=2048,
                        help="side of the TIFF the real ViT-S/16 runs on in part 1 (default 2048; 0: skip)")
    parser.add_argument("--monai_size", type=int, default=2048,
                        help="side of the TIFF of part 2 (default 2048; ours also runs at twice that)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (parts 1, 2, 6, 7)")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--head_batch", type=int, default=2)
    parser.add_argument("--head_threads", type=int, default=1)
    parser.add_argument("--gpu_batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--workdir", default=None, help="where test TIFFs are written (default: a temporary folder)")
    args = parser.parse_args()
    quiet()
    if args.quick:
        args.size, args.monai_size = min(args.size, 4096), min(args.monai_size, 1024)
    torch.set_num_threads(args.threads)
    print(f"device {args.device}, {args.threads} threads, window {WINDOW}, overlap {OVERLAP}, batch {args.batch}")
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = args.workdir or workdir
        for part in args.parts:
            PARTS[part](args)


if __name__ == "__main__":
    main()
