"""The plan of a whole-slide run, made before any model is touched: :func:`plan_slide` -> :class:`SlidePlan`.

A plan holds everything a run decides from the slide, the model's description (:class:`ModelInfo`, not
the model) and the settings (:class:`SlideInferenceConfig`): the resolution plan, window and stride,
the output's shape, origin on the slide and pyramid, the chunk grid with each chunk's windows (after
tissue detection) and the order chunks are finished in, and the output's name and paths. The CLI
prints it, the cluster path and the napari plugin read their geometry from it, and the executor
(:func:`pfmseg_engine.inference.slide.execute_plan`) runs it with a model on a device.

This module never imports torch: a viewer can plan (and show where the output will go) without
loading a model. Geometry is computed at once; tissue detection and the chunk plans (which read a
thumbnail of the slide) only when first asked for.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..labelstore.pyramid import pyramid_shapes
from ..slides import Slide, TissueMask, detect_tissue, plan_resolution
from ..slides.readers import ArrayReader, OffsetReader, PILReader
from ..slides.resolution import DEFAULT_TOLERANCE, ResampledReader, ResolutionPlan
from ..training_scale import warn_training_scale
from .grid import ChunkPlan, WindowGrid, raster_order
from .modelinfo import ModelInfo
from .schedule import output_region, priority_order
from .window import BLEND_MODES, check_window, stride_for

DEFAULT_WINDOW = 512
SUFFIX = ".ome.zarr"
WORK = ".pfmseg_work"
FORMAT_VERSION = 4  # 3: the slide is identified by content, not by path; 4: glass inside windows is unlabelled
#: Settings that change how fast a run goes, never what it writes: left out of the fingerprint.
RUNTIME_ONLY = ("batch_size", "prefetch", "read_workers")
#: Settings that are real numbers, stored as floats whatever number type they were given as.
FLOAT_FIELDS = ("target_mpp", "overlap", "tissue_halo_um", "mpp_tolerance")
#: Labels are uint8 with 0 = no prediction.
MAX_CLASSES = 254
#: Level readers that hold their pixels in memory: nothing to gain from caching decoded tiles.
IN_MEMORY = (ArrayReader, PILReader)


@dataclass(frozen=True)
class SlideInferenceConfig:
    """Settings of one whole-slide run (all but ``RUNTIME_ONLY`` shape the output and are fingerprinted).

    ``target_mpp``: output resolution (default: the model's training mpp, else slide level 0).
    ``window``: window side in pixels (default: the model's input size, else 512); a multiple of the
    model's patch size. ``overlap``: fraction of the window neighbours share; the stride is
    ``int(window * (1 - overlap))`` (at least 1), as in MONAI's ``sliding_window_inference``, so a run
    computes the same windows MONAI would. ``chunk``: output chunk side (raised to the window).
    ``tissue_halo_um``: tissue-mask dilation in micrometres (default: the window overlap, window - stride
    pixels). ``tissue_roi``: your own tissue mask or region of interest (a QuPath GeoJSON, a label
    store, a mask image: see :func:`~pfmseg_engine.slides.detect_tissue`), used instead of the
    detection (``tissue_roi_mode="replace"``) or to limit it (``"intersect"``); needs ``tissue``.
    ``clip_to_tissue``: label only output pixels on tissue (0 on the glass inside windows that touch
    tissue; see :meth:`SlidePlan.tissue_inside`); no effect without ``tissue``.
    ``pyramid``: label downsampling, "mode" (2x2 majority) or "nearest".
    Runtime only: ``batch_size`` (windows per model call; batches span chunks), ``prefetch`` (chunks
    read ahead; default: the read workers + 1, at least 2), ``read_workers`` (reader threads; default:
    the CPU cores this process may use).
    """

    target_mpp: float | None = None
    window: int | None = None
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 8
    chunk: int = 1024
    tissue: bool = True
    tissue_halo_um: float | None = None
    tissue_roi: str | None = None
    tissue_roi_mode: str = "replace"
    clip_to_tissue: bool = True
    probabilities: bool = False
    ngff: str = "0.4"
    pyramid: str = "mode"
    mpp_tolerance: float = DEFAULT_TOLERANCE
    prefetch: int | None = None
    read_workers: int | None = None

    def __post_init__(self) -> None:
        # 4 from Python and 4.0 from a command line are one setting: recorded alike, the outputs are
        # byte-identical whichever front end wrote them
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool | float):
                object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def inference_config(self) -> SlideInferenceConfig:
        """Just these settings (a subclass's extra fields dropped): what a plan records and fingerprints."""
        if type(self) is SlideInferenceConfig:
            return self
        return SlideInferenceConfig(**{name: getattr(self, name) for name in SlideInferenceConfig.__dataclass_fields__})


@dataclass(frozen=True, eq=False)
class SlidePlan:
    """Everything a whole-slide run decides before it runs (see :func:`plan_slide`).

    Coordinates: output pixels are the pixels of the prediction (level 0 of the OME-Zarr output);
    ``out_origin`` is where the output's pixel (0, 0) lies in the whole slide's output grid (non-zero
    for a region) and ``origin`` the same point in slide level-0 pixels (``out_origin * downsample``).
    ``priority_box`` is (y0, y1, x0, x1) in output pixels; its chunks are finished first.
    """

    slide: Slide
    model: ModelInfo
    config: SlideInferenceConfig
    resolution: ResolutionPlan
    window: int
    stride: int
    chunk: int
    shape: tuple[int, int]
    out_origin: tuple[int, int]
    name: str
    output_dir: Path | None = None
    priority_box: tuple[float, float, float, float] | None = None
    is_region: bool = False

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def downsample(self) -> float:
        """Slide level-0 pixels per output pixel."""
        return self.resolution.downsample

    @property
    def mpp(self) -> float:
        return self.resolution.mpp

    @property
    def origin(self) -> tuple[float, float]:
        """(y, x) slide level-0 pixel where the output's pixel (0, 0) starts."""
        ds = self.downsample
        return (self.out_origin[0] * ds, self.out_origin[1] * ds)

    @property
    def region(self) -> dict[str, float] | None:
        """The predicted region in level-0 pixels (grown to whole output pixels), None for the whole slide."""
        if not self.is_region:
            return None
        ds, (oy, ox) = self.downsample, self.origin
        return {"x": ox, "y": oy, "width": self.shape[1] * ds, "height": self.shape[0] * ds}

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.model.class_names

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def overlap_px(self) -> int:
        return self.window - self.stride

    @cached_property
    def pyramid_shapes(self) -> list[tuple[int, int]]:
        """(H, W) of every level of the output pyramid, level 0 first."""
        return pyramid_shapes(self.shape, self.chunk)

    @cached_property
    def grid(self) -> WindowGrid:
        return WindowGrid(self.shape, self.window, self.stride, self.chunk)

    def source(self, cache: bool = True) -> Any:
        """An (H, W, 3) array-like of the output region at the planned resolution (reads lazily).

        With ``cache``, a slide read from a file is read through a :class:`~.tilecache.TileCache` of
        its native tiles, so pixels that neighbouring chunks share are decoded once.
        """
        r, slide = self.resolution, self.slide
        reader = slide.readers[r.level]
        if cache and not isinstance(reader, IN_MEMORY):
            from .tilecache import TileCache

            chunks = slide.levels[r.level].chunks
            reader = TileCache(reader, (chunks[0][0], chunks[1][0]))
        source = reader if r.factor == 1 else ResampledReader(reader, r.factor, r.shape)
        if not self.is_region:
            return source
        return OffsetReader(source, self.out_origin[0], self.out_origin[1], *self.shape)

    # ---- names and paths ---------------------------------------------------------------------
    @property
    def final(self) -> Path:
        return self._folder() / f"{self.name}{SUFFIX}"

    @property
    def partial(self) -> Path:
        return self._folder() / f"{self.name}{SUFFIX}.partial"

    @property
    def qc_path(self) -> Path | None:
        """The tissue QC PNG (None when tissue detection is off)."""
        return self._folder() / f"{self.name}_tissue.png" if self.config.tissue else None

    def _folder(self) -> Path:
        if self.output_dir is None:
            raise ConfigError("This slide plan has no output folder; plan it with output_dir=... to run it.")
        return self.output_dir

    # ---- tissue and chunks (computed on first use: detection reads a thumbnail) -------------------
    @cached_property
    def tissue(self) -> TissueMask | None:
        if not self.config.tissue:
            return None
        halo = self.config.tissue_halo_um
        halo = self.overlap_px * self.mpp if halo is None else halo
        return detect_tissue(self.slide, halo_um=halo, roi=self.config.tissue_roi, roi_mode=self.config.tissue_roi_mode)

    @cached_property
    def chunks(self) -> dict[tuple[int, int], ChunkPlan]:
        """Every chunk's plan (its own windows, the neighbours spilling into it), by (row, column)."""
        keep = None
        if self.tissue is not None:
            tissue, ds, (oy, ox) = self.tissue, self.downsample, self.origin
            keep = lambda b: tissue.any_in(b[0] * ds + oy, b[1] * ds + oy,  # noqa: E731
                                           b[2] * ds + ox, b[3] * ds + ox)
        return self.grid.plan(keep)

    @cached_property
    def order(self) -> list[ChunkPlan]:
        """Chunks that are written (they hold windows or receive spills), raster order."""
        return list(raster_order(self.chunks))

    @cached_property
    def finish_order(self) -> list[ChunkPlan]:
        """The order chunks are finished in: ``priority_box`` first, then nearest first (else raster)."""
        return priority_order(self.order, self.priority_box)

    @property
    def chunks_total(self) -> int:
        return len(self.order)

    @property
    def windows_total(self) -> int:
        return sum(len(plan.windows) for plan in self.order)

    def tissue_area_mm2(self) -> float | None:
        """Tissue area (before the halo) inside the planned area, in mm² (None without tissue detection or
        a slide µm/px)."""
        tissue, slide_mpp = self.tissue, self.slide.mpp
        if tissue is None or not slide_mpp:
            return None
        d = tissue.downsample
        mask = tissue.tissue
        if self.is_region:
            (oy, ox), ds = self.origin, self.downsample
            r0, c0 = max(0, int(oy // d)), max(0, int(ox // d))
            r1 = min(mask.shape[0], int(-(-(oy + self.shape[0] * ds) // d)))
            c1 = min(mask.shape[1], int(-(-(ox + self.shape[1] * ds) // d)))
            mask = mask[r0:r1, c0:c1]
        pixel_mm = d * slide_mpp / 1000.0
        return float(mask.sum()) * pixel_mm * pixel_mm

    @cached_property
    def _clip_mask(self) -> np.ndarray:
        from scipy.ndimage import binary_dilation

        assert self.tissue is not None
        return binary_dilation(self.tissue.tissue, np.ones((3, 3), bool)).astype(np.float32)

    def tissue_inside(self, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """Which output pixels of ``box`` (y0, y1, x0, x1) lie on tissue: those within one tissue-mask pixel
        (8 µm) of detected tissue (before the halo), from a bilinear sample of that mask grown by one pixel,
        kept where it is at least one half. None when every pixel is kept (``clip_to_tissue`` off, or no
        tissue detection).

        Windows that touch tissue are predicted whole, so without this the glass inside them gets a class,
        guessed from the window's border: a band of one class along every tissue edge that the measurements
        would count. The one-pixel margin keeps the tissue that the coarse mask's rounded corners and edges
        cut off.
        """
        tissue = self.tissue
        if tissue is None or not self.config.clip_to_tissue:
            return None
        y0, y1, x0, x1 = box
        (oy, ox), ds, d = self.origin, self.downsample, tissue.downsample
        rows = _bilinear_weights((oy + (np.arange(y0, y1) + 0.5) * ds) / d - 0.5, tissue.tissue.shape[0])
        cols = _bilinear_weights((ox + (np.arange(x0, x1) + 0.5) * ds) / d - 0.5, tissue.tissue.shape[1])
        (r_lo, r_hi, r_w), (c_lo, c_hi, c_w) = rows, cols
        mask = self._clip_mask
        by_row = mask[r_lo] * (1 - r_w)[:, None] + mask[r_hi] * r_w[:, None]
        sampled = by_row[:, c_lo] * (1 - c_w)[None, :] + by_row[:, c_hi] * c_w[None, :]
        return np.asarray(sampled >= 0.5)

    # ---- identity, metadata, summary ------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What makes two runs write the same output, model aside (the executor adds its fingerprint)."""
        tissue = hashlib.sha1(np.packbits(self.tissue.mask).tobytes()).hexdigest() if self.tissue else None
        config = {k: v for k, v in self.config.to_dict().items() if k not in RUNTIME_ONLY}
        return json.loads(json.dumps({
            "format": FORMAT_VERSION, "slide": self.slide.content_identity(), "plan": self.resolution.to_dict(),
            "region": self.region, "window": self.window, "stride": self.stride, "chunk": self.chunk,
            "config": config, "tissue": tissue, "classes": list(self.class_names)}))

    def fingerprint(self, model_fingerprint: str) -> dict[str, Any]:
        """The run's identity as recorded in the output (the key order is part of the format: outputs of the
        same run compare equal byte for byte)."""
        identity = self.identity()
        classes = identity.pop("classes")
        return {**identity, "model": model_fingerprint, "classes": classes}

    def metadata(self, fingerprint: dict[str, Any], class_colors: Any = None) -> dict[str, Any]:
        """What the OME-Zarr root records under "pfmseg" (deterministic: no timestamps)."""
        from .. import __version__
        from ..colors import class_palette

        slide = self.slide
        return {
            "version": __version__,
            "class_names": list(self.class_names),
            "label_values": {"0": "no prediction (outside tissue)", "k": "class k-1"},
            "slide": {"name": slide.name, "path": str(slide.path) if slide.path else None, "mpp": slide.mpp,
                      "dimensions": list(slide.dimensions), "bounds_offset": list(slide.bounds_offset)},
            "resolution_plan": self.resolution.to_dict(),
            "window": self.window, "stride": self.stride, "overlap": self.config.overlap,
            "blend": self.config.blend, "chunk": self.chunk,
            "tissue": None if self.tissue is None else {
                "fraction": round(self.tissue.fraction, 6), "mpp": self.tissue.mpp,
                "threshold": round(self.tissue.threshold, 6)},
            "probabilities": self.config.probabilities,
            "region": self.region,
            "region_offset": list(self.origin),
            "class_colors": class_palette(len(self.class_names), class_colors, self.class_names).tolist(),
            "fingerprint": fingerprint,
        }

    def summary(self) -> str:
        """One line for people: size, resolution, window grid, work and where the output goes."""
        r = self.resolution
        level = f"level {r.level}" + (f" / {r.factor:g}" if r.factor != 1 else "")
        tissue = "" if self.tissue is None else f", tissue {self.tissue.fraction:.0%}"
        where = f" -> {self.final}" if self.output_dir is not None else ""
        return (f"{self.name}: {self.shape[1]}x{self.shape[0]} px at {self.mpp:.4g} um/px ({level}), "
                f"window {self.window} stride {self.stride}, {self.windows_total} windows in "
                f"{self.chunks_total} chunks of {self.chunk}{tissue}{where}")

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (JSON-ready; tissue and chunk plans summarised)."""
        return json.loads(json.dumps({
            "slide": self.slide.name, "name": self.name, "model": self.model.to_dict(),
            "config": self.config.to_dict(), "resolution_plan": self.resolution.to_dict(),
            "window": self.window, "stride": self.stride, "chunk": self.chunk, "shape": list(self.shape),
            "out_origin": list(self.out_origin), "origin": list(self.origin), "downsample": self.downsample,
            "region": self.region, "priority_box": self.priority_box,
            "pyramid_shapes": [list(s) for s in self.pyramid_shapes],
            "final": str(self.final) if self.output_dir is not None else None,
            "partial": str(self.partial) if self.output_dir is not None else None,
            "qc_path": str(self.qc_path) if self.output_dir is not None and self.qc_path else None,
            "tissue_fraction": None if self.tissue is None else self.tissue.fraction,
            "chunks_total": self.chunks_total, "windows_total": self.windows_total,
            "finish_order": [list(p.index) for p in self.finish_order]}))


class MagnificationWarning(UserWarning):
    """A slide is predicted at a resolution nobody chose (the model records none, no target was given)."""


def _bilinear_weights(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights for linear interpolation at ``coords`` (pixel-centre units), clamped
    to the edge pixels."""
    coords = np.clip(coords, 0.0, size - 1.0)
    low = np.floor(coords).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, (coords - low).astype(np.float32)


def plan_slide(
    slide: Slide,
    model_info: ModelInfo | Any,
    config: SlideInferenceConfig | None = None,
    region: tuple[float, float, float, float] | None = None,
    priority_box: tuple[float, float, float, float] | None = None,
    output_dir: str | Path | None = None,
    name: str | None = None,
) -> SlidePlan:
    """Plan predicting ``slide`` with a model described by ``model_info`` (or a model itself: only its
    attributes are read; it is not moved or run).

    ``region`` = (x, y, width, height) in slide level-0 pixels predicts only that part (grown to whole
    output pixels); ``priority_box`` (same units) is finished first. ``name`` defaults to the slide's
    name (plus the region's position and size); paths need ``output_dir``.
    """
    config = config.inference_config() if config is not None else SlideInferenceConfig()
    info = model_info if isinstance(model_info, ModelInfo) else ModelInfo.from_model(model_info)
    if info.num_classes > MAX_CLASSES:
        raise ConfigError(f"{info.num_classes} classes do not fit uint8 labels (at most {MAX_CLASSES}).")
    if config.tissue_roi is not None and not config.tissue:
        raise ConfigError("A tissue ROI limits where tissue is; it needs tissue detection on (tissue=True).")
    if config.blend not in BLEND_MODES:
        raise ConfigError(f"Unknown blend mode '{config.blend}'; choose one of {', '.join(BLEND_MODES)}.")
    if config.target_mpp is None and info.mpp is None:
        # magnification is what pathology models are most sensitive to: say that it was not chosen
        warnings.warn(
            f"The model records no training resolution (mpp) and no target_mpp was given, so '{slide.name}' is "
            f"predicted at its level 0 ({slide.mpp or 'unknown'} µm/px). If the model was trained at another "
            "magnification, set the resolution to predict at (target_mpp) to it, or "
            "record it when training (model.mpp).", MagnificationWarning, stacklevel=2)
    resolution = plan_resolution(slide, config.target_mpp or info.mpp, config.mpp_tolerance)
    warn_training_scale(info.training_scale, resolution.mpp)  # a TrainingScaleWarning when they differ > 25 %
    window = check_window(config.window or info.input_size or DEFAULT_WINDOW, info.patch_size)
    stride = stride_for(window, config.overlap)
    ds = resolution.downsample
    oy0, oy1, ox0, ox1 = (output_region(region, ds, resolution.shape) if region is not None
                          else (0, resolution.shape[0], 0, resolution.shape[1]))
    shape = (oy1 - oy0, ox1 - ox0)
    if name is None:
        name = slide.name if region is None else (
            f"{slide.name}_x{round(ox0 * ds)}_y{round(oy0 * ds)}_{round(shape[1] * ds)}x{round(shape[0] * ds)}")
    box: tuple[float, float, float, float] | None = None
    if priority_box is not None:
        px, py, pw, ph = (float(v) for v in priority_box)
        oy, ox = oy0 * ds, ox0 * ds
        box = ((py - oy) / ds, (py + ph - oy) / ds, (px - ox) / ds, (px + pw - ox) / ds)
    return SlidePlan(slide=slide, model=info, config=config, resolution=resolution, window=window, stride=stride,
                     chunk=max(int(config.chunk), window), shape=shape, out_origin=(oy0, ox0), name=name,
                     output_dir=Path(output_dir).expanduser() if output_dir is not None else None,
                     priority_box=box, is_region=region is not None)


__all__ = ["DEFAULT_WINDOW", "FORMAT_VERSION", "MAX_CLASSES", "RUNTIME_ONLY", "SUFFIX", "WORK", "ModelInfo",
           "SlideInferenceConfig", "SlidePlan", "plan_slide"]
