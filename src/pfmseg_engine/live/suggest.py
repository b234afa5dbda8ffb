"""Where to annotate next: regions the model is unsure about that also differ from what is labelled.

Each candidate window (tissue windows at the model's resolution) gets an **uncertainty**, the mean
per-pixel uncertainty of the head's prediction (normalised entropy or 1 - margin; with a ``box``
smaller than the window, the most uncertain box-sized square inside it), and a **descriptor**, the
unit-length mean of its last token grid. Regions are then chosen by a k-center greedy walk weighted
by uncertainty: each pick maximises ``uncertainty x distance to the nearest labelled or already
picked window`` in feature space, so K suggestions cover K different kinds of tissue the model
finds hard instead of K neighbours of one hard spot. Without labels the first pick is the most
uncertain window.

Features come from a :class:`~pfmseg_engine.live.store.SlideFeatureStore` when the model's head can
be served from one (frozen backbone, no CNN adapter), else the model runs on each window.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError
from .head import descriptor, labels_and_uncertainty
from .store import SlideWindows, Window

if TYPE_CHECKING:
    from ..model import SegmentationModel
    from ..slides import Slide
    from .store import FillProgress, SlideFeatureStore

#: QuPath class of suggested regions, and its colour.
SUGGESTION_CLASS = "Suggestion"
SUGGESTION_COLOUR = (255, 200, 0)


@dataclass(frozen=True)
class SuggestedRegion:
    """One suggested region: ``rank`` 1 is the best; ``x, y, width, height`` in slide level-0 pixels;
    ``box`` = (y0, y1, x0, x1) in model pixels; ``window`` the store window it lies in."""

    rank: int
    x: float
    y: float
    width: float
    height: float
    box: tuple[int, int, int, int]
    window: Window
    uncertainty: float
    distance: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["box"], data["window"] = list(self.box), list(self.window)
        return data


@dataclass
class WindowScores:
    """Per candidate window: mean uncertainty, the most uncertain box inside it (model px), descriptor."""

    windows: list[Window]
    uncertainty: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    descriptors: np.ndarray


def best_box(uncertainty: np.ndarray, size: int, step: int) -> tuple[int, int, float]:
    """(y, x, mean) of the ``size`` square (on a ``step`` grid) with the highest mean of a 2-D map."""
    h, w = uncertainty.shape
    size = min(size, h, w)
    table = np.zeros((h + 1, w + 1))
    table[1:, 1:] = uncertainty.cumsum(0).cumsum(1)
    best = (0, 0, -1.0)
    for y in range(0, h - size + 1, step):
        for x in range(0, w - size + 1, step):
            total = table[y + size, x + size] - table[y, x + size] - table[y + size, x] + table[y, x]
            if total > best[2]:
                best = (y, x, float(total))
    return best[0], best[1], best[2] / (size * size)


def score_windows(model: SegmentationModel, windows: SlideWindows, candidates: Sequence[Window], *,
                  store: SlideFeatureStore | None = None, box: int | None = None, kind: str = "entropy",
                  batch_size: int = 4, device: Any = "cpu", head: torch.nn.Module | None = None,
                  progress: Callable[[int, int], Any] | None = None) -> WindowScores:
    """Uncertainty, best box and descriptor of each candidate (from ``store`` when given, else the model).

    ``head`` reads the store's grids (default: the model's; a reduced-width store needs the head trained on it).
    """
    g = windows.geometry
    size = g.window if box is None else max(g.patch, min(int(box), g.window))
    device = torch.device(device)
    was_training = model.training
    model.eval()
    head = head if head is not None else model.head
    head_was_training = head.training
    head.eval()
    scores, boxes, descriptors = [], [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(candidates), max(1, batch_size)):
                part = list(candidates[start:start + batch_size])
                if store is not None:
                    # channels-last: the head's convolutions run about twice as fast on the CPU
                    grids = [t.to(device).contiguous(memory_format=torch.channels_last) for t in store.read(part)]
                    logits = head(grids, [], out_size=(g.window, g.window))
                else:
                    x = torch.from_numpy(np.stack([windows.image(w) for w in part])).to(device)
                    x = x.permute(0, 3, 1, 2).float() / 255.0
                    features = model.encoder(model.encoder.backbone.pad_to_patch_multiple(
                        (x - model.mean.to(device)) / model.std.to(device)))
                    grids = features.grids
                    logits = model.head(grids, features.skips, out_size=(g.window, g.window))
                maps = labels_and_uncertainty(logits, kind)[1].cpu().numpy()
                descriptors.append(descriptor(grids).cpu().numpy())
                for window, umap in zip(part, maps, strict=True):
                    vh, vw = windows.valid(window)
                    by, bx, mean = best_box(umap[:vh, :vw], size, g.patch)
                    y0, x0 = window[0] * g.window + by, window[1] * g.window + bx
                    boxes.append((y0, y0 + min(size, vh), x0, x0 + min(size, vw)))
                    scores.append(mean)
                if progress is not None:
                    progress(start + len(part), len(candidates))
    finally:
        model.train(was_training)
        head.train(head_was_training)
    dim = descriptors[0].shape[1] if descriptors else 1
    return WindowScores(list(candidates), np.asarray(scores, np.float64), boxes,
                        np.concatenate(descriptors) if descriptors else np.zeros((0, dim), np.float32))


def k_center_greedy(uncertainty: np.ndarray, descriptors: np.ndarray, k: int,
                    labelled: np.ndarray | None = None) -> list[tuple[int, float, float]]:
    """Pick ``k`` rows maximising ``uncertainty x distance`` to the nearest labelled or picked row.

    Returns (index, distance, score) per pick, in pick order. Without ``labelled`` rows every distance
    starts at 1, so the first pick is the most uncertain row.
    """
    n = len(uncertainty)
    if n == 0 or k <= 0:
        return []
    if labelled is not None and len(labelled):
        nearest = np.min(np.linalg.norm(descriptors[:, None, :] - labelled[None, :, :], axis=2), axis=1)
    else:
        nearest = np.ones(n)
    picked: list[tuple[int, float, float]] = []
    taken = np.zeros(n, bool)
    for _ in range(min(k, n)):
        score = np.where(taken, -np.inf, uncertainty * nearest)
        index = int(np.argmax(score))
        picked.append((index, float(nearest[index]), float(score[index])))
        taken[index] = True
        nearest = np.minimum(nearest, np.linalg.norm(descriptors - descriptors[index], axis=1))
    return picked


def rank_regions(scores: WindowScores, windows: SlideWindows, k: int,
                 labelled: Iterable[Window] = ()) -> list[SuggestedRegion]:
    """The ``k`` suggestions of scored candidates (labelled windows steer diversity and are never picked)."""
    labelled = set(labelled)
    index_of = {w: i for i, w in enumerate(scores.windows)}
    own = [index_of[w] for w in labelled if w in index_of]
    free = [i for i, w in enumerate(scores.windows) if w not in labelled]
    if not free:
        return []
    reference = scores.descriptors[own] if own else None
    picks = k_center_greedy(scores.uncertainty[free], scores.descriptors[free], k, reference)
    d = windows.geometry.downsample
    regions = []
    for rank, (position, distance, score) in enumerate(picks, start=1):
        i = free[position]
        y0, y1, x0, x1 = scores.boxes[i]
        regions.append(SuggestedRegion(rank=rank, x=x0 * d, y=y0 * d, width=(x1 - x0) * d, height=(y1 - y0) * d,
                                       box=(y0, y1, x0, x1), window=scores.windows[i],
                                       uncertainty=float(scores.uncertainty[i]), distance=distance, score=score))
    return regions


def suggest_regions(model: SegmentationModel, slide: Slide, *, k: int = 8, box: int | None = None,
                    mpp: float | None = None, window: int | None = None, tissue: Any = True,
                    store_root: str | Path | None = None, use_store: bool = True, dtype: str = "float16",
                    width: int | None = None,
                    labelled: Iterable[Window] = (), annotations: str | Path | None = None,
                    uncertainty: str = "entropy", batch_size: int = 4,
                    device: Any = "cpu", region: Sequence[float] | None = None,
                    on_fill: Callable[[FillProgress], Any] | None = None,
                    progress: Callable[[int, int], Any] | None = None) -> list[SuggestedRegion]:
    """Propose ``k`` regions of ``slide`` to annotate next with ``model`` (see the module docstring).

    ``box``: side of a suggested square in model pixels (default: the window); ``mpp``/``window``: the
    model's resolution and window (defaults: the model's training mpp, else level 0, and its input
    size); ``width``: read a reduced-width store (the model's head seen through its basis, so the scores
    are the model's own up to the discarded components; default: the full width). With ``use_store``
    and a model the store can serve, the slide's features are filled into (or read from) the store at
    ``store_root`` first; ``on_fill`` sees each stored batch. ``region``
    = (x, y, width, height) level-0 pixels limits the candidates. ``labelled`` windows, and those the
    areas of the QuPath GeoJSON ``annotations`` touch, are not proposed and push suggestions away from
    what is labelled.
    """
    from .store import SlideFeatureStore, store_refusal

    if k < 1:
        raise ConfigError(f"The number of suggested regions must be at least 1, got {k}.")
    config = model.config
    size = int(window or config.input_size)
    store = None
    if use_store and store_refusal(model) is None:
        store = SlideFeatureStore(model, slide, root=store_root, mpp=mpp, window=size, dtype=dtype, tissue=tissue,
                                  width=width)
        windows = store.windows
    else:
        windows = SlideWindows.plan(slide, patch=model.patch_size, window=size, mpp=mpp or config.mpp, tissue=tissue)
    candidates = windows.tissue_windows(region)
    labelled = list(labelled)
    if annotations is not None:
        labelled += annotated_windows(annotations, windows)
        candidates = list(dict.fromkeys([*candidates, *labelled]))  # their features steer the diversity
    if store is not None:
        store.fill(region, windows=candidates, device=device, batch_size=batch_size, progress=on_fill)
    head = None
    if store is not None and store.width is not None:
        from .basis import reduced_head

        basis = store.basis()
        head = reduced_head(model, basis) if basis is not None else None
    scores = score_windows(model, windows, candidates, store=store, box=box, kind=uncertainty,
                           batch_size=batch_size, device=device, head=head, progress=progress)
    return rank_regions(scores, windows, k, labelled)


def annotated_windows(annotations: str | Path, windows: SlideWindows, *, frame: str = "qupath") -> list[Window]:
    """Windows touched by the areas of a QuPath GeoJSON (what is labelled already: never suggested, and
    suggestions move away from it in feature space); unclassified areas count too."""
    import shapely

    from ..annotations import read_geojson

    slide = windows.slide
    found = read_geojson(annotations, frame=frame, bounds_offset=slide.bounds_offset, keep_unclassified=True)
    g = windows.geometry
    touched: dict[Window, None] = {}
    for feature in found.features:
        x0, y0, x1, y1 = feature.geometry.bounds
        for window in g.windows_in((x0, y0, x1 - x0, y1 - y0)):
            x, y, w, h = g.level0_box(window)
            cell = shapely.box(x, y, x + w, y + h)
            if feature.geometry.intersects(cell) and not feature.geometry.touches(cell):  # an edge is no overlap
                touched[window] = None
    return list(touched)


def suggestions_to_features(regions: Sequence[SuggestedRegion], *, offset: Sequence[float] = (0.0, 0.0),
                            mpp: float | None = None) -> list[dict[str, Any]]:
    """QuPath GeoJSON annotations of suggested regions (class "Suggestion", named by rank, with their scores
    as measurements); ``offset`` (x, y) is added to every coordinate (a slide's bounds offset for the file frame)."""
    ox, oy = float(offset[0]), float(offset[1])
    features = []
    for region in regions:
        x0, y0 = region.x + ox, region.y + oy
        x1, y1 = x0 + region.width, y0 + region.height
        ring = [[round(x0, 2), round(y0, 2)], [round(x1, 2), round(y0, 2)], [round(x1, 2), round(y1, 2)],
                [round(x0, 2), round(y1, 2)], [round(x0, 2), round(y0, 2)]]
        measurements = {"rank": float(region.rank), "uncertainty": round(region.uncertainty, 6),
                        "diversity": round(region.distance, 6), "score": round(region.score, 6)}
        if mpp:
            measurements["area µm^2"] = round(region.width * region.height * mpp * mpp, 4)
        features.append({
            "type": "Feature",
            "id": f"pfmseg-suggestion-{region.rank}-{int(x0)}-{int(y0)}",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "name": f"Suggestion {region.rank}", "isLocked": False,
                           "classification": {"name": SUGGESTION_CLASS, "color": list(SUGGESTION_COLOUR)},
                           "measurements": measurements},
        })
    return features


def write_suggestions(regions: Sequence[SuggestedRegion], path: str | Path, *, slide: Slide | None = None,
                      frame: str = "qupath") -> Path:
    """Write suggestions as a QuPath GeoJSON FeatureCollection (atomically); ``frame`` "file" adds the
    slide's bounds offset, as the engine's other exports do."""
    from ..annotations.export import write_geojson

    if frame not in ("qupath", "file"):
        raise ConfigError(f"GeoJSON frame '{frame}' is not one of qupath, file.")
    offset = slide.bounds_offset if slide is not None and frame == "file" else (0, 0)
    features = suggestions_to_features(regions, offset=offset, mpp=slide.mpp if slide is not None else None)
    return write_geojson(features, path, what="the suggested regions")


def suggestions_json(regions: Sequence[SuggestedRegion]) -> str:
    """The suggestions as JSON text (one object per region, best first)."""
    return json.dumps([r.to_dict() for r in regions], indent=1)


__all__ = ["SUGGESTION_CLASS", "SuggestedRegion", "WindowScores", "annotated_windows", "best_box", "k_center_greedy",
           "rank_regions", "score_windows", "suggest_regions", "suggestions_json", "suggestions_to_features",
           "write_suggestions"]
