"""Whole-slide prediction: chunk by chunk, tissue only, blended on the model's device, resumable, streamed.

:func:`plan_slide` (:mod:`.plan`, torch-free) decides everything first: resolution, window and stride,
the chunk grid with each chunk's windows, and the order chunks are finished in (raster, or the chunks
nearest a ``priority_box`` first). :func:`execute_plan` then runs the plan with a model:

* reader threads (one per CPU core) read just the pixels each chunk's windows cover, a few chunks
  ahead, and cut them into uint8 windows;
* the model sees full batches of the next windows in schedule order, across chunk boundaries;
  windows go to the device as uint8, are normalised there, and their logits are blended into
  device-resident chunk accumulators; the arg-max (and probabilities) happen there too and only uint8
  comes back (:mod:`.stitch`);
* the parts of an accumulator beyond its chunk are handed to the neighbours as spills (:mod:`.spills`),
  and a writer thread (:mod:`.writer`) saves spills, writes uint8 labels (and probabilities) into the
  OME-Zarr store with its pyramid, and records finished chunks, in order, off the compute path.

Memory is a few chunks whatever the slide size: no whole-slide array, no full-size float canvas.

Output appears as ``<name>.ome.zarr.partial`` and is renamed to ``<name>.ome.zarr`` only when
complete. ``.pfmseg_work/`` inside it records finished chunks and holds the spills, so running the
same command again resumes where it stopped and writes byte-identical output: a chunk is recorded as
done only after its data (and the spills it hands on) are on disk. Every finished chunk is reported
(callback or iterator) once it is in the store, so a viewer can show it at once; on resume the chunks
finished before are reported first (``computed=False``). ``region=`` predicts only part of the slide;
the output records where that part lies (NGFF translation, ``region_offset``), so it overlays the
slide. A complete output is reused only when it was made by the same model and settings (recorded in
its metadata); otherwise :class:`ConfigError` says what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..colors import ClassColors
from ..errors import ConfigError, SlideError
from ..labelstore.omezarr import LabelOutput, LabelStore
from ..slides import Slide, open_slide, save_tissue_qc
from ..slides.resolution import ResolutionPlan
from ..storage import OutputLock, describe_os_error, ensure_output_dir, writing
from .grid import ChunkPlan
from .plan import DEFAULT_WINDOW, SUFFIX, WORK, ModelInfo, SlideInferenceConfig, SlidePlan, plan_slide
from .schedule import schedule
from .spills import OUTGOING, SELF, SpillStore, split_accumulator
from .window import blend_weights, pad_to_window
from .writer import BackgroundWriter

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

#: Seconds between updates of the output's coarser pyramid levels while a run streams (level 0 is written
#: at once; batching the coarse levels saves rewriting each coarse chunk for every chunk it covers).
PYRAMID_INTERVAL = 1.0


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
    slide_plan: SlidePlan | None = None


def model_fingerprint(model) -> str:
    """A cheap identity of the model's weights, so a resumed run never mixes two models."""
    digest = hashlib.sha1(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()) if hasattr(model, "state_dict") else []:
        t = tensor.detach()
        value = float(t.double().sum()) if t.is_floating_point() else float(t.sum())
        digest.update(f"{name}{tuple(t.shape)}{value:.10e}".encode())
    return digest.hexdigest()


def pin_memory(device) -> bool:
    """Whether host buffers for ``device`` are page-locked and copied asynchronously (CUDA only)."""
    return device.type == "cuda"


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class OutputMismatchError(ConfigError):
    """A complete output at the planned path was made by another model or with other settings."""


# ---- the output's bookkeeping ------------------------------------------------------------------
class _Output:
    """The partial store of one plan: creating or reopening it, and its progress records."""

    def __init__(self, plan: SlidePlan, fingerprint: dict[str, Any]):
        self.plan, self.fingerprint = plan, fingerprint
        self.partial, self.final = plan.partial, plan.final

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
        raise OutputMismatchError(f"'{self.final}' was made with a different {what}; recompute it over the old "
                                  "one (overwrite), or choose another name or output folder.",
                                  fix_with=("overwrite=True",))

    def prepare_store(self) -> tuple[LabelStore, dict[tuple[int, int], bool], set[tuple[int, int]], bool]:
        """Open the partial store to resume it, or start a fresh one; returns (store, done, computed, resumed)."""
        plan, config = self.plan, self.plan.config
        work = self.partial / WORK
        record = work / "run.json"
        kwargs: dict[str, Any] = {"shape": plan.shape, "chunk": plan.chunk, "num_classes": plan.num_classes,
                                  "probabilities": config.probabilities, "ngff": config.ngff,
                                  "method": config.pyramid, "pyramid_interval": PYRAMID_INTERVAL}
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
        with writing(self.partial, "the progress record of the partial output"), \
                open(self.partial / WORK / "done.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# ---- the computation ---------------------------------------------------------------------------
class _ChunkWork:
    """A chunk being computed: its accumulator on the device and how many windows are still to come."""

    __slots__ = ("acc", "box", "plan", "remaining")

    def __init__(self, plan: ChunkPlan, box: tuple[int, int, int, int]):
        self.plan, self.box = plan, box
        self.remaining = len(plan.windows)
        self.acc: Tensor | None = None


class _Executor:
    """Runs the compute and finish steps of one plan; yields finished chunks once they are in the store."""

    def __init__(self, plan: SlidePlan, runner, output: _Output, store: LabelStore, spills: SpillStore,
                 done: dict[tuple[int, int], bool], result: SlideResult, report: dict[str, Any], count: int):
        from .stitch import Staging, Stitcher

        config = plan.config
        self.plan, self.runner, self.output, self.store, self.spills = plan, runner, output, store, spills
        self.done, self.result, self.report, self.count = done, result, report, count
        self.device = runner.device
        self.pinned = pin_memory(self.device)
        self.finish_in_writer = self.device.type == "cpu"
        self.batch_size = runner.batch_size
        reach = plan.chunk + plan.window  # an accumulator is its chunk plus what the chunk's windows reach
        self.stitcher = Stitcher(blend_weights(plan.window, config.blend), plan.num_classes, self.batch_size,
                                 self.device, max_shape=(min(reach, plan.shape[0]), min(reach, plan.shape[1])))
        self.staging = Staging(self.device, self.batch_size, plan.window, pinned=self.pinned)
        self.source = plan.source()
        self.workers = max(1, int(config.read_workers or available_cpus()))
        self.ahead = max(1, int(config.prefetch or max(2, self.workers + 1)))
        self.writer = BackgroundWriter()
        self.held: tuple[tuple[int, int], Any, Any] | None = None  # (chunk, own part, its accumulator)
        self._ready: deque[tuple[ChunkPlan, np.ndarray, bool]] = deque()
        self._commits: list[tuple[ChunkPlan, bool]] = []  # reported chunks waiting for their pyramid
        self._reported: list[tuple[ChunkPlan, bool]] = []  # every chunk this run reported
        self._committed: set[tuple[int, int]] = set()  # ... and those recorded as done

    # -- reading (reader threads) --
    def read(self, chunk: ChunkPlan) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
        """The chunk's windows as one (n, window, window, 3) uint8 array, and where each lands in its
        accumulator (y0, y1, x0, x1)."""
        grid, window = self.plan.grid, self.plan.window
        ry0, ry1, rx0, rx1 = grid.read_box(chunk)
        try:
            region = np.asarray(self.source[ry0:ry1, rx0:rx1])
        except OSError as exc:  # the file vanished, its mount went away, a disk error
            where = self.plan.slide.path or self.plan.slide.name
            raise SlideError(
                f"Reading slide '{where}' failed mid-run: {describe_os_error(exc, where, 'reading')} "
                f"The finished part of '{self.plan.partial}' is kept; run the same prediction again to resume."
            ) from exc
        ay0, _, ax0, _ = grid.accumulator_box(chunk)
        windows = np.empty((len(chunk.windows), window, window, 3), np.uint8)
        targets = []
        for j, (y, x) in enumerate(chunk.windows):
            y0, y1, x0, x1 = grid.footprint(y, x)
            crop = region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0]
            windows[j] = crop if crop.shape[:2] == (window, window) else pad_to_window(crop, window)
            targets.append((y0 - ay0, y1 - ay0, x0 - ax0, x1 - ax0))
        return windows, targets

    def _read_ahead(self, works: list[_ChunkWork], pool: ThreadPoolExecutor) -> Iterator[tuple[_ChunkWork, Any]]:
        """Chunks with their windows, in order, reading up to ``ahead`` chunks in advance."""
        pending: deque[tuple[_ChunkWork, Future]] = deque()
        queue = iter(works)

        def fill() -> None:
            while len(pending) < self.ahead:
                work = next(queue, None)
                if work is None:
                    return
                pending.append((work, pool.submit(self.read, work.plan)))

        try:
            fill()
            while pending:
                work, future = pending.popleft()
                fill()
                yield work, future.result()
        finally:
            for _, future in pending:
                future.cancel()

    def _batches(self, works: list[_ChunkWork],
                 pool: ThreadPoolExecutor) -> Generator[tuple[list[np.ndarray], list[Any]], None, None]:
        """Full batches of the next windows in schedule order, across chunk boundaries (the last may be short)."""
        parts: list[np.ndarray] = []
        targets: list[tuple[_ChunkWork, int, int, int, int]] = []
        for work, (windows, boxes) in self._read_ahead(works, pool):
            start = 0
            while start < len(windows):
                take = min(self.batch_size - len(targets), len(windows) - start)
                parts.append(windows[start:start + take])
                targets.extend((work, *boxes[j]) for j in range(start, start + take))
                start += take
                if len(targets) == self.batch_size:
                    yield parts, targets
                    parts, targets = [], []
        if targets:
            yield parts, targets

    # -- the hot path (computing thread, device ops) --
    def _run_batch(self, parts: list[np.ndarray], targets: list[tuple[_ChunkWork, int, int, int, int]]) -> None:
        logits = self.runner.forward(self.staging.upload(parts))
        placed = []
        for work, y0, y1, x0, x1 in targets:
            if work.acc is None:
                ay0, ay1, ax0, ax1 = work.box
                work.acc = self.stitcher.zeros(ay1 - ay0, ax1 - ax0)
            placed.append((work.acc, y0, y1, x0, x1))
        self.stitcher.add(logits, placed)
        for work, *_ in targets:
            work.remaining -= 1

    def _stage(self, target: tuple[int, int], direction: str, tensor) -> None:
        """Hand a spill on: kept on the device for its receiver, saved to disk by the writer."""
        from .stitch import HostCopy

        host = HostCopy(tensor, self.pinned)
        self.spills.stage(target, direction, tensor, host.numpy)
        self.writer.submit(self.spills.save, target, direction)

    def _complete(self, work: _ChunkWork, hold: bool) -> None:
        """All of a chunk's windows are in: spill what lies beyond it; keep (or save) its own part."""
        chunk = work.plan
        y0, y1, x0, x1 = chunk.box
        h, w = y1 - y0, x1 - x0
        acc = work.acc
        if acc is None:  # no windows of its own: it only receives spills
            ay0, ay1, ax0, ax1 = work.box
            acc = self.stitcher.zeros(ay1 - ay0, ax1 - ax0)
        work.acc = None
        cy, cx = chunk.index
        outgoing = split_accumulator(acc, (h, w))
        for direction, dy, dx in OUTGOING:
            receiver = self.plan.chunks.get((cy + dy, cx + dx))
            if receiver is not None and direction in receiver.senders and direction in outgoing:
                self._stage(receiver.index, direction, outgoing[direction].clone())
        own = acc[:, :h, :w]
        if hold:
            self.held = (chunk.index, own, acc)
        else:  # finished later: keep its own part on disk, exactly as computed
            self._stage(chunk.index, SELF, own.clone())
            self.writer.submit(self.output.mark_computed, chunk.index)
            self.stitcher.release(acc)
        self.result.windows_run += len(chunk.windows)

    def _finish(self, chunk: ChunkPlan) -> None:
        """Own part + incoming spills -> labels (and probabilities) on the device -> the store.

        On a GPU this is queued on the device at once (the computing thread never waits for it). On the
        CPU, where "the device" is these cores, the writer thread does it, in parallel with the next
        windows; either way in the same order and with the same arithmetic.
        """
        own = None
        if self.held is not None and self.held[0] == chunk.index:
            own = self.held[1:]
        self.held = None
        if self.finish_in_writer:
            self.writer.submit(self._finish_and_write, chunk, own)
        else:
            self._finish_and_write(chunk, own)

    def _finish_and_write(self, chunk: ChunkPlan, own: tuple[Any, Any] | None) -> None:
        import torch

        from .stitch import HostCopy

        total, acc = own if own is not None else (self.spills.get(chunk.index, SELF).clone(), None)
        for direction in chunk.senders:
            part = self.spills.get(chunk.index, direction)
            total[:, : part.shape[1], : part.shape[2]].add_(part)
        labels, probs = self.stitcher.finish(total, self.plan.config.probabilities)
        on_tissue = self.plan.tissue_inside(chunk.box)
        if on_tissue is not None:
            keep = torch.from_numpy(on_tissue).to(labels.device)
            labels = labels * keep.to(labels.dtype)
            if probs is not None:
                probs = probs * keep.to(probs.dtype)
        if acc is not None:
            self.stitcher.release(acc)
        if self.finish_in_writer:
            self._write_chunk(chunk, HostCopy(labels), None if probs is None else HostCopy(probs))
        else:
            self.writer.submit(self._write_chunk, chunk, HostCopy(labels, self.pinned),
                               None if probs is None else HostCopy(probs, self.pinned))

    # -- the writer thread --
    def _write_chunk(self, chunk: ChunkPlan, labels_copy, probs_copy) -> None:
        labels = labels_copy.numpy()
        nonempty = bool(labels.any())
        if nonempty:
            self.store.write(chunk.box, labels, None if probs_copy is None else probs_copy.numpy())
        self._ready.append((chunk, labels, nonempty))  # level 0 is in the store: it can be reported
        self._apply_commits()

    def _commit(self, chunk: ChunkPlan, nonempty: bool) -> None:
        """Record a reported chunk as done (and drop the spills it received) once its pyramid is written too."""
        self._commits.append((chunk, nonempty))
        self._apply_commits()

    def _apply_commits(self) -> None:
        waiting = []
        for chunk, nonempty in self._commits:
            if self.store.is_complete(chunk.box):
                self.output.mark_done(chunk.index, nonempty)
                self._committed.add(chunk.index)
                self.spills.drop(chunk.index)
            else:
                waiting.append((chunk, nonempty))
        self._commits = waiting

    def _flush(self) -> None:
        self.store.flush_pyramid()
        self._apply_commits()

    # -- reporting (computing thread) --
    def _report(self) -> Iterator[ChunkResult]:
        """Chunks whose data is in the store, in finishing order; each is recorded done as it is reported."""
        while self._ready:
            chunk, labels, nonempty = self._ready.popleft()
            self.writer.submit(self._commit, chunk, nonempty)
            self._reported.append((chunk, nonempty))
            self.done[chunk.index] = nonempty
            self.count += 1
            self.result.chunks_run += 1
            yield ChunkResult(chunk.index, chunk.box, labels, computed=True, done=self.count,
                              total=self.result.chunks_total, **self.report)

    def run(self, steps: list[tuple[str, ChunkPlan]]) -> Generator[ChunkResult, None, None]:
        works = {chunk.index: _ChunkWork(chunk, self.plan.grid.accumulator_box(chunk))
                 for kind, chunk in steps if kind == "compute"}
        reading = [works[chunk.index] for kind, chunk in steps if kind == "compute" and chunk.computes]
        pool = ThreadPoolExecutor(min(self.workers, max(1, len(reading))), thread_name_prefix="pfmseg-read")
        batches = self._batches(reading, pool)
        stopped_by_consumer = False
        try:
            for i, (kind, chunk) in enumerate(steps):
                if kind == "compute":
                    work = works.pop(chunk.index)
                    while work.remaining:
                        self._run_batch(*next(batches))
                    after = steps[i + 1] if i + 1 < len(steps) else None
                    self._complete(work, hold=after is not None and after[0] == "finish"
                                   and after[1].index == chunk.index)
                else:
                    self._finish(chunk)
                self.writer.check()
                yield from self._report()
            self.writer.submit(self._flush)
            self.writer.wait()
            yield from self._report()
        except GeneratorExit:  # the consumer stopped: exactly the chunks it was given are recorded done
            stopped_by_consumer = True
            raise
        finally:
            batches.close()
            pool.shutdown(wait=True, cancel_futures=True)
            failed = self.writer.error is not None
            if not failed:
                self.writer.submit(self._flush)
            self.writer.close()  # an interrupted run still writes what is queued (nothing after a write error)
            if self.writer.error is not None and not failed:
                log.warning("Writing '%s' after the run was stopped failed (%s); it resumes from its last "
                            "recorded chunk.", self.plan.partial, self.writer.error)
            if not stopped_by_consumer:  # an error: keep every chunk whose data did reach the store
                self._record_written()

    def _record_written(self) -> None:
        """After an error: record every chunk whose data did reach the store as done (pyramid included)."""
        try:
            written = self._reported + [(chunk, nonempty) for chunk, _, nonempty in self._ready]
            for chunk, nonempty in written:  # a chunk whose pyramid update failed or never ran reruns
                if chunk.index not in self._committed and self.store.is_complete(chunk.box):
                    self.output.mark_done(chunk.index, nonempty)
                    self._committed.add(chunk.index)
            self._ready.clear()
        except Exception as exc:  # the disk that failed the run may refuse this too: those chunks rerun
            log.warning("Could not record the chunks finished before the error (%s); they are recomputed on "
                        "resume.", exc)


def _check_model(plan: SlidePlan, info: ModelInfo) -> None:
    planned = plan.model
    if (info.num_classes, info.patch_size) != (planned.num_classes, planned.patch_size) or \
            tuple(info.class_names) != tuple(planned.class_names):
        raise ConfigError(
            f"The plan was made for a model with {planned.num_classes} classes ({', '.join(planned.class_names)}) "
            f"and patch size {planned.patch_size}, but this model has {info.num_classes} "
            f"({', '.join(info.class_names)}) and patch size {info.patch_size}; plan again with this model."
        )


def iter_execute_plan(
    plan: SlidePlan,
    model,
    *,
    device=None,
    overwrite: bool = False,
    class_colors: ClassColors | None = None,
    wait: float | None = 0.0,
) -> Generator[ChunkResult, None, SlideResult]:
    """Run ``plan`` with ``model``, yielding each finished chunk; the generator's return value is the result.

    The model is moved to ``device`` (default: where it is) here, not when planning. An existing
    complete output is returned untouched unless ``overwrite`` (a :class:`ConfigError` if it was made
    by another model or with other settings); a ``.partial`` one is resumed, its finished chunks
    reported first with ``computed=False``. ``class_colors`` (list by class, or class name -> RGB) go
    into the image-label metadata. ``wait``: see :func:`iter_predict_slide`.
    """
    from .runner import ModelRunner, model_info

    start = time.perf_counter()
    config = plan.config
    _check_model(plan, model_info(model))
    ensure_output_dir(plan.final.parent)
    output = _Output(plan, plan.fingerprint(model_fingerprint(model)))
    lock = OutputLock(plan.final, wait=wait).acquire()
    try:
        result = SlideResult(path=plan.final, name=plan.name, shape=plan.shape, mpp=plan.mpp,
                             class_names=plan.class_names, plan=plan.resolution,
                             tissue_fraction=plan.tissue.fraction if plan.tissue else None, qc_path=None,
                             chunks_total=plan.chunks_total, slide_plan=plan)
        if plan.final.exists():
            if not overwrite:
                output.check_existing()
                log.info("'%s' is complete already: reused (overwrite recomputes it).", plan.final)
                return result
            with writing(plan.final, "(removing) the old output"):
                shutil.rmtree(plan.final)
        with writing(plan.final, "the output"):
            if plan.tissue is not None and plan.qc_path is not None:
                result.qc_path = save_tissue_qc(plan.tissue, plan.qc_path)
            store, done, computed, result.resumed = output.prepare_store()
        runner = ModelRunner(model, device=device, batch_size=config.batch_size)
        spills = SpillStore(plan.partial / WORK / "spills",
                            load=lambda array: _to_device(array, runner.device))
        total, count = plan.chunks_total, 0
        report: dict[str, Any] = {"downsample": plan.downsample, "shape": plan.shape, "store": plan.partial,
                                  "origin": plan.origin}
        for chunk in plan.order:  # finished before an interruption: shown at once, from the store
            if chunk.index in done:
                y0, y1, x0, x1 = chunk.box
                labels = (np.asarray(store.labels[y0:y1, x0:x1]) if done[chunk.index]
                          else np.zeros((y1 - y0, x1 - x0), np.uint8))
                count += 1
                yield ChunkResult(chunk.index, chunk.box, labels, computed=False, done=count, total=total, **report)
        steps = schedule(plan.finish_order, plan.chunks, computed, set(done))
        executor = _Executor(plan, runner, output, store, spills, done, result, report, count)
        yield from executor.run(steps)
        store.finalize(name=plan.name, mpp=plan.mpp, slide_mpp=plan.slide.require_mpp(),
                       class_names=plan.class_names, extra=plan.metadata(output.fingerprint, class_colors),
                       class_colors=class_colors, offset=plan.origin)
        with writing(plan.final, "the finished output"):
            shutil.rmtree(plan.partial / WORK)
            os.replace(plan.partial, plan.final)
        result.seconds = time.perf_counter() - start
        return result
    finally:
        lock.release()


def _to_device(array: np.ndarray, device):
    import torch

    return torch.from_numpy(array).to(device)


def execute_plan(
    plan: SlidePlan,
    model,
    *,
    device=None,
    callback: Callable[[ChunkResult], Any] | None = None,
    overwrite: bool = False,
    class_colors: ClassColors | None = None,
    wait: float | None = 0.0,
) -> SlideResult:
    """Run ``plan`` with ``model`` into ``plan.final``; ``callback`` sees every chunk (see :func:`iter_execute_plan`).

    An exception raised by ``callback`` stops the run; the ``.partial`` output then resumes on the
    next call with the same plan and model.
    """
    return _drive(iter_execute_plan(plan, model, device=device, overwrite=overwrite, class_colors=class_colors,
                                    wait=wait), callback)


def _drive(generator: Generator[ChunkResult, None, SlideResult],
           callback: Callable[[ChunkResult], Any] | None) -> SlideResult:
    try:
        while True:
            chunk = next(generator)
            if callback is not None:
                callback(chunk)
    except StopIteration as stop:
        return stop.value
    finally:
        generator.close()


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

    Plans the run (:func:`~pfmseg_engine.inference.plan.plan_slide`), then executes the plan
    (:func:`iter_execute_plan`). ``slide`` is a :class:`Slide` or a path (``mpp`` then overrides
    missing metadata). An existing complete output is returned untouched unless ``overwrite`` (a
    :class:`ConfigError` if it was made by another model or with other settings); a ``.partial`` one
    is resumed, its finished chunks reported first with ``computed=False``.

    ``region`` = (x, y, width, height) in slide level-0 pixels predicts only that part (grown to whole
    output pixels); the output's NGFF translation and ``region_offset`` place it on the slide.
    ``priority_box`` = (x, y, width, height) in level-0 pixels (e.g. the area in view) finishes the
    chunks it touches first, then the rest nearest first; the output is byte-identical to raster
    order. ``class_colors`` (list by class, or class name -> RGB) go into the image-label metadata.

    One process writes an output at a time: another run on the same output waits up to ``wait``
    seconds (``None``: as long as it takes), then reuses what that run finished, or stops with a
    :class:`~pfmseg_engine.storage.OutputBusyError` naming its PID, host and start time.
    """
    from .runner import model_info

    output_dir = ensure_output_dir(output_dir)
    opened = slide if isinstance(slide, Slide) else open_slide(slide, mpp=mpp)
    try:
        plan = plan_slide(opened, model_info(model), config, region=region, priority_box=priority_box,
                          output_dir=output_dir, name=name)
        return (yield from iter_execute_plan(plan, model, device=device, overwrite=overwrite,
                                             class_colors=class_colors, wait=wait))
    finally:
        if opened is not slide:
            opened.close()


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
    config = config_with(config, **options)
    return _drive(iter_predict_slide(model, slide, output_dir, config, device=device, name=name, mpp=mpp,
                                     overwrite=overwrite, region=region, priority_box=priority_box,
                                     class_colors=class_colors, wait=wait), callback)


def config_with(config: SlideInferenceConfig | None = None, **options: Any) -> SlideInferenceConfig:
    """``config`` (default settings when None) with ``options`` (fields of :class:`SlideInferenceConfig`) changed."""
    if not options:
        return config or SlideInferenceConfig()
    unknown = sorted(set(options) - set(SlideInferenceConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"Unknown slide inference option '{unknown[0]}'; options are "
                          f"{', '.join(SlideInferenceConfig.__dataclass_fields__)}.")
    return SlideInferenceConfig(**{**(config.to_dict() if config else {}), **options})


__all__ = ["DEFAULT_WINDOW", "SUFFIX", "ChunkResult", "OutputMismatchError", "SlideInferenceConfig", "SlideResult",
           "available_cpus",
           "config_with", "execute_plan", "iter_execute_plan", "iter_predict_slide", "model_fingerprint",
           "predict_slide"]
