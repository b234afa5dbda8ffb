"""Whole-slide prediction: chunk by chunk, tissue only, blended, resumable, streamed.

For each output chunk (raster order, or the chunks nearest a ``priority_box`` first) the predictor
reads just the pixels its own windows cover (prefetched by reader threads while the model works),
runs those windows through the model in batches, blends their logits with the window weight map,
adds the spills its left/upper neighbours left for it, and writes uint8 labels (and optionally
probabilities) into the OME-Zarr store. Memory is a few chunks whatever the slide size: no
whole-slide array, no full-size float canvas, no ``map_overlap``.

Output appears as ``<name>.ome.zarr.partial`` and is renamed to ``<name>.ome.zarr`` only when
complete. ``.pfmseg_work/`` inside it records finished chunks and holds the spills, so running the
same command again resumes where it stopped and writes byte-identical output. Every finished chunk
is reported (callback or iterator) so a viewer can show it at once; on resume the chunks finished
before are reported first (``computed=False``). ``region=`` predicts only part of the slide; the
output records where that part lies (NGFF translation, ``region_offset``), so it overlays the slide.
A complete output is reused only when it was made by the same model and settings (recorded in its
metadata); otherwise :class:`ConfigError` says what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..colors import ClassColors, class_palette
from ..errors import ConfigError, SlideError
from ..slides import Slide, detect_tissue, open_slide, plan_resolution, save_tissue_qc
from ..slides.readers import OffsetReader
from ..slides.resolution import DEFAULT_TOLERANCE, ResolutionPlan
from ..storage import OutputLock, describe_os_error, ensure_output_dir, writing
from .grid import ChunkPlan, WindowGrid, raster_order
from .omezarr import LabelOutput, LabelStore
from .runner import ModelRunner
from .schedule import Step, output_region, priority_order, schedule
from .spills import OUTGOING, SELF, SpillStore, split_accumulator
from .window import blend_weights, check_window, pad_to_window, softmax, stride_for

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 512
WORK = ".pfmseg_work"
SUFFIX = ".ome.zarr"
FORMAT_VERSION = 3  # 3: the slide is identified by content, not by path
#: Settings that change how fast a run goes, never what it writes: left out of the fingerprint.
RUNTIME_ONLY = ("batch_size", "prefetch", "read_workers")


@dataclass(frozen=True)
class SlideInferenceConfig:
    """Settings of one whole-slide run (all of them shape the output, so all are fingerprinted).

    ``target_mpp``: output resolution (default: the model's training mpp, else slide level 0).
    ``window``: window side in pixels (default: the model's input size, else 512); a multiple of the
    model's patch size. ``chunk``: output chunk side (rounded up to the window). ``tissue_halo_um``:
    tissue-mask dilation in micrometres (default: the window overlap, window - stride pixels).
    ``pyramid``: label downsampling, "mode" (2x2 majority) or "nearest".
    """

    target_mpp: float | None = None
    window: int | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    chunk: int = 1024
    tissue: bool = True
    tissue_halo_um: float | None = None
    probabilities: bool = False
    ngff: str = "0.4"
    pyramid: str = "mode"
    mpp_tolerance: float = DEFAULT_TOLERANCE
    prefetch: int = 2
    read_workers: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChunkResult:
    """One finished output chunk, as reported to callbacks and iterators.

    ``box`` is (y0, y1, x0, x1) in output pixels (OME-Zarr level 0); ``level0_box`` the same region in
    slide level-0 pixels (multiply by ``downsample``); ``labels`` uses 0 = no prediction, k = class k-1.
    ``shape`` is the whole output's (H, W) and ``store`` the zarr store being written (the
    ``.partial`` folder until the run completes), so a viewer can open it as a lazy layer.
    """

    index: tuple[int, int]
    box: tuple[int, int, int, int]
    labels: np.ndarray
    downsample: float
    computed: bool
    done: int
    total: int
    shape: tuple[int, int] = (0, 0)
    store: Path | None = None
    origin: tuple[float, float] = (0.0, 0.0)

    @property
    def level0_box(self) -> tuple[float, float, float, float]:
        """(y0, y1, x0, x1) in slide level-0 pixels (a region's offset included)."""
        d, (oy, ox) = self.downsample, self.origin
        y0, y1, x0, x1 = self.box
        return (y0 * d + oy, y1 * d + oy, x0 * d + ox, x1 * d + ox)


@dataclass
class SlideResult:
    """Where the output is and what the run did."""

    path: Path
    name: str
    shape: tuple[int, int]
    mpp: float
    class_names: tuple[str, ...]
    plan: ResolutionPlan
    tissue_fraction: float | None
    qc_path: Path | None
    chunks_total: int
    chunks_run: int = 0
    windows_run: int = 0
    resumed: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def model_fingerprint(model) -> str:
    """A cheap identity of the model's weights, so a resumed run never mixes two models."""
    digest = hashlib.sha1(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()) if hasattr(model, "state_dict") else []:
        t = tensor.detach()
        value = float(t.double().sum()) if t.is_floating_point() else float(t.sum())
        digest.update(f"{name}{tuple(t.shape)}{value:.10e}".encode())
    return digest.hexdigest()


class _Run:
    """State of one slide run; :func:`iter_predict_slide` drives it."""

    def __init__(self, model, slide: Slide, output_dir: Path, config: SlideInferenceConfig, device, name,
                 region: tuple[float, float, float, float] | None = None,
                 class_colors: ClassColors | None = None):
        self.config = config
        self.class_colors = class_colors
        self.slide = slide
        self.runner = ModelRunner(model, device=device, batch_size=config.batch_size)
        info = self.runner.info
        if info.num_classes > 254:
            raise ConfigError(f"{info.num_classes} classes do not fit uint8 labels (at most 254).")
        self.class_names = info.class_names
        self.plan = plan_resolution(slide, config.target_mpp or info.mpp, config.mpp_tolerance)
        window = config.window or info.input_size or DEFAULT_WINDOW
        self.window = check_window(window, info.patch_size)
        self.stride = stride_for(self.window, config.overlap, info.patch_size)
        self.weights = blend_weights(self.window, config.blend)
        chunk = max(int(config.chunk), self.window)
        ds = self.plan.downsample
        oy0, oy1, ox0, ox1 = (output_region(region, ds, self.plan.shape) if region is not None
                              else (0, self.plan.shape[0], 0, self.plan.shape[1]))
        self.shape = (oy1 - oy0, ox1 - ox0)
        self.out_origin = (oy0, ox0)  # output pixels of the whole slide's grid
        self.origin = (oy0 * ds, ox0 * ds)  # slide level-0 pixels
        self.region = None if region is None else {
            "x": self.origin[1], "y": self.origin[0], "width": self.shape[1] * ds, "height": self.shape[0] * ds}
        self.grid = WindowGrid(self.shape, self.window, self.stride, chunk)
        source = self.plan.source(slide)
        self.source = source if region is None else OffsetReader(source, oy0, ox0, *self.shape)
        default = slide.name if region is None else (
            f"{slide.name}_x{round(self.origin[1])}_y{round(self.origin[0])}"
            f"_{round(self.shape[1] * ds)}x{round(self.shape[0] * ds)}")
        self.name = name or default
        self.final = Path(output_dir) / f"{self.name}{SUFFIX}"
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.qc_path: Path | None = None
        self.tissue = None
        keep = None
        if config.tissue:
            halo = config.tissue_halo_um
            halo = (self.window - self.stride) * self.plan.mpp if halo is None else halo
            self.tissue = detect_tissue(slide, halo_um=halo)
            oy, ox = self.origin
            keep = lambda b: self.tissue.any_in(b[0] * ds + oy, b[1] * ds + oy,  # noqa: E731
                                                b[2] * ds + ox, b[3] * ds + ox)
        self.plans = self.grid.plan(keep)
        self.order = list(raster_order(self.plans))
        self.fingerprint = self._fingerprint(model)

    # ---- bookkeeping -------------------------------------------------------------------------
    def _fingerprint(self, model) -> dict[str, Any]:
        source = self.slide.content_identity()  # not the path: a moved or remounted slide resumes
        tissue = hashlib.sha1(np.packbits(self.tissue.mask).tobytes()).hexdigest() if self.tissue else None
        config = {k: v for k, v in self.config.to_dict().items() if k not in RUNTIME_ONLY}
        return json.loads(json.dumps({
            "format": FORMAT_VERSION, "slide": source, "plan": self.plan.to_dict(), "region": self.region,
            "window": self.window, "stride": self.stride, "chunk": self.grid.chunk, "config": config,
            "tissue": tissue, "model": model_fingerprint(model), "classes": list(self.class_names)}))

    def check_existing(self) -> None:
        """Refuse to reuse a complete output made by another model or with other settings."""
        stored = LabelOutput(self.final).pfmseg.get("fingerprint")
        if stored is None or stored == self.fingerprint:
            return
        differ = []
        for key in sorted(set(stored) | set(self.fingerprint)):
            old, new = stored.get(key), self.fingerprint.get(key)
            if old != new and isinstance(old, dict) and isinstance(new, dict):
                differ += [f"{key}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            elif old != new:
                differ.append(key)
        what = "model weights" if differ == ["model"] else f"{', '.join(differ)}"
        raise ConfigError(f"'{self.final}' was made with a different {what}; pass overwrite=True (CLI: --overwrite) "
                          "to recompute it, or choose another name or output folder.")

    def metadata(self) -> dict[str, Any]:
        """What the OME-Zarr root records under "pfmseg" (deterministic: no timestamps)."""
        from .. import __version__

        slide = self.slide
        return {
            "version": __version__,
            "class_names": list(self.class_names),
            "label_values": {"0": "no prediction (outside tissue)", "k": "class k-1"},
            "slide": {"name": slide.name, "path": str(slide.path) if slide.path else None, "mpp": slide.mpp,
                      "dimensions": list(slide.dimensions), "bounds_offset": list(slide.bounds_offset)},
            "resolution_plan": self.plan.to_dict(),
            "window": self.window, "stride": self.stride, "overlap": self.config.overlap,
            "blend": self.config.blend, "chunk": self.grid.chunk,
            "tissue": None if self.tissue is None else {
                "fraction": round(self.tissue.fraction, 6), "mpp": self.tissue.mpp,
                "threshold": round(self.tissue.threshold, 6)},
            "probabilities": self.config.probabilities,
            "region": self.region,
            "region_offset": list(self.origin),
            "class_colors": class_palette(len(self.class_names), self.class_colors, self.class_names).tolist(),
            "fingerprint": self.fingerprint,
        }

    def prepare_store(self) -> tuple[LabelStore, dict[tuple[int, int], bool], set[tuple[int, int]], bool]:
        """Open the partial store to resume it, or start a fresh one; returns (store, done, computed, resumed)."""
        work = self.partial / WORK
        record = work / "run.json"
        kwargs = {"shape": self.shape, "chunk": self.grid.chunk, "num_classes": len(self.class_names),
                  "probabilities": self.config.probabilities, "ngff": self.config.ngff,
                  "method": self.config.pyramid}
        if record.is_file():
            try:
                same = json.loads(record.read_text()) == self.fingerprint
            except json.JSONDecodeError:
                same = False
            if same:
                done, computed = self._read_done()
                return LabelStore(self.partial, create=False, **kwargs), done, computed, True
            log.warning("Discarding '%s': it was made with other settings, model or slide.", self.partial)
        if self.partial.exists():
            shutil.rmtree(self.partial)
        store = LabelStore(self.partial, create=True, **kwargs)
        work.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.fingerprint, indent=1))
        os.replace(tmp, record)
        return store, {}, set(), False

    def _read_done(self) -> tuple[dict[tuple[int, int], bool], set[tuple[int, int]]]:
        """Finished chunks (-> whether they hold labels) and chunks computed ahead of finishing."""
        done: dict[tuple[int, int], bool] = {}
        computed: set[tuple[int, int]] = set()
        path = self.partial / WORK / "done.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a crash: that chunk reruns
                    continue
                index = tuple(entry["chunk"])
                computed.add(index)
                if "nonempty" in entry:
                    done[index] = bool(entry["nonempty"])
        return done, computed

    def mark_computed(self, index: tuple[int, int]) -> None:
        self._record({"chunk": list(index), "computed": True})

    def mark_done(self, index: tuple[int, int], nonempty: bool) -> None:
        self._record({"chunk": list(index), "nonempty": nonempty})

    def _record(self, entry: dict[str, Any]) -> None:
        with open(self.partial / WORK / "done.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    # ---- the work of one chunk ---------------------------------------------------------------
    def read(self, plan: ChunkPlan) -> np.ndarray:
        y0, y1, x0, x1 = self.grid.read_box(plan)
        try:
            return np.asarray(self.source[y0:y1, x0:x1])
        except OSError as exc:  # the file vanished, its mount went away, a disk error
            where = self.slide.path or self.slide.name
            raise SlideError(
                f"Reading slide '{where}' failed mid-run: {describe_os_error(exc, where, 'reading')} "
                f"The finished part of '{self.partial}' is kept; run the same command again to resume."
            ) from exc

    def accumulate(self, plan: ChunkPlan, region: np.ndarray | None) -> np.ndarray:
        """(C + 1, h, w) weighted logit sums + weight sum over the chunk and what its windows reach."""
        ay0, ay1, ax0, ax1 = self.grid.accumulator_box(plan)
        k = len(self.class_names)
        acc = np.zeros((k + 1, ay1 - ay0, ax1 - ax0), np.float32)
        if region is None:
            return acc
        ry0, _, rx0, _ = self.grid.read_box(plan)
        boxes = [self.grid.footprint(y, x) for y, x in plan.windows]
        crops = (pad_to_window(region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0], self.window)
                 for y0, y1, x0, x1 in boxes)
        for (y0, y1, x0, x1), logits in zip(boxes, self.runner.predict_windows(crops), strict=True):
            h, w = y1 - y0, x1 - x0
            weights = self.weights[:h, :w]
            target = acc[:, y0 - ay0:y1 - ay0, x0 - ax0:x1 - ax0]
            target[:k] += logits[:, :h, :w] * weights
            target[k] += weights
        return acc

    def send(self, plan: ChunkPlan, acc: np.ndarray, spills: SpillStore) -> np.ndarray:
        """Hand the parts of ``acc`` beyond the chunk on to its receivers; returns the chunk's own part."""
        y0, y1, x0, x1 = plan.box
        h, w = y1 - y0, x1 - x0
        cy, cx = plan.index
        outgoing = split_accumulator(acc, (h, w))
        for direction, dy, dx in OUTGOING:
            receiver = self.plans.get((cy + dy, cx + dx))
            if receiver is not None and direction in receiver.senders and direction in outgoing:
                spills.put(receiver.index, direction, outgoing[direction])
        return acc[:, :h, :w]

    def finish(self, plan: ChunkPlan, own: np.ndarray, spills: SpillStore
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Add incoming spills to the chunk's own accumulator; return (labels, probabilities or None)."""
        total = own.copy()
        for direction in plan.senders:
            part = spills.get(plan.index, direction)
            total[:, : part.shape[1], : part.shape[2]] += part
        k = len(self.class_names)
        wsum = total[k]
        covered = wsum > 0
        logits = total[:k] / np.where(covered, wsum, 1.0)
        labels = np.where(covered, logits.argmax(0) + 1, 0).astype(np.uint8)
        probs = None
        if self.config.probabilities:
            probs = np.where(covered, np.round(softmax(logits) * 255.0), 0).astype(np.uint8)
        return labels, probs


def _prefetched(run: _Run, todo: list[Step], pool: ThreadPoolExecutor
                ) -> Generator[tuple[str, ChunkPlan, np.ndarray | None], None, None]:
    """Steps in order with their pixels, reading up to ``prefetch`` computing chunks ahead."""
    pending: deque[tuple[str, ChunkPlan, Future | None]] = deque()
    queue = iter(todo)
    ahead = max(1, run.config.prefetch)

    def fill() -> None:
        while sum(1 for _, _, f in pending if f is not None) < ahead:
            step = next(queue, None)
            if step is None:
                return
            kind, plan = step
            reads = kind == "compute" and plan.computes
            pending.append((kind, plan, pool.submit(run.read, plan) if reads else None))

    fill()
    while pending:
        kind, plan, future = pending.popleft()
        fill()
        yield kind, plan, (future.result() if future is not None else None)


def iter_predict_slide(
    model,
    slide: Slide | str | Path,
    output_dir: str | Path,
    config: SlideInferenceConfig | None = None,
    *,
    device=None,
    name: str | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    region: tuple[float, float, float, float] | None = None,
    priority_box: tuple[float, float, float, float] | None = None,
    class_colors: ClassColors | None = None,
    wait: float | None = 0.0,
) -> Generator[ChunkResult, None, SlideResult]:
    """Predict a slide, yielding each finished chunk; the generator's return value is the result.

    ``slide`` is a :class:`Slide` or a path (``mpp`` then overrides missing metadata). An existing
    complete output is returned untouched unless ``overwrite`` (a :class:`ConfigError` if it was made
    by another model or with other settings); a ``.partial`` one is resumed, its finished chunks
    reported first with ``computed=False``.

    ``region`` = (x, y, width, height) in slide level-0 pixels predicts only that part (grown to whole
    output pixels); the output's NGFF translation and ``region_offset`` place it on the slide.
    ``priority_box`` = (x, y, width, height) in level-0 pixels (e.g. the area in view) finishes the
    chunks it touches first, then the rest nearest first; the output is byte-identical to raster
    order. ``class_colors`` (list by class, or class name -> RGB) go into the image-label metadata.

    One process writes an output at a time: another run on the same output waits up to ``wait``
    seconds (``None``: as long as it takes), then reuses what that run finished, or stops with a
    :class:`~pfmseg_engine.storage.OutputBusyError` naming its PID, host and start time.
    """
    start = time.perf_counter()
    config = config or SlideInferenceConfig()
    own_slide = not isinstance(slide, Slide)
    if own_slide:
        slide = open_slide(slide, mpp=mpp)
    lock = None
    try:
        run = _Run(model, slide, ensure_output_dir(output_dir), config, device, name, region, class_colors)
        lock = OutputLock(run.final, wait=wait).acquire()
        result = SlideResult(path=run.final, name=run.name, shape=run.shape, mpp=run.plan.mpp,
                             class_names=run.class_names, plan=run.plan,
                             tissue_fraction=run.tissue.fraction if run.tissue else None, qc_path=None,
                             chunks_total=len(run.order))
        if run.final.exists():
            if not overwrite:
                run.check_existing()
                log.info("'%s' is complete already; pass overwrite=True (--overwrite) to redo it.", run.final)
                return result
            with writing(run.final, "(removing) the old output"):
                shutil.rmtree(run.final)
        with writing(run.final, "the output"):
            if run.tissue is not None:
                result.qc_path = save_tissue_qc(run.tissue, run.final.with_name(f"{run.name}_tissue.png"))
            store, done, computed, result.resumed = run.prepare_store()
        spills = SpillStore(run.partial / WORK / "spills")
        total, count = len(run.order), 0
        report = {"downsample": run.plan.downsample, "shape": run.shape, "store": run.partial, "origin": run.origin}
        for plan in run.order:  # finished before an interruption: shown at once, from the store
            if plan.index in done:
                y0, y1, x0, x1 = plan.box
                labels = (np.asarray(store.labels[y0:y1, x0:x1]) if done[plan.index]
                          else np.zeros((y1 - y0, x1 - x0), np.uint8))
                count += 1
                yield ChunkResult(plan.index, plan.box, labels, computed=False, done=count, total=total, **report)
        out_box = None
        if priority_box is not None:
            px, py, pw, ph = priority_box
            ds, (oy, ox) = run.plan.downsample, run.origin
            out_box = ((py - oy) / ds, (py + ph - oy) / ds, (px - ox) / ds, (px + pw - ox) / ds)
        order = priority_order(run.order, out_box)
        steps = schedule(order, run.plans, computed, set(done))
        held: tuple[tuple[int, int], np.ndarray] | None = None
        with ThreadPoolExecutor(max(1, config.read_workers), thread_name_prefix="pfmseg-read") as pool:
            for i, (kind, plan, pixels) in enumerate(_prefetched(run, steps, pool)):
                if kind == "compute":
                    own = run.send(plan, run.accumulate(plan, pixels), spills)
                    if i + 1 < len(steps) and steps[i + 1] == ("finish", plan):
                        held = (plan.index, own)
                    else:  # finished later: keep its own part on disk, exactly as computed
                        spills.put(plan.index, SELF, own)
                        run.mark_computed(plan.index)
                    result.windows_run += len(plan.windows)
                    continue
                own = held[1] if held is not None and held[0] == plan.index else spills.get(plan.index, SELF)
                held = None
                labels, probs = run.finish(plan, own, spills)
                nonempty = bool(labels.any())
                if nonempty:
                    store.write(plan.box, labels, probs)
                run.mark_done(plan.index, nonempty)
                spills.drop(plan.index)
                done[plan.index] = nonempty
                count += 1
                result.chunks_run += 1
                yield ChunkResult(plan.index, plan.box, labels, computed=True, done=count, total=total, **report)
        store.finalize(name=run.name, mpp=run.plan.mpp, slide_mpp=slide.require_mpp(), class_names=run.class_names,
                       extra=run.metadata(), class_colors=class_colors, offset=run.origin)
        with writing(run.final, "the finished output"):
            shutil.rmtree(run.partial / WORK)
            os.replace(run.partial, run.final)
        result.seconds = time.perf_counter() - start
        return result
    finally:
        if lock is not None:
            lock.release()
        if own_slide:
            slide.close()


def predict_slide(
    model,
    slide: Slide | str | Path,
    output_dir: str | Path,
    config: SlideInferenceConfig | None = None,
    *,
    callback: Callable[[ChunkResult], Any] | None = None,
    device=None,
    name: str | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    region: tuple[float, float, float, float] | None = None,
    priority_box: tuple[float, float, float, float] | None = None,
    class_colors: ClassColors | None = None,
    wait: float | None = 0.0,
    **options: Any,
) -> SlideResult:
    """Predict a whole slide into ``<output_dir>/<name>.ome.zarr``; ``callback`` sees every chunk.

    Settings come from ``config`` or as keyword ``options`` (fields of :class:`SlideInferenceConfig`).
    An exception raised by ``callback`` stops the run; the ``.partial`` output then resumes on the
    next call with the same arguments. ``region``, ``priority_box``, ``class_colors`` and ``wait``:
    see :func:`iter_predict_slide`.
    """
    if options:
        unknown = sorted(set(options) - set(SlideInferenceConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"Unknown slide inference option '{unknown[0]}'; options are "
                              f"{', '.join(SlideInferenceConfig.__dataclass_fields__)}.")
        config = SlideInferenceConfig(**{**(config.to_dict() if config else {}), **options})
    generator = iter_predict_slide(model, slide, output_dir, config, device=device, name=name, mpp=mpp,
                                   overwrite=overwrite, region=region, priority_box=priority_box,
                                   class_colors=class_colors, wait=wait)
    try:
        while True:
            chunk = next(generator)
            if callback is not None:
                callback(chunk)
    except StopIteration as stop:
        return stop.value
    finally:
        generator.close()


__all__ = ["ChunkResult", "SlideInferenceConfig", "SlideResult", "iter_predict_slide",
           "predict_slide"]
