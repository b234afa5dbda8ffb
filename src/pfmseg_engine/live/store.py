"""The slide feature store: a frozen backbone's token features of a slide, computed once, kept in zarr.

The live loop trains and predicts a head many times a second on the same slide; what makes that
possible is that the backbone, the expensive part, runs once per slide region. The store tiles the
slide at the model's resolution into non-overlapping windows of ``window`` pixels (the *window
geometry*), runs the backbone on each window exactly as the model does (same normalisation, the same
position-table resampling, padding at the slide edge as inference pads), and keeps the token grids of
exactly the blocks the model's head consumes (after the ViT's final norm where the head reads the
encoder's normalised output), as one chunked, compressed zarr array per block: shape
``(C, rows * t, cols * t)`` with ``t = window / patch`` and one chunk per window, so a window is one
chunk read and background windows take no disk at all.

**Width.** With ``width`` below the backbone's, each token is kept as its leading principal components
(:mod:`.basis`, fitted once per model key on the first windows stored and shared by all its slides),
which bounds a wide backbone's store by the width chosen.

**Key.** A store folder is keyed like the compare feature cache (:mod:`pfmseg_engine.compare.cache`,
whose weights hashing it reuses): backbone name and architecture, the weights file's content hash,
timm's version, the position grid and resampling kernel, mean/std, the tapped blocks and whether the
final norm is applied, the dtype and the window; inside it one folder per slide, keyed by the slide's
content identity and the resolution plan. Changing any of them gives another folder, so stale
features are never served.

**Resumable, one writer, bounded memory.** ``done.npy`` records finished windows and is replaced
atomically after each batch, after the batch's chunks are written: an interrupted fill resumes, and a
window is never served half-written. A fill holds an OS-level lock
(:class:`~pfmseg_engine.storage.OutputLock`), so a second process filling the same store waits or stops
with who holds it; reading needs no lock. Memory is one batch of windows whatever the slide size. A
full disk is one :class:`~pfmseg_engine.errors.StorageError` sentence naming the store.

**Order.** :meth:`SlideFeatureStore.iter_fill` computes the windows touching a priority box (the
visible field) first, then the others nearest first, so what the user looks at is ready first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, StorageError

if TYPE_CHECKING:
    from ..backbones.backbone import Backbone
    from ..model import SegmentationModel
    from ..slides import Slide, TissueMask
    from ..slides.resolution import ResolutionPlan
    from .basis import FeatureBasis

STORE_FORMAT = 1
DTYPES = ("float16", "float32")
#: Windows in the first batch of a reduced-width store, whose tokens the basis is fitted on.
BASIS_WINDOWS = 8
#: (row, column) of a window in the store's grid.
Window = tuple[int, int]


def default_store_root() -> Path:
    """Where stores go unless a root is given: ``<pfmseg cache>/features`` (``$PFMSEG_CACHE_DIR`` first)."""
    from ..paths import cache_dir

    return cache_dir() / "features"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def store_refusal(model: Any) -> str | None:
    """Why the store cannot serve ``model``'s head (None: it can).

    On top of the compare cache's rule (the backbone must not train, no Transformer adapter), the head
    must read the backbone's grids only: a CNN adapter feeds it skips computed from the image.
    """
    from ..compare.cache import cache_refusal

    refusal = cache_refusal(model)
    if refusal is None and getattr(model.encoder, "cnn_adapter", None) is not None:
        refusal = "the CNN adapter feeds the head skips computed from the image"
    return refusal


def vit_backbone(model: Any) -> Backbone:
    """``model``'s ViT backbone (a from-scratch model has none to store features of)."""
    from ..backbones.backbone import Backbone

    backbone = model.encoder.backbone
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"{model.config.backbone} has no foundation-model backbone whose features could be stored.")
    return backbone


def consumed_blocks(model: Any) -> tuple[int, ...]:
    """The tapped blocks ``model``'s head reads: all of them, or the last one for heads that read only it."""
    from ..heads import LightDecoder

    blocks = tuple(int(b) for b in vit_backbone(model).feature_indices)
    return blocks[-1:] if isinstance(model.head, LightDecoder) else blocks


@dataclass(frozen=True)
class StoreGeometry:
    """The store's window grid at the model's resolution.

    ``shape`` is (H, W) of the slide at ``resolution``; windows are ``window`` px squares at
    ``(row * window, column * window)``, ``rows x cols`` of them (the last ones run past the slide
    edge and are padded). ``downsample`` is slide level-0 pixels per model pixel.
    """

    resolution: ResolutionPlan
    window: int
    patch: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.resolution.shape

    @property
    def downsample(self) -> float:
        return float(self.resolution.downsample)

    @property
    def mpp(self) -> float:
        return float(self.resolution.mpp)

    @property
    def tokens(self) -> int:
        """Tokens per window side."""
        return self.window // self.patch

    @property
    def rows(self) -> int:
        return -(-self.shape[0] // self.window)

    @property
    def cols(self) -> int:
        return -(-self.shape[1] // self.window)

    def box(self, window: Window) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of a window in model pixels (not clipped to the slide)."""
        y0, x0 = window[0] * self.window, window[1] * self.window
        return y0, y0 + self.window, x0, x0 + self.window

    def level0_box(self, window: Window) -> tuple[float, float, float, float]:
        """(x, y, width, height) of a window in slide level-0 pixels."""
        y0, _, x0, _ = self.box(window)
        d = self.downsample
        return x0 * d, y0 * d, self.window * d, self.window * d

    def windows_in(self, box: Sequence[float] | None) -> list[Window]:
        """Windows touching ``box`` = (x, y, width, height) in level-0 pixels (every window for None)."""
        if box is None:
            return [(r, c) for r in range(self.rows) for c in range(self.cols)]
        x, y, w, h = (float(v) for v in box)
        span = self.window * self.downsample
        r0, r1 = max(0, math.floor(y / span)), min(self.rows, math.ceil((y + h) / span))
        c0, c1 = max(0, math.floor(x / span)), min(self.cols, math.ceil((x + w) / span))
        return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]

    def nearest_first(self, windows: Iterable[Window], box: Sequence[float] | None) -> list[Window]:
        """``windows`` ordered by the distance of their centre to ``box`` (level-0 x, y, w, h; inside = 0)."""
        windows = list(windows)
        if box is None:
            return sorted(windows)
        x, y, w, h = (float(v) for v in box)
        span = self.window * self.downsample

        def distance(window: Window) -> tuple[float, Window]:
            cy, cx = (window[0] + 0.5) * span, (window[1] + 0.5) * span
            dy, dx = max(y - cy, 0.0, cy - y - h), max(x - cx, 0.0, cx - x - w)
            return math.hypot(dy, dx), window

        return sorted(windows, key=distance)


class SlideWindows:
    """A slide cut into the store's windows at the model's resolution: geometry, tissue, pixels.

    What the store, the live loop and suggestions share; needs no model. ``tissue``: True detects
    tissue on first use, a :class:`~pfmseg_engine.slides.TissueMask` is used as given, False keeps
    every window.
    """

    def __init__(self, slide: Slide, geometry: StoreGeometry, tissue: bool | TissueMask = True):
        self.slide, self.geometry = slide, geometry
        self._tissue_setting = tissue
        self._tissue: TissueMask | None = None

    @classmethod
    def plan(cls, slide: Slide, *, patch: int, window: int, mpp: float | None = None,
             tissue: bool | TissueMask = True, mpp_tolerance: float | None = None) -> SlideWindows:
        """Windows of ``window`` px (a multiple of ``patch``) at ``mpp`` (default: the slide's level 0)."""
        from ..inference.window import check_window
        from ..slides import plan_resolution
        from ..slides.resolution import DEFAULT_TOLERANCE

        window = check_window(int(window), patch)
        resolution = plan_resolution(slide, mpp, DEFAULT_TOLERANCE if mpp_tolerance is None else mpp_tolerance)
        return cls(slide, StoreGeometry(resolution, window, patch), tissue)

    @property
    def tissue(self) -> TissueMask | None:
        """The tissue mask windows are chosen by (detected on first use), None when tissue is off."""
        if self._tissue is None and self._tissue_setting is not False:
            from ..slides import TissueMask, detect_tissue

            setting = self._tissue_setting
            self._tissue = setting if isinstance(setting, TissueMask) else detect_tissue(self.slide)
        return self._tissue

    def tissue_windows(self, box: Sequence[float] | None = None) -> list[Window]:
        """Windows touching ``box`` (level-0 x, y, w, h; None: the whole slide) that hold tissue."""
        windows = self.geometry.windows_in(box)
        tissue = self.tissue
        if tissue is None:
            return windows
        kept = []
        for window in windows:
            x, y, w, h = self.geometry.level0_box(window)
            if tissue.any_in(y, y + h, x, x + w):
                kept.append(window)
        return kept

    def image(self, window: Window) -> np.ndarray:
        """The (window, window, 3) uint8 pixels the backbone sees for ``window`` (edge windows padded as
        inference pads them)."""
        from ..inference.window import pad_to_window

        g = self.geometry
        y0, y1, x0, x1 = g.box(window)
        source = g.resolution.source(self.slide)
        image = np.asarray(source[y0:min(y1, g.shape[0]), x0:min(x1, g.shape[1])])
        return pad_to_window(image, g.window)

    def valid(self, window: Window) -> tuple[int, int]:
        """(height, width) of ``window`` inside the slide (the rest is padding)."""
        g = self.geometry
        y0, _, x0, _ = g.box(window)
        return min(g.window, g.shape[0] - y0), min(g.window, g.shape[1] - x0)


@dataclass(frozen=True)
class FillProgress:
    """One batch of windows stored: ``done`` of ``total`` windows this fill computes; ``windows`` = the batch."""

    done: int
    total: int
    windows: tuple[Window, ...]
    seconds: float
    kind: str = "fill"


class _Abandoned(Exception):
    """Raised before a backbone block when a fill's ``abandon()`` turned true."""


def _save_flags(path: Path, flags: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        np.save(handle, flags)
    os.replace(tmp, path)


class SlideFeatureStore:
    """Backbone token features of one slide at the model's resolution (see the module docstring).

    ``model`` is a :class:`~pfmseg_engine.model.SegmentationModel` whose backbone is frozen and whose
    head reads only the backbone's grids (:func:`store_refusal`); ``mpp`` the resolution (default: the
    model's training mpp, else the slide's level 0); ``window`` the window side (default: the model's
    input size), a multiple of the patch size. ``tissue``: True detects tissue and only tissue windows
    are filled by default; a :class:`~pfmseg_engine.slides.TissueMask` is used as given; False fills
    every window. ``root`` defaults to :func:`default_store_root`.
    """

    def __init__(self, model: SegmentationModel, slide: Slide, *, root: str | Path | None = None,
                 mpp: float | None = None, window: int | None = None, dtype: str = "float16",
                 tissue: bool | TissueMask = True, mpp_tolerance: float | None = None, width: int | None = None):
        refusal = store_refusal(model)
        if refusal:
            raise ConfigError(f"The feature store cannot serve this model's head: {refusal}. Use a model with "
                              "the frozen strategy (the live head is one).")
        if dtype not in DTYPES:
            raise ConfigError(f"Feature store dtype '{dtype}' is not one of {', '.join(DTYPES)}.")

        from ..compare.cache import backbone_identity

        self.backbone = backbone = vit_backbone(model)
        spec, config = backbone.spec, model.config
        self.model, self.slide, self.dtype = model, slide, dtype
        self.root = Path(root).expanduser() if root is not None else default_store_root()
        self.windows = SlideWindows.plan(slide, patch=backbone.patch_size, window=int(window or config.input_size),
                                         mpp=mpp or config.mpp, tissue=tissue, mpp_tolerance=mpp_tolerance)
        self.geometry = geometry = self.windows.geometry
        window, resolution = geometry.window, geometry.resolution
        self.blocks = consumed_blocks(model)
        self.final_norm = bool(backbone.keeps_final_norm)
        if width is not None and int(width) < 1:
            raise ConfigError(f"The store's reduced width must be at least 1 channel, got {width}.")
        # narrower than the backbone: principal components (see .basis); otherwise the tokens as they are
        self.width = int(width) if width is not None and int(width) < backbone.embed_dim else None
        if self.width is not None:
            from .basis import check_foldable

            check_foldable(config.head)
        self.model_key = {
            "format": STORE_FORMAT,
            **backbone_identity(backbone, config, self.root / "weights_sha256.json"),
            "blocks": list(self.blocks),
            "final_norm": self.final_norm,
            "dtype": dtype,
            "window": window,
            "width": self.width,
        }
        self.slide_key = {"slide": slide.content_identity(), "resolution": resolution.to_dict()}
        name = f"{spec.name}{'-tiny' if config.tiny else ''}-{_digest(self.model_key)[:16]}"
        self.model_directory = self.root / name
        self.directory = self.model_directory / f"{_safe(slide.name)}-{_digest(self.slide_key)[:16]}"
        self._basis: FeatureBasis | None = None
        self._group: Any = None
        self._arrays: dict[int, Any] = {}
        self._writable = False

    def __repr__(self) -> str:
        return f"SlideFeatureStore({self.directory})"

    # --- geometry and tissue ----------------------------------------------------------------------
    @property
    def zarr_path(self) -> Path:
        return self.directory / "features.zarr"

    @property
    def flags_path(self) -> Path:
        return self.directory / "done.npy"

    @property
    def channels(self) -> int:
        """Channels stored per token: the reduced width, else the backbone's."""
        return self.width if self.width is not None else self.backbone.embed_dim

    @property
    def basis_path(self) -> Path:
        """The principal components every slide of this model's stores shares (reduced width only)."""
        return self.model_directory / "basis.npz"

    def basis(self) -> FeatureBasis | None:
        """The reduced width's basis (None at full width, or before the first fill fitted it)."""
        if self.width is None:
            return None
        if self._basis is None and self.basis_path.is_file():
            from .basis import FeatureBasis

            self._basis = FeatureBasis.load(self.basis_path)
        return self._basis

    def _basis_for(self, grids: list[torch.Tensor]) -> FeatureBasis:
        """The basis, fitted on ``grids`` (the first windows stored) when there is none yet."""
        found = self.basis()
        if found is not None:
            return found
        from ..storage import OutputLock
        from .basis import FeatureBasis

        with OutputLock(self.basis_path, wait=None):  # one fit, whichever process comes first
            if self.basis_path.is_file():
                self._basis = FeatureBasis.load(self.basis_path)
            else:
                assert self.width is not None
                self._basis = FeatureBasis.fit(grids, self.width)
                self._basis.save(self.basis_path)
        return self._basis

    @property
    def tissue(self) -> TissueMask | None:
        return self.windows.tissue

    def tissue_windows(self, box: Sequence[float] | None = None) -> list[Window]:
        """Windows touching ``box`` (level-0 x, y, w, h; None: the whole slide) that hold tissue."""
        return self.windows.tissue_windows(box)

    # --- state ------------------------------------------------------------------------------------
    def done(self) -> np.ndarray:
        """(rows, cols) bool: which windows are stored (read fresh: another process may be filling)."""
        shape = (self.geometry.rows, self.geometry.cols)
        try:
            flags = np.load(self.flags_path)
        except (OSError, ValueError):
            return np.zeros(shape, bool)
        if flags.shape != shape or not self._same_basis():
            return np.zeros(shape, bool)
        return flags

    def _same_basis(self) -> bool:
        """Whether the windows stored were projected with the basis there is now (always at full width)."""
        if self.width is None:
            return True
        basis = self.basis()
        try:
            recorded = (self.directory / "basis.sha256").read_text(encoding="utf-8").strip()
        except OSError:
            return False
        return basis is not None and recorded == basis.digest()

    def missing(self, windows: Iterable[Window]) -> list[Window]:
        flags = self.done()
        return [w for w in windows if not flags[w]]

    def _open(self, create: bool) -> dict[int, Any]:
        if self._arrays and (self._writable or not create):
            return self._arrays
        import zarr

        if not create and not self.zarr_path.exists():
            raise StorageError(f"The feature store '{self.directory}' holds no features yet; fill it first "
                               "(python -m pfmseg_engine features, or SlideFeatureStore.fill()).")
        if create:
            from zarr.codecs import BloscCodec

            group = zarr.open_group(str(self.zarr_path), mode="a")
            g, t = self.geometry, self.geometry.tokens
            shape = (self.channels, g.rows * t, g.cols * t)
            for block in self.blocks:
                name = f"block_{block}"
                if name not in group:
                    group.create_array(name, shape=shape, chunks=(self.channels, t, t), dtype=self.dtype,
                                       fill_value=0, compressors=BloscCodec(cname="zstd", clevel=3,
                                                                            shuffle="shuffle"))
            key = json.loads(json.dumps({"model": self.model_key, "slide": self.slide_key}, default=str))
            group.attrs.update({"pfmseg_feature_store": key})
        else:
            group = zarr.open_group(str(self.zarr_path), mode="r")
        self._group, self._writable = group, create
        self._arrays = {block: group[f"block_{block}"] for block in self.blocks}
        return self._arrays

    # --- computing --------------------------------------------------------------------------------
    def window_image(self, window: Window) -> np.ndarray:
        """The pixels the backbone sees for ``window`` (see :meth:`SlideWindows.image`)."""
        return self.windows.image(window)

    def compute(self, images: np.ndarray, device: Any = "cpu", abandon: Callable[[], bool] | None = None
                ) -> list[torch.Tensor]:
        """The stored representation of (N, H, W, 3) uint8 windows computed now: one (N, C, t, t) float32
        tensor per consumed block, after the final norm where the head expects it (and projected on the
        basis at a reduced width; the first call fits it). ``abandon`` as in :meth:`backbone_features`."""
        grids = self.backbone_features(images, device, abandon)
        return grids if self.width is None else self._basis_for(grids).project(grids)

    def backbone_features(self, images: np.ndarray, device: Any = "cpu", abandon: Callable[[], bool] | None = None
                          ) -> list[torch.Tensor]:
        """The consumed blocks' grids of (N, H, W, 3) uint8 windows as the head reads them at full width.

        ``abandon()`` is asked before every transformer block; when it answers True the computation
        stops there (:class:`_Abandoned`): a live loop's stroke then waits for one block, not for a
        whole batch of windows (seconds on a CPU)."""
        handles = []
        if abandon is not None:
            def check(_module: torch.nn.Module, _inputs: Any) -> None:
                if abandon():
                    raise _Abandoned

            handles = [block.register_forward_pre_hook(check) for block in self.backbone.vit.blocks]
        try:
            return self._backbone_features(images, device)
        finally:
            for handle in handles:
                handle.remove()

    def _backbone_features(self, images: np.ndarray, device: Any) -> list[torch.Tensor]:
        model, backbone = self.model, self.backbone
        device = torch.device(device)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
        with torch.inference_mode():
            x = (x - model.mean.to(device)) / model.std.to(device)
            grids = backbone.features(x, indices=self.blocks)
            if self.final_norm:  # the head reads the encoder's normalised last grid (as Encoder.forward gives it)
                norm = backbone.vit.get_submodule("norm")
                grids[-1] = norm(grids[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return [g.float() for g in grids]

    def fill(self, box: Sequence[float] | None = None, *, windows: Sequence[Window] | None = None,
             device: Any = "cpu", batch_size: int = 4, wait: float | None = 0.0,
             progress: Callable[[FillProgress], Any] | None = None,
             should_stop: Callable[[], bool] | None = None) -> int:
        """Store every missing tissue window, ``box``'s first (see :meth:`iter_fill`); returns how many."""
        filling = self.iter_fill(box, windows=windows, device=device, batch_size=batch_size, wait=wait,
                                 should_stop=should_stop)
        while True:
            try:
                event = next(filling)
            except StopIteration as finished:
                return int(finished.value)
            if progress is not None:
                progress(event)

    def iter_fill(self, box: Sequence[float] | None = None, *, windows: Sequence[Window] | None = None,
                  device: Any = "cpu", batch_size: int = 4, wait: float | None = 0.0,
                  should_stop: Callable[[], bool] | None = None, abandon: Callable[[], bool] | None = None
                  ) -> Generator[FillProgress, None, int]:
        """Compute and store missing windows, yielding a :class:`FillProgress` per batch; returns how many.

        ``windows`` (default: every tissue window) are computed with those touching ``box`` (level-0
        x, y, width, height: the visible field) first, then nearest first. ``wait``: seconds to wait
        for another process filling the same store (None: as long as it takes; 0: stop at once with
        who holds it). ``should_stop()`` ends early (asked between batches); ``abandon()`` too, asked
        inside the backbone as well, dropping the batch being computed. What is stored stays valid.
        """
        from ..storage import OutputLock, writing

        todo = list(windows) if windows is not None else self.tissue_windows()
        done = 0
        with writing(self.directory, "the feature store"):
            self.directory.mkdir(parents=True, exist_ok=True)
        with OutputLock(self.zarr_path, wait=wait), writing(self.directory, "the feature store"):
            key_file = self.directory / "key.json"
            if not key_file.is_file():
                key_file.write_text(json.dumps({"model": self.model_key, "slide": self.slide_key}, indent=1,
                                               default=str), encoding="utf-8")
            arrays = self._open(create=True)
            flags = self.done()
            recorded = self.width is not None and self._same_basis()
            todo = self.geometry.nearest_first([w for w in dict.fromkeys(todo) if not flags[w]], box)
            total = len(todo)
            t = self.geometry.tokens
            was_training = self.model.training
            self.model.eval()
            try:
                step = max(1, int(batch_size))
                # the basis is fitted on the first batch: give it enough tokens to stand for the slide
                first = max(step, BASIS_WINDOWS) if self.width is not None and self.basis() is None else step
                starts = [0, *range(first, total, step)] if total else []
                for start in starts:
                    if (should_stop is not None and should_stop()) or (abandon is not None and abandon()):
                        break
                    began = time.perf_counter()
                    part = todo[start:start + (first if start == 0 else step)]
                    try:
                        grids = self.compute(np.stack([self.window_image(w) for w in part]), device, abandon)
                    except _Abandoned:
                        break
                    if self.width is not None and not recorded:  # what the stored windows were projected with
                        basis = self.basis()
                        assert basis is not None
                        (self.directory / "basis.sha256").write_text(basis.digest(), encoding="utf-8")
                        recorded = True
                    for block, grid in zip(self.blocks, grids, strict=True):
                        values = grid.cpu().numpy().astype(self.dtype, copy=False)
                        for (row, col), value in zip(part, values, strict=True):
                            arrays[block][:, row * t:(row + 1) * t, col * t:(col + 1) * t] = value
                    for window in part:
                        flags[window] = True
                    _save_flags(self.flags_path, flags)
                    done += len(part)
                    yield FillProgress(done, total, tuple(part), time.perf_counter() - began)
            finally:
                self.model.train(was_training)
        return done

    # --- serving ----------------------------------------------------------------------------------
    def read(self, windows: Sequence[Window]) -> list[torch.Tensor]:
        """Stored features of ``windows``: one (N, C, t, t) float32 tensor per consumed block.

        A window that is not stored is an error naming it (fill first).
        """
        windows = list(windows)
        flags = self.done()
        absent = [w for w in windows if not flags[w]]
        if absent:
            raise StorageError(f"Window(s) {absent[:4]} of '{self.directory}' are not stored yet; fill them first.")
        arrays = self._open(create=False)
        t = self.geometry.tokens
        out = []
        for block in self.blocks:
            stack = np.stack([np.asarray(arrays[block][:, r * t:(r + 1) * t, c * t:(c + 1) * t]) for r, c in windows])
            out.append(torch.from_numpy(stack.astype(np.float32)))
        return out

    # --- size -------------------------------------------------------------------------------------
    def disk_bytes(self) -> int:
        """Bytes the stored features take on disk."""
        return sum(p.stat().st_size for p in self.zarr_path.rglob("*") if p.is_file()) if self.zarr_path.exists() else 0

    def bytes_per_mm2(self) -> float | None:
        """Disk bytes per mm² of stored area (the windows filled so far); None before any is filled."""
        count = int(self.done().sum())
        if not count:
            return None
        side_mm = self.geometry.window * self.geometry.mpp / 1000.0
        return self.disk_bytes() / (count * side_mm * side_mm)

    def raw_bytes_per_mm2(self) -> float:
        """Uncompressed bytes per mm² at this resolution: tokens per mm² x channels x blocks x dtype size."""
        tokens_per_mm = 1000.0 / (self.geometry.mpp * self.geometry.patch)
        return tokens_per_mm ** 2 * self.channels * len(self.blocks) * np.dtype(self.dtype).itemsize

    def summary(self) -> dict[str, Any]:
        """What the store holds, for people and benchmarks (JSON-ready)."""
        flags = self.done()
        per_mm2 = self.bytes_per_mm2()
        return {"directory": str(self.directory), "windows_stored": int(flags.sum()),
                "windows_total": int(flags.size), "window": self.geometry.window, "mpp": self.geometry.mpp,
                "blocks": list(self.blocks), "channels": self.channels, "width": self.width, "dtype": self.dtype,
                "disk_bytes": self.disk_bytes(), "bytes_per_mm2": per_mm2,
                "raw_bytes_per_mm2": self.raw_bytes_per_mm2()}


def _safe(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:60]
    return cleaned or "slide"


__all__ = ["DTYPES", "FillProgress", "SlideFeatureStore", "SlideWindows", "StoreGeometry", "Window", "consumed_blocks",
           "default_store_root", "store_refusal", "vit_backbone"]
