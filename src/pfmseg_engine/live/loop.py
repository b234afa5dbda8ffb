"""The live loop: paint, and the head retrains on stored features and re-predicts the visible field.

:class:`LiveLoop` is a job like the others (settings dataclass, :meth:`LiveLoop.iter_run` events,
:meth:`LiveLoop.cancel`). A front end runs ``iter_run()`` in a worker thread and, from any thread,
hands it new strokes (:meth:`LiveLoop.update_labels`), the visible field (:meth:`LiveLoop.set_view`)
and requests for suggestions (:meth:`LiveLoop.request_suggestions`). Each turn of the loop does the
most urgent thing left:

1. store the features of the visible field and of labelled windows that are not stored yet
   (:class:`~pfmseg_engine.live.store.FillProgress` events);
2. answer a suggestion request (:class:`LiveSuggestions`);
3. after a change of the labels, train the head on the stored features of labelled pixels
   (:class:`LiveStep` per step): a refreshed prediction of the visible field
   (:class:`LivePrediction`: labels, uncertainty, per-class areas) comes after
   ``settings.first_steps`` steps or ``settings.first_seconds`` after the change, whichever is first,
   then every ``settings.predict_every`` steps, until ``settings.max_steps`` steps after the last change;
4. re-predict when the view moved;
5. store more windows, nearest the view first (one batch per turn, so a stroke never waits long);
6. otherwise sleep until something changes.

The head, its optimizer and their state persist for the loop's life: every stroke continues training
from where the last left off (warm start), never from scratch. Cancelling ends the loop after the
current step with a :class:`LiveStopped` event; the model keeps the last head (running ``iter_run()`` again
continues it), and :meth:`LiveLoop.save`
writes it as an ordinary frozen-strategy checkpoint that ``infer``, ``evaluate`` and ``compare`` accept.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from .head import LIVE_UNCERTAINTIES, UNCERTAINTIES, labels_and_uncertainty
from .labels import LabelBuffer
from .store import DTYPES, FillProgress, SlideFeatureStore, Window

if TYPE_CHECKING:
    from ..model import SegmentationModel
    from ..slides import Slide, TissueMask
    from .suggest import SuggestedRegion

IGNORE = 255
#: Windows whose labelled-pixel positions the trainer keeps (at most 1 MB each).
LABELLED_CACHE = 32


@dataclass(frozen=True)
class LiveSettings:
    """Settings of a live loop; every default lives here.

    Store: ``window`` (px, default the model's input size), ``mpp`` (default the model's training mpp,
    else the slide's level 0), ``width``: wider backbones' tokens are stored as this many principal
    components (:mod:`~pfmseg_engine.live.basis`; None: full width; at 384 a wider backbone's token costs
    what a ViT-S token does), ``dtype`` of stored features, ``tissue`` (fill tissue windows only),
    ``store_root`` (default ``<pfmseg cache>/features``), ``fill_batch`` windows per backbone call,
    ``fill_outward`` (keep storing the rest of the slide, nearest the view first, while idle).
    Training: ``lr``, ``weight_decay``, ``balance`` (weigh classes by inverse labelled-pixel frequency),
    ``batch_size`` crops of ``crop`` px per step, each around a
    labelled pixel (half of them in the most recently painted windows); the first refreshed prediction
    after a change comes after ``first_steps`` steps or once ``first_seconds`` have passed since the change
    (at least one step), whichever is first, then one every ``predict_every`` steps; training rests
    after ``max_steps`` steps without a change. Prediction: ``uncertainty`` ("entropy" or "margin" of
    the head, or "disagreement": a second head, started from other random weights, trains on the same
    crops and the map is where the two disagree; it doubles training and prediction time, and
    suggestions then rank by entropy), at most ``view_windows`` windows (nearest the view's centre), at
    the resolution the head classifies at (the ``fast`` head's 1/4: a pixel then covers several model
    pixels, the event's ``scale`` says how many; the viewer enlarges it by nearest neighbour) unless
    ``full_resolution``
    (every model pixel, logits resized bilinearly as ``infer`` does: slower, and 16 times the pixels
    to draw), ``device`` (auto: CUDA, then MPS, then the CPU), ``seed``;
    ``feature_cache_windows`` windows' features stay in memory (float32, converted once per window).
    """

    window: int | None = None
    mpp: float | None = None
    width: int | None = 384
    dtype: str = "float16"
    tissue: bool = True
    store_root: str | None = None
    fill_batch: int = 2
    fill_outward: bool = True
    lr: float = 1e-3
    weight_decay: float = 1e-4
    balance: bool = True
    batch_size: int = 4
    crop: int = 256
    first_steps: int = 4
    first_seconds: float = 0.5
    predict_every: int = 40
    max_steps: int = 300
    uncertainty: str = "entropy"
    view_windows: int = 64
    full_resolution: bool = False
    device: str = "auto"
    seed: int = 0
    feature_cache_windows: int = 96

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"Feature dtype '{self.dtype}' is not one of {', '.join(DTYPES)}.")
        if self.uncertainty not in LIVE_UNCERTAINTIES:
            raise ConfigError(f"Uncertainty '{self.uncertainty}' is not one of {', '.join(LIVE_UNCERTAINTIES)}.")
        for name in ("fill_batch", "batch_size", "crop", "first_steps", "predict_every", "max_steps", "view_windows"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"Live setting '{name}' must be at least 1, got {getattr(self, name)}.")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# --- events -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LiveStep:
    """One training step: ``step`` counts every step of the loop's life (it never restarts)."""

    step: int
    loss: float
    labelled_pixels: int
    labels_version: int
    seconds: float
    kind: str = "step"


@dataclass(frozen=True)
class LivePrediction:
    """The visible field predicted by the current head.

    ``labels`` (H, W) uint8: 0 = not predicted (background windows), k = class k-1; ``uncertainty``
    (H, W) float32 in [0, 1]. Both cover model pixels ``box`` = (y0, y1, x0, x1), one pixel per model
    pixel or, by default, per pixel the head classifies at (see ``LiveSettings.full_resolution``); on the
    slide they start at level-0 ``offset`` = (x, y) with ``scale`` level-0 pixels per pixel (napari:
    ``translate=(y, x)``, ``scale=(scale, scale)``). ``areas_mm2`` per class name over the predicted
    pixels. ``latency`` is seconds since the labels last changed (None when the view moved without new labels).
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    box: tuple[int, int, int, int]
    offset: tuple[float, float]
    scale: float
    areas_mm2: dict[str, float]
    step: int
    labels_version: int
    seconds: float
    latency: float | None
    kind: str = "prediction"


@dataclass(frozen=True)
class LiveSuggestions:
    """Regions to annotate next (best first), answering :meth:`LiveLoop.request_suggestions`."""

    regions: tuple[SuggestedRegion, ...]
    kind: str = "suggestions"


@dataclass(frozen=True)
class LiveStopped:
    """The loop ended (``reason``: "cancelled"); the model keeps the head trained for ``steps`` steps."""

    reason: str
    steps: int
    kind: str = "stopped"


LiveEvent = FillProgress | LiveStep | LivePrediction | LiveSuggestions | LiveStopped


class LiveLoop:
    """Continuously train ``model``'s head on ``slide``'s stored features (see the module docstring).

    ``model`` is a frozen-strategy :class:`~pfmseg_engine.model.SegmentationModel` whose head reads only
    backbone grids (build one with :func:`~pfmseg_engine.live.head.live_model_config` and
    :func:`~pfmseg_engine.live.head.build_live_model`, or load such a checkpoint to continue it).
    ``tissue`` overrides ``settings.tissue`` with a ready mask.
    """

    def __init__(self, model: SegmentationModel, slide: Slide, settings: LiveSettings | None = None, *,
                 tissue: TissueMask | None = None):
        self.settings = settings = settings or LiveSettings()
        from ..devices import resolve_device

        self.device = resolve_device(settings.device)
        self.model = model.to(self.device)
        self.slide = slide
        self.store = SlideFeatureStore(model, slide, root=settings.store_root, mpp=settings.mpp,
                                       window=settings.window, dtype=settings.dtype, width=settings.width,
                                       tissue=tissue if tissue is not None else settings.tissue)
        g = self.geometry = self.store.geometry
        # the head is trained at the store's resolution and window: the checkpoint says so
        model.config = model.config.with_changes(mpp=round(g.mpp, 6), input_size=g.window)
        self.labels = LabelBuffer(g, model.num_classes)
        # the head that trains: the model's own, or at a reduced width one reading the basis' components
        # (created when the basis exists, i.e. after the first windows are stored; folded back on save)
        self._head: torch.nn.Module | None = model.head if self.store.width is None else None
        self._optimizer: torch.optim.Optimizer | None = None
        self._twin: torch.nn.Module | None = None
        self._twin_optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self._rng = random.Random(settings.seed)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._cancel = threading.Event()
        self._view: tuple[float, float, float, float] | None = None
        self._view_version = 0
        self._suggest: dict[str, Any] | None = None
        self._features: OrderedDict[Window, list[torch.Tensor]] = OrderedDict()
        self._labelled: OrderedDict[Window, tuple[int, np.ndarray]] = OrderedDict()  # changed_at, flat indices
        self._changed_at = time.perf_counter()
        self._trained_version = -1
        self._steps_since_change = 0
        self._predicted: tuple[int, int, int] | None = None  # (labels version, view version, step)
        self._outward: list[Window] | None = None
        # previews at the head's own resolution, until it proves not to tile the window
        self._native = not settings.full_resolution

    @property
    def head(self) -> torch.nn.Module:
        """The head being trained (the model's own at full width)."""
        if self._head is None:
            from .basis import reduced_head

            basis = self.store.basis()
            if basis is None:
                raise ConfigError("The reduced-width head needs the store's basis; store a window first.")
            self._head = reduced_head(self.model, basis)
        return self._head

    @property
    def twin(self) -> torch.nn.Module:
        """The second head of ``uncertainty="disagreement"``: the head's architecture, other random weights
        (a loaded head's twin starts afresh), its own optimizer; never saved."""
        if self._twin is None:
            import copy

            twin = copy.deepcopy(self.head)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.seed + 1)
                for module in twin.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if callable(reset):
                        reset()
            self._twin = twin
            self._twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=self.settings.lr,
                                                     weight_decay=self.settings.weight_decay)
        return self._twin

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The head's optimizer: one for the loop's life, so every stroke continues its state (warm start)."""
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.settings.lr,
                                                weight_decay=self.settings.weight_decay)
        return self._optimizer

    # --- called from any thread -------------------------------------------------------------------
    def update_labels(self, labels: np.ndarray, offset: Sequence[float] = (0.0, 0.0), scale: float = 1.0
                      ) -> list[Window]:
        """Hand the loop new strokes: ``labels`` (H, W; 0 = not annotated, k = class k-1) covering level-0
        pixels from ``offset`` = (x, y) at ``scale`` level-0 px per labels pixel. What the rectangle covers
        replaces earlier labels there (0 erases). Returns the windows touched."""
        touched = self.labels.paint(labels, offset, scale)
        if touched:
            with self._lock:
                self._changed_at = time.perf_counter()
            self._wake.set()
        return touched

    def set_view(self, box: Sequence[float] | None) -> None:
        """The visible field, (x, y, width, height) in level-0 pixels (None: no view, nothing is predicted)."""
        view = None
        if box is not None:
            x, y, w, h = (float(v) for v in box)
            view = (x, y, w, h)
        with self._lock:
            self._view = view
            self._view_version += 1
        self._wake.set()

    def request_suggestions(self, k: int = 8, box: int | None = None) -> None:
        """Ask for ``k`` regions to annotate next (a :class:`LiveSuggestions` event answers)."""
        if k < 1:
            raise ConfigError(f"The number of suggested regions must be at least 1, got {k}.")
        with self._lock:
            self._suggest = {"k": int(k), "box": box}
        self._wake.set()

    def cancel(self) -> None:
        """Stop after the current step; the model keeps the last head."""
        self._cancel.set()
        self._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> LiveStopped:
        """Run until cancelled (from another thread); returns the final event."""
        final = deque(self.iter_run(), maxlen=1)[0]  # keep only the last event: predictions are large
        assert isinstance(final, LiveStopped)
        return final

    def iter_run(self) -> Generator[LiveEvent, None, None]:
        """The loop's events until :meth:`cancel` (see the module docstring); ends with :class:`LiveStopped`.

        A stopped loop may run again (live mode toggled back on): it continues the same head and optimizer.
        """
        try:
            yield from self._turns()
            self.sync_model()
            yield LiveStopped("cancelled", self.steps)
        finally:
            self._cancel.clear()  # the cancel is spent: a later iter_run() starts a new run

    def _turns(self) -> Generator[LiveEvent, None, None]:
        while not self._cancel.is_set():
            self._wake.clear()
            with self._lock:
                view, view_version, suggest = self._view, self._view_version, self._suggest
            version = self.labels.version
            if version != self._trained_version:
                self._trained_version, self._steps_since_change = version, 0
            labelled = self.labels.windows()
            needed = self.store.missing(dict.fromkeys([*self._view_windows(view), *labelled]))
            if needed:
                yield from self.store.iter_fill(view, windows=needed, device=self.device,
                                                batch_size=self.settings.fill_batch, should_stop=self._interrupted,
                                                abandon=self._cancel.is_set)
                continue
            if suggest is not None:
                with self._lock:
                    self._suggest = None
                yield LiveSuggestions(tuple(self.suggest(suggest["k"], suggest["box"])))
                continue
            if labelled and self._steps_since_change < self.settings.max_steps:
                yield self._train_step(labelled, version)
                if self._prediction_due(version):
                    prediction = self._predict(view, version, view_version, latency=True)
                    if prediction is not None:
                        yield prediction
                continue
            if view is not None and self.steps and self._predicted is not None and \
                    self._predicted[:2] != (version, view_version):
                prediction = self._predict(view, version, view_version, latency=False)
                if prediction is not None:
                    yield prediction
                continue
            outward = self._next_outward(view)
            if outward:
                # idle work: a stroke, a camera move or a request drops the batch at once (one block's wait)
                yield from self.store.iter_fill(view, windows=outward, device=self.device,
                                                batch_size=self.settings.fill_batch,
                                                abandon=self._idle_interrupted(version, view_version))
                continue
            self._wake.wait()

    def _prediction_due(self, version: int) -> bool:
        s, n = self.settings, self._steps_since_change
        if self._predicted is None or self._predicted[0] != version:  # the first refresh after a change
            with self._lock:
                waited = time.perf_counter() - self._changed_at
            return n >= s.first_steps or waited >= s.first_seconds
        return n % s.predict_every == 0 or n == s.max_steps

    def _interrupted(self) -> bool:
        return self._cancel.is_set() or self.labels.version != self._trained_version

    def _idle_interrupted(self, version: int, view_version: int) -> Callable[[], bool]:
        """Whether anything asked for the loop since a turn began with ``version`` and ``view_version``."""
        def asked() -> bool:
            return (self._cancel.is_set() or self.labels.version != version or self._view_version != view_version
                    or self._suggest is not None)
        return asked

    def _view_windows(self, view: Sequence[float] | None) -> list[Window]:
        if view is None:
            return []
        windows = self.store.tissue_windows(view)
        return self.geometry.nearest_first(windows, _centre(view))[:self.settings.view_windows]

    def _next_outward(self, view: Sequence[float] | None) -> list[Window]:
        if not self.settings.fill_outward:
            return []
        if self._outward is None:
            self._outward = self.store.tissue_windows()
        self._outward = self.store.missing(self._outward)
        return self.geometry.nearest_first(self._outward, view)[:self.settings.fill_batch]

    # --- features -----------------------------------------------------------------------------------
    def features(self, windows: Sequence[Window]) -> list[torch.Tensor]:
        """Stored grids of ``windows`` on the loop's device (one (N, C, t, t) tensor per block), cached.

        Channels-last, like the crops training reads (:func:`_channels_last`)."""
        grids = self._window_grids(windows)
        return [_channels_last(torch.stack([g[b] for g in grids])) for b in range(len(self.store.blocks))]

    def _window_grids(self, windows: Sequence[Window]) -> list[list[torch.Tensor]]:
        """Per window, its (C, t, t) grid per block: read and converted to float32 once, then kept (LRU)."""
        missing = [w for w in dict.fromkeys(windows) if w not in self._features]
        if missing:
            read = self.store.read(missing)
            for i, window in enumerate(missing):
                self._features[window] = [grid[i].to(self.device) for grid in read]
        for window in windows:
            self._features.move_to_end(window)
        found = [self._features[w] for w in windows]
        while len(self._features) > max(self.settings.feature_cache_windows, len(windows)):
            self._features.popitem(last=False)
        return found

    # --- training -----------------------------------------------------------------------------------
    def _crop(self, window: Window, labels: np.ndarray, changed: int) -> tuple[int, int]:
        """Token offsets (ty, tx) of a training crop around a random labelled pixel of ``window``, whose
        ``labels`` were read after its change counter said ``changed``."""
        g = self.geometry
        tokens = min(g.tokens, max(1, self.settings.crop // g.patch))
        cached = self._labelled.get(window)
        if cached is None or cached[0] != changed:  # where a window's labels are: found once per change
            cached = self._labelled[window] = (changed, np.flatnonzero(labels).astype(np.int32))
        self._labelled.move_to_end(window)
        while len(self._labelled) > LABELLED_CACHE:
            self._labelled.popitem(last=False)
        y, x = divmod(int(cached[1][self._rng.randrange(len(cached[1]))]), labels.shape[1])
        ty = min(max(0, y // g.patch - tokens // 2), g.tokens - tokens)
        tx = min(max(0, x // g.patch - tokens // 2), g.tokens - tokens)
        return ty, tx

    def _train_step(self, labelled: list[Window], version: int) -> LiveStep:
        began = time.perf_counter()
        s, g = self.settings, self.geometry
        newest = [w for w in labelled if self.labels.changed_at(w) == self.labels.changed_at(labelled[0])]
        chosen = [self._rng.choice(newest) if i % 2 == 0 else self._rng.choice(labelled) for i in range(s.batch_size)]
        tokens = min(g.tokens, max(1, s.crop // g.patch))
        side = tokens * g.patch
        grids = self._window_grids(chosen)  # crops are cut from each window's grids: no stacked copy
        crops: list[list[torch.Tensor]] = [[] for _ in self.store.blocks]
        targets = []
        for i, window in enumerate(chosen):
            changed = self.labels.changed_at(window)  # before reading: a change in between is seen next time
            labels = self.labels.get(window)
            if labels is None:  # erased meanwhile: train on an empty crop (all ignored)
                labels = np.zeros((g.window, g.window), np.uint8)
                ty = tx = 0
            else:
                ty, tx = self._crop(window, labels, changed)
            for b, grid in enumerate(grids[i]):
                crops[b].append(grid[:, ty:ty + tokens, tx:tx + tokens])
            part = labels[ty * g.patch:ty * g.patch + side, tx * g.patch:tx * g.patch + side].astype(np.int64) - 1
            part[part < 0] = IGNORE
            targets.append(torch.from_numpy(part))
        inputs = [_channels_last(torch.stack(c)) for c in crops]
        target = torch.stack(targets).to(self.device)
        value = self._fit(self.head, self.optimizer, inputs, target)
        if self.settings.uncertainty == "disagreement":
            twin = self.twin
            assert self._twin_optimizer is not None
            self._fit(twin, self._twin_optimizer, inputs, target)
        self.steps += 1
        self._steps_since_change += 1
        return LiveStep(self.steps, value, int(self.labels.pixel_counts().sum()), version,
                        time.perf_counter() - began)

    def _fit(self, head: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: list[torch.Tensor],
             target: torch.Tensor) -> float:
        """One optimizer step of ``head`` on crops ``inputs`` against ``target``; the loss (nan: no label)."""
        head.train()
        try:
            if not (target != IGNORE).any():
                return float("nan")
            logits = head(inputs, [], out_size=tuple(target.shape[-2:]))
            loss = torch.nn.functional.cross_entropy(logits.float(), target, weight=self._class_weights(),
                                                     ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        finally:
            head.eval()

    def _class_weights(self) -> torch.Tensor | None:
        """Inverse labelled-pixel frequency per class (mean 1 over the labelled classes), so a class painted
        with a few dots is not drowned by one painted with broad strokes; None when ``balance`` is off."""
        if not self.settings.balance:
            return None
        counts = self.labels.pixel_counts().astype(np.float64)
        present = counts > 0
        weights = np.zeros_like(counts)
        weights[present] = counts[present].sum() / (present.sum() * counts[present])
        return torch.as_tensor(np.clip(weights, 0.0, 100.0), dtype=torch.float32, device=self.device)

    # --- prediction ---------------------------------------------------------------------------------
    def predict_windows(self, windows: Sequence[Window], full_resolution: bool = True
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(N, S, S) uint8 labels (k = class k-1) and float32 uncertainty of stored windows, current head.

        ``full_resolution``: S is the window (what the model predicts for it); otherwise the side the
        head classifies at (:func:`~pfmseg_engine.live.head.native_logits`), which divides the window
        when the loop's previews use it (else the loop predicts at full resolution).
        """
        from .head import disagreement, native_logits

        size = (self.geometry.window,) * 2
        if not windows:
            return np.zeros((0, *size), np.uint8), np.zeros((0, *size), np.float32)
        head = self.head
        twin = self.twin if self.settings.uncertainty == "disagreement" else None
        was_training = head.training
        head.eval()

        def run(module: torch.nn.Module, grids: list[torch.Tensor]) -> torch.Tensor:
            return module(grids, [], out_size=size) if full_resolution else native_logits(module, grids, size)

        labels, uncertainty = [], []
        try:
            with torch.inference_mode():
                for start in range(0, len(windows), 4):
                    part = list(windows[start:start + 4])
                    grids = self.features(part)
                    logits = run(head, grids)
                    if twin is None:
                        part_labels, part_uncertainty = labels_and_uncertainty(logits, self.settings.uncertainty)
                    else:
                        part_labels = labels_and_uncertainty(logits)[0]
                        part_uncertainty = disagreement(logits, run(twin.eval(), grids))
                    labels.append(part_labels.cpu().numpy())
                    uncertainty.append(part_uncertainty.cpu().numpy())
        finally:
            head.train(was_training)
        return np.concatenate(labels), np.concatenate(uncertainty).astype(np.float32)

    def _predict(self, view: Sequence[float] | None, version: int, view_version: int,
                 latency: bool) -> LivePrediction | None:
        self._predicted = (version, view_version, self.steps)
        windows = self._view_windows(view)
        if not windows:
            return None
        began = time.perf_counter()
        g = self.geometry
        labels, uncertainty = self.predict_windows(windows, full_resolution=not self._native)
        if g.window % labels.shape[-1] or labels.shape[-1] != labels.shape[-2]:
            self._native = False  # the head classifies at a size that does not tile the window
            labels, uncertainty = self.predict_windows(windows, full_resolution=True)
        stride = g.window // labels.shape[-1]  # model pixels per predicted pixel
        w = g.window // stride
        r0, r1 = min(r for r, _ in windows), max(r for r, _ in windows) + 1
        c0, c1 = min(c for _, c in windows), max(c for _, c in windows) + 1
        y0, x0 = r0 * g.window, c0 * g.window
        y1, x1 = min(r1 * g.window, g.shape[0]), min(c1 * g.window, g.shape[1])
        height, width = -(-(y1 - y0) // stride), -(-(x1 - x0) // stride)
        mosaic = np.zeros((height, width), np.uint8)
        spread = np.zeros((height, width), np.float32)
        for (r, c), lab, unc in zip(windows, labels, uncertainty, strict=True):
            ty, tx = (r - r0) * w, (c - c0) * w
            h, wd = min(w, height - ty), min(w, width - tx)
            mosaic[ty:ty + h, tx:tx + wd] = lab[:h, :wd]
            spread[ty:ty + h, tx:tx + wd] = unc[:h, :wd]
        counts = np.bincount(mosaic.ravel(), minlength=self.model.num_classes + 1)[1:]
        pixel_mm2 = (g.mpp * stride / 1000.0) ** 2
        areas = {name: float(n) * pixel_mm2 for name, n in zip(self.model.class_names, counts, strict=True)}
        with self._lock:
            changed_at = self._changed_at
        now = time.perf_counter()
        return LivePrediction(labels=mosaic, uncertainty=spread, box=(y0, y1, x0, x1),
                              offset=(x0 * g.downsample, y0 * g.downsample), scale=g.downsample * stride,
                              areas_mm2=areas, step=self.steps, labels_version=version, seconds=now - began,
                              latency=now - changed_at if latency else None)

    # --- suggestions and saving -------------------------------------------------------------------
    def suggest(self, k: int = 8, box: int | None = None) -> list[SuggestedRegion]:
        """``k`` regions to annotate next among the stored tissue windows (call from the loop's thread, or
        while it is not running; :meth:`request_suggestions` asks a running loop)."""
        from .suggest import rank_regions, score_windows

        stored = self.store.done()
        candidates = [w for w in self.store.tissue_windows() if stored[w]]
        kind = self.settings.uncertainty if self.settings.uncertainty in UNCERTAINTIES else "entropy"
        scores = score_windows(self.model, self.store.windows, candidates, store=self.store, box=box,
                               kind=kind, device=self.device, head=self.head)
        return rank_regions(scores, self.store.windows, k, labelled=self.labels.windows())

    def sync_model(self) -> None:
        """Make ``self.model`` compute what the trained head computes (at a reduced width: fold the basis
        into the model's head; a later loop on the model starts from exactly this head). Done on stop and save."""
        if self._head is not None and self._head is not self.model.head:
            from .basis import fold_head

            basis = self.store.basis()
            assert basis is not None
            fold_head(self._head, self.model, basis)

    def save(self, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write the current head as an ordinary checkpoint (frozen strategy) at the store's resolution."""
        from ..checkpoint import save_checkpoint
        from ..training_scale import TrainingScale

        self.sync_model()
        counts = self.labels.pixel_counts()
        info = {"live_steps": self.steps, "labelled_pixels": int(counts.sum()), **(metrics or {})}
        scale = TrainingScale(shrink=1.0, data_mpp=self.geometry.mpp)
        return save_checkpoint(path, self.model, metrics=info, metadata={"training_scale": scale.to_dict()})


def _channels_last(grid: torch.Tensor) -> torch.Tensor:
    """``grid`` stored channels-last: the head's convolutions then run about twice as fast on the CPU
    (measured for the ``fast`` head on 384-channel grids, training and prediction alike), same values."""
    return grid.contiguous(memory_format=torch.channels_last)


def _centre(view: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in view)
    return x + w / 2, y + h / 2, 0.0, 0.0


__all__ = ["LiveEvent", "LiveLoop", "LivePrediction", "LiveSettings", "LiveStep", "LiveStopped", "LiveSuggestions"]
