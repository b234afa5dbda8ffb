"""Training from whole slides and their annotations (QuPath GeoJSON or label stores saved from napari).

:func:`build_slide_trainer` opens each slide, reads its annotations (checked against the slide: see
:mod:`pfmseg_engine.annotations`), builds one class table for all of them, and hands the engine's sparse
patch sampler a lazy view of every slide at the training resolution: the image through the slide's
resolution plan (:class:`~pfmseg_engine.slides.ResolutionPlan`), the labels rasterised from the polygons
box by box (:class:`~pfmseg_engine.annotations.PolygonLabels`). Nothing whole-slide is ever held in
memory. Patches are drawn around annotated pixels of all slides at once (class-balanced), unannotated
pixels and the classes the import options leave out (``Region*``) are never trained on.

Validation holds out a share of the annotated regions: squares of twice the training window that hold
annotations (found from the geometry, per slide) are set aside, read once into memory (at most
``max_validation_regions`` of them) and scored at native resolution every epoch; the training labels
read 0 there. Checkpoints, history and resume are the ordinary :class:`~.trainer.Trainer`'s; the
checkpoint records the classes (names and colours from the annotations) and the training resolution,
so inference runs at the same µm/px; its ``training_scale`` (µm per model pixel) is that resolution times
the zoom jitter's median shrink (1 for the default zoom), which the trainer records from ``model.mpp``.

The training resolution is ``train_mpp``, else the config's ``model.mpp`` (a model being continued), else
the backbone's pretraining resolution when its spec records one, else :data:`DEFAULT_TRAIN_MPP`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sparse import SparsePatchDataset
from ..errors import ConfigError, DataError
from .callbacks import Callback, CancelToken
from .config import TrainConfig, config_from_dict
from .trainer import Trainer, TrainResult

log = logging.getLogger("pfmseg_engine.training")

#: Training resolution (µm/px) when neither the user, the config nor the backbone says otherwise.
DEFAULT_TRAIN_MPP = 0.5


@dataclass
class SlideTrainingPair:
    """One slide prepared for training: the image and the labels at the training resolution (both lazy)."""

    name: str
    slide: Any
    plan: Any
    image: Any
    labels: Any
    source: Any


def default_train_mpp(config: TrainConfig) -> float:
    """``model.mpp``, else the backbone's pretraining resolution (spec ``pretraining_mpp``/``mpp``), else 0.5."""
    if config.model.mpp:
        return float(config.model.mpp)
    from ..backbones.registry import get_spec

    spec = get_spec(config.model.pfm_name)
    for name in ("pretraining_mpp", "mpp"):
        value = getattr(spec, name, None)
        if value:
            return float(value)
    return DEFAULT_TRAIN_MPP


def _open(slide: Any, mpp: float | None) -> Any:
    from ..slides import Slide, open_slide

    if isinstance(slide, Slide):
        if mpp:
            from dataclasses import replace

            slide = replace(slide, mpp=float(mpp))
        slide.require_mpp()
        return slide
    return open_slide(slide, mpp=mpp)


def prepare_slides(slides: Sequence[Any], annotations: Sequence[Any], *, train_mpp: float,
                   class_names: Sequence[str] | None = None, class_colours: Sequence[Sequence[int]] | None = None,
                   mpp: float | None = None, frame: str = "qupath", class_map: Mapping[str, str] | None = None,
                   import_options: Any = None, clip: bool = False) -> tuple[list[SlideTrainingPair], Any]:
    """(one lazy image/labels pair per slide, the class table) for slide-level training.

    ``slides`` are paths (or :class:`~pfmseg_engine.slides.Slide` objects), ``annotations`` one QuPath GeoJSON
    or label store per slide, in the same order. Every file is read and checked before anything trains,
    so a bad file fails at once with one message naming it.
    """
    from ..annotations.sources import AnnotationSource, class_table_of, load_annotations
    from ..slides import plan_resolution

    slides, annotations = list(slides), list(annotations)
    if not slides:
        raise ConfigError("No slides given; give at least one slide (slides) and its annotation file "
                          "(annotations).", fix_with=("slides",))
    if len(slides) != len(annotations):
        raise ConfigError(f"{len(slides)} slides but {len(annotations)} annotation files; give one annotation file per "
                          "slide, in the same order (slides=[a.svs, b.ndpi], annotations=[a.geojson, b.geojson]).",
                          fix_with=("slides",))
    opened, sources = [], []
    for slide, annotation in zip(slides, annotations, strict=True):
        slide = _open(slide, mpp)
        source = annotation if isinstance(annotation, AnnotationSource) else load_annotations(
            annotation, slide=slide, frame=frame, options=import_options, class_map=class_map, clip=clip)
        opened.append(slide)
        sources.append(source)
    table = class_table_of(sources, class_names=class_names, class_colours=class_colours)
    pairs = []
    for slide, source in zip(opened, sources, strict=True):
        plan = plan_resolution(slide, train_mpp)
        labels = source.labels(table, plan)
        pairs.append(SlideTrainingPair(name=slide.name, slide=slide, plan=plan, image=plan.source(slide),
                                       labels=labels, source=source))
    log.info("Slide training at %.4g um/px: %d slide(s), classes %s%s", train_mpp, len(pairs), list(table.names),
             f" (ignored: {list(table.ignored)})" if table.ignored else "")
    return pairs, table


def config_for_classes(config: TrainConfig, table: Any, train_mpp: float) -> TrainConfig:
    """``config`` with the annotation classes (names, colours, count) and the training resolution filled in."""
    n = len(table.names)
    for key, value in (("dataset.num_classes", config.dataset.num_classes),
                       ("model.num_classes", config.model.num_classes)):
        if value is not None and value != n:
            raise ConfigError(f"{key} is {value} but the annotations hold {n} classes {list(table.names)}; remove "
                              f"{key} (the classes come from the annotations) or set it to {n}.")
    data = config.to_dict()
    data["dataset"] = {**data.get("dataset", {}), "num_classes": n, "class_names": list(table.names),
                       "class_colors": [list(c) for c in table.colours]}
    data.setdefault("model", {})["mpp"] = float(train_mpp)
    return config_from_dict(data, check_dataset=False)


def hold_out(pairs: Sequence[SlideTrainingPair], share: float, block: int, seed: int,
             max_regions: int = 64) -> tuple[list[Any], list[np.ndarray], list[np.ndarray], list[str]]:
    """Split annotated squares into training (labels with the held-out squares cleared) and validation crops.

    Returns (training labels per pair, validation images, validation labels, validation names). About
    ``share`` of each slide's annotated ``block``-sized squares are held out (at least one square stays for
    training, nothing is held out of a slide with a single square), at most ``max_regions`` in all.
    """
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"The validation share must be in [0, 1), got {share}.")
    train_labels, images, labels, names = [], [], [], []
    held_per_pair: list[list[tuple[int, int, int, int]]] = []
    for index, pair in enumerate(pairs):
        cells = pair.labels.annotated_cells(block) if share else []
        held: list[tuple[int, int, int, int]] = []
        if share and len(cells) >= 2:
            count = min(len(cells) - 1, max(1, math.floor(len(cells) * share + 0.5)))
            chosen = np.random.default_rng(seed + index).choice(len(cells), count, replace=False)
            held = [cells[i] for i in sorted(chosen.tolist())]
        held_per_pair.append(held)
    total = sum(len(h) for h in held_per_pair)
    if total > max_regions:  # keep validation memory bounded: thin every slide's hold-out evenly
        keep = max_regions / total
        held_per_pair = [h[:max(1, math.floor(len(h) * keep))] if h else h for h in held_per_pair]
    for pair, held in zip(pairs, held_per_pair, strict=True):
        for y0, y1, x0, x1 in held:
            images.append(np.asarray(pair.image[y0:y1, x0:x1]))
            labels.append(np.asarray(pair.labels[y0:y1, x0:x1]))
            names.append(f"{pair.name}_y{y0}_x{x0}")
        train_labels.append(pair.labels.with_excluded(held) if held else pair.labels)
    return train_labels, images, labels, names


def build_slide_trainer(config: TrainConfig, slides: Sequence[Any], annotations: Sequence[Any], *,
                        model: Any | None = None, train_mpp: float | None = None, mpp: float | None = None,
                        validation_share: float = 0.2, max_validation_regions: int = 64,
                        frame: str = "qupath", class_map: Mapping[str, str] | None = None,
                        import_options: Any = None, clip: bool = False, samples_per_epoch: int | None = None,
                        device: str | None = None, callbacks: Iterable[Callback] = (),
                        cancel: CancelToken | None = None, output_dir: str | Path | None = None) -> Trainer:
    """A :class:`Trainer` on whole slides and their annotations (see the module docstring).

    ``config`` need not name classes: they come from the annotations (``dataset.class_names`` in the
    config, or ``model``'s classes when continuing a model, fix their order and refuse other classes).
    ``mpp`` overrides the slides' own resolution (files without one); ``frame``, ``class_map``, ``clip`` and
    ``import_options`` (:class:`~pfmseg_engine.annotations.ImportOptions`: points, ignored classes, cells) are
    the GeoJSON reading options of :func:`~pfmseg_engine.annotations.load_annotations`.
    """
    from ..data.masks import sparse_to_targets
    from .runner import build_augmentation, model_or_new

    train_mpp = float(train_mpp) if train_mpp else (float(model.config.mpp) if model is not None and model.config.mpp
                                                    else default_train_mpp(config))
    names = list(model.config.class_names) if model is not None else config.dataset.class_names
    colours = config.dataset.class_colors
    pairs, table = prepare_slides(slides, annotations, train_mpp=train_mpp, class_names=names, class_colours=colours,
                                  mpp=mpp, frame=frame, class_map=class_map, import_options=import_options, clip=clip)
    config = config_for_classes(config, table, train_mpp)
    block = 2 * config.crop_size
    train_labels, val_images, val_labels, val_names = hold_out(pairs, validation_share, block, config.system.seed,
                                                               max_validation_regions)
    n, ignore = config.num_classes, config.dataset.ignore_index
    try:
        train = SparsePatchDataset(
            [p.image for p in pairs], train_labels, patch_size=config.crop_size, num_classes=n,
            samples_per_epoch=samples_per_epoch or config.training.samples_per_epoch or 256, ignore_index=ignore,
            transform=build_augmentation(config, crop=False), seed=config.system.seed,
            zoom=config.training.augmentation.zoom)
    except DataError as exc:
        raise DataError(f"{exc} (slides: {', '.join(p.name for p in pairs)}; annotations rasterised at "
                        f"{train_mpp:g} um/px: check that they lie on the tissue of their slides)") from exc
    counts = train.class_pixel_counts()
    missing = [table.names[k - 1] for k in range(1, n + 1) if k not in counts]
    if missing:
        log.warning("Classes %s have no training pixels at %.4g um/px (all held out for validation, or too small); "
                    "add annotations or lower validation_share.", missing, train_mpp)
    val = None
    if val_images:
        from ..data.dataset import ArrayImageSet

        val = ArrayImageSet(val_images, [sparse_to_targets(lab, n, ignore) for lab in val_labels], names=val_names)
    log.info("Training on %d slide(s), %d validation region(s) of %d px", len(pairs), len(val_images), block)
    trainer = Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                      cancel=cancel, output_dir=output_dir)
    trainer.slide_pairs = pairs
    trainer.class_table = table
    return trainer


def train_on_slides(config: TrainConfig, slides: Sequence[Any], annotations: Sequence[Any], *,
                    resume: str | Path | None = None, **options: Any) -> TrainResult:
    """Train on whole slides: :func:`build_slide_trainer` (same options), then ``fit(resume=...)``."""
    return build_slide_trainer(config, slides, annotations, **options).fit(resume=resume)
