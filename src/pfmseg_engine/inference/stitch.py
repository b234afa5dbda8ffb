"""Stitching on the model's device: window batches in, uint8 labels (and probabilities) out.

Whole-slide inference keeps its hot path where the model runs, as torch operations on ``device``
(the GPU, or the CPU with torch's vectorised, multi-threaded kernels):

* windows travel as uint8 (a quarter of float32's bytes) and are normalised on the device
  (:meth:`~pfmseg_engine.inference.runner.ModelRunner.forward`); on CUDA they are assembled in
  pinned host buffers and copied with ``non_blocking=True`` (:class:`Staging`);
* a batch's logits are weighted with the blending window in one operation, straight into a buffer
  whose last channel holds the weights, so each window is then one in-place add into its chunk's
  device-resident accumulator (weighted logit sums + weight sum, :meth:`Stitcher.add`);
* a finished chunk is divided, arg-maxed (and soft-maxed) on the device (:meth:`Stitcher.finish`); only
  uint8 labels (and uint8 probabilities) come back, through :class:`HostCopy` (pinned and
  asynchronous on CUDA: the computing thread never waits for a copy; the writer thread does).

The arithmetic is exactly the earlier numpy stitching's, in the same order: every window's logits
times the weights (rounded), added into the accumulator window after window; spills added in the
same order; division by the weight sum; the first largest class wins. So labels are byte-identical
to it. Probabilities use torch's ``exp``, which may differ from numpy's in the last bit, so a
probability can differ by one step of 1/255 in rare pixels.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (CUDA only; cached by torch's host allocator)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)


def new_event():
    """A CUDA event recorded on the current stream (what a pinned buffer waits for before reuse)."""
    event = torch.cuda.Event()
    event.record()
    return event


class HostCopy:
    """A device tensor on its way to host memory; :meth:`numpy` waits for it and returns the array.

    With ``pinned`` (CUDA) the copy goes into page-locked memory with ``non_blocking=True`` and an
    event marks its end, so the thread that starts it does not wait; otherwise it is an ordinary copy
    (none at all for a CPU tensor).
    """

    __slots__ = ("event", "tensor")

    def __init__(self, tensor: torch.Tensor, pinned: bool = False):
        if pinned:
            self.tensor = pinned_empty(tensor.shape, tensor.dtype)
            self.tensor.copy_(tensor, non_blocking=True)
            self.event = new_event()
        else:
            self.tensor, self.event = tensor.to("cpu"), None

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor.numpy()


class Staging:
    """Batches of uint8 windows (N, h, w, 3) on their way from host arrays to the device.

    ``parts`` are consecutive slices of per-chunk window arrays (a batch may span chunks). Without
    pinning (CPU, MPS) a batch inside one array goes as it is (on the CPU: no copy at all) and one
    spanning arrays is concatenated. With pinning (CUDA) a batch is assembled in one of ``slots``
    page-locked buffers and copied asynchronously; a buffer is reused only after the event recorded
    behind its previous copy has passed, so the copy of one batch overlaps the model's work on another.
    """

    def __init__(self, device: torch.device, batch_size: int, window: int, *, pinned: bool | None = None,
                 slots: int = 3):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda" if pinned is None else bool(pinned)
        self.shape = (int(batch_size), int(window), int(window), 3)
        self.slots = max(1, int(slots))
        self._buffers: list[list] = []  # [pinned tensor, event of its last copy or None]
        self._next = 0

    def upload(self, parts: Sequence[np.ndarray]) -> torch.Tensor:
        if not self.pinned:
            batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return torch.from_numpy(batch).to(self.device)
        count = sum(len(p) for p in parts)
        if count > self.shape[0]:
            raise ValueError(f"A batch of {count} windows does not fit staging buffers of {self.shape[0]}.")
        if len(self._buffers) < self.slots:
            self._buffers.append([pinned_empty(self.shape, torch.uint8), None])
        slot = self._buffers[self._next]
        self._next = (self._next + 1) % self.slots
        if slot[1] is not None:
            slot[1].synchronize()  # its previous batch has reached the device
        host = slot[0][:count]
        view, start = host.numpy(), 0
        for part in parts:
            view[start:start + len(part)] = part
            start += len(part)
        out = host.to(self.device, non_blocking=True)
        slot[1] = new_event()
        return out


class Stitcher:
    """Chunk accumulators on the device: blend window logits into them, turn them into labels.

    An accumulator is a (C + 1, h, w) float32 tensor: C weighted logit sums and the weight sum.
    """

    def __init__(self, weights: np.ndarray, num_classes: int, batch_size: int, device: torch.device,
                 max_shape: tuple[int, int] = (0, 0)):
        self.device = torch.device(device)
        self.max_shape = (int(max_shape[0]), int(max_shape[1]))
        self._bases: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()  # accumulators may be handed back from another thread
        self.k = int(num_classes)
        self.weights = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).to(self.device)
        self._ext = self._buffer(batch_size)
        self._free: list[torch.Tensor] = []

    def _buffer(self, size: int) -> torch.Tensor:
        height, width = self.weights.shape
        ext = torch.empty((size, self.k + 1, height, width), dtype=torch.float32, device=self.device)
        ext[:, self.k] = self.weights
        return ext

    def zeros(self, height: int, width: int) -> torch.Tensor:
        """A zeroed (C + 1, height, width) accumulator.

        Accumulators up to ``max_shape`` are views of recycled buffers of that size (see :meth:`release`):
        chunk accumulators differ in size by a few pixels, and a fresh allocation of tens of megabytes
        costs more in page faults than the arithmetic done in it.
        """
        mh, mw = self.max_shape
        if height > mh or width > mw:
            return torch.zeros((self.k + 1, height, width), dtype=torch.float32, device=self.device)
        with self._lock:
            base = self._free.pop() if self._free else None
        if base is None:
            base = torch.empty((self.k + 1, mh, mw), dtype=torch.float32, device=self.device)
        acc = base[:, :height, :width]
        with self._lock:
            self._bases[acc.data_ptr()] = base
        return acc.zero_()

    def release(self, acc: torch.Tensor) -> None:
        """Hand back an accumulator no longer used (device work on it is stream-ordered, so reuse is safe)."""
        with self._lock:
            base = self._bases.pop(acc.data_ptr(), None)
            if base is not None and len(self._free) < 4:
                self._free.append(base)

    def add(self, logits: torch.Tensor, targets: Sequence[tuple[torch.Tensor, int, int, int, int]]) -> None:
        """Add window ``i``'s weighted logits (and weights) into ``targets[i]`` = (acc, y0, y1, x0, x1).

        Windows are added one after another, in order, so the sums do not depend on the batch split.
        """
        n = logits.shape[0]
        if n > self._ext.shape[0]:
            self._ext = self._buffer(n)
        ext = self._ext[:n]
        torch.mul(logits, self.weights, out=ext[:, : self.k])  # one operation for the whole batch
        for i, (acc, y0, y1, x0, x1) in enumerate(targets):
            acc[:, y0:y1, x0:x1].add_(ext[i, :, : y1 - y0, : x1 - x0])

    def finish(self, total: torch.Tensor, probabilities: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C + 1, h, w) sums -> uint8 labels (0 where no window reached, else class + 1) and, optionally,
        uint8 probabilities (C, h, w) = round(softmax * 255)."""
        k = self.k
        wsum = total[k]
        logits = total[:k] / wsum  # where no window reached, 0 / 0: NaN, masked below
        covered = wsum > 0
        # arg-max over the (few) classes by comparisons, the first largest winning as in numpy's argmax;
        # uint8 arithmetic, because torch's reduction over a leading axis, masked_fill and where on uint8
        # are several times slower on the CPU
        best = logits[0]
        index = torch.zeros(best.shape, dtype=torch.uint8, device=best.device)
        for c in range(1, k):
            above = (logits[c] > best).to(torch.uint8)
            index = above if c == 1 else index + above * (c - index)
            best = torch.maximum(best, logits[c])
        labels = (index + 1) * covered.to(torch.uint8)
        if not probabilities:
            return labels, None
        shifted = (logits - best).exp_()
        norm = shifted[0].clone()
        for c in range(1, k):  # the class axis summed in order, as numpy sums a leading axis
            norm += shifted[c]
        probs = shifted.div_(norm).mul_(255.0).round_()
        probs = torch.where(covered, probs, 0.0).to(torch.uint8)
        return labels, probs
