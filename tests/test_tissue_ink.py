"""Tissue detection users can trust: pen marks are not tissue, pale tissue is kept, your own ROI wins.

The test slide is built from real pixels of CMU-1-Small-Region (H&E): real glass as background, a real
H&E crop, pale loose stroma assembled from real pale-tissue blocks, fat drawn as a net of thin membranes
of real eosin-pink pixels (as fat looks: mostly empty cells), and marker strokes in typical pen colours
(blue, green, black) laid over glass and over tissue the way ink absorbs light (multiplicatively).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pfmseg_engine.errors import ConfigError, DataError
from pfmseg_engine.labelstore.omezarr import write_labels
from pfmseg_engine.slides import Slide, TissueMask, detect_tissue, save_tissue_qc
from testdata import CMU

H, W = 3072, 4096  # level-0 px at 0.5 um/px: 1.5 x 2 mm
INKS = {"blue": (45, 80, 190), "green": (40, 150, 80), "black": (30, 30, 38)}


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(-1), rgb.min(-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0)


@pytest.fixture(scope="module")
def inked_slide():
    import tiffslide
    from scipy.spatial import Voronoi

    rng = np.random.default_rng(0)
    with tiffslide.TiffSlide(CMU) as slide:
        cmu = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    glass = cmu[1500:2000, 1950:2200]  # real glass, mirrored into a seamless background
    glass = np.concatenate([glass, glass[::-1]], 0)
    glass = np.concatenate([glass, glass[:, ::-1]], 1)
    image = np.tile(glass, (-(-H // glass.shape[0]), -(-W // glass.shape[1]), 1))[:H, :W].copy()
    regions = {"dense": (200, 1400, 200, 1000), "pale": (200, 1400, 1000, 1800), "fat": (1400, 2600, 1000, 2000)}
    image[200:1400, 200:1000] = cmu[1700:2900, 700:1500]  # real H&E
    # pale loose stroma: 16-px blocks of CMU whose mean is pale tissue (light, faintly pink)
    grey, sat, b = cmu.mean(-1), _saturation(cmu), 16
    gh, gw = cmu.shape[0] // b, cmu.shape[1] // b
    block_grey = grey[:gh * b, :gw * b].reshape(gh, b, gw, b).mean((1, 3))
    block_sat = sat[:gh * b, :gw * b].reshape(gh, b, gw, b).mean((1, 3))
    pale = np.argwhere((block_grey > 200) & (block_grey < 228) & (block_sat > 0.06) & (block_sat < 0.16))
    y0, y1, x0, x1 = regions["pale"]
    for y in range(y0, y1, b):
        for x in range(x0, x1, b):
            py, px = pale[rng.integers(len(pale))]
            image[y:y + b, x:x + b] = cmu[py * b:(py + 1) * b, px * b:(px + 1) * b]
    # fat: a lobule of ~70 um cells whose 2 um membranes are real eosin-pink pixels, the rest glass
    pink = cmu[(sat > 0.25) & (grey > 150) & (grey < 200)]
    net = Image.new("L", (1000, 1200), 0)
    draw = ImageDraw.Draw(net)
    cells = Voronoi(rng.uniform(0, 1, (60, 2)) * (1000, 1200))
    for a, c in cells.ridge_vertices:
        if a >= 0 and c >= 0:
            draw.line([tuple(cells.vertices[a]), tuple(cells.vertices[c])], fill=255, width=4)
    draw.rectangle([2, 2, 997, 1197], outline=255, width=4)  # the lobule's septum
    membranes = np.asarray(net) > 0
    y0, y1, x0, x1 = regions["fat"]
    image[y0:y1, x0:x1][membranes] = pink[rng.integers(len(pink), size=int(membranes.sum()))]
    # marker strokes: three on glass, and the blue one again across the tissue
    strokes = {}
    for i, (name, colour) in enumerate(INKS.items()):
        canvas = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(canvas)
        y = 400 + i * 900
        draw.line([(2300, y), (3000, y + 250), (3900, y + 100)], fill=255, width=260, joint="curve")
        if name == "blue":
            draw.line([(150, 1150), (900, 1250)], fill=255, width=120)
        strokes[name] = np.asarray(canvas) > 0
        noise = rng.normal(1.0, 0.04, int(strokes[name].sum()))[:, None]
        transmission = np.clip(np.asarray(colour, np.float32) / 255.0 * noise, 0, 1)
        image[strokes[name]] = (image[strokes[name]] * transmission).astype(np.uint8)
    return Slide.from_array(image, mpp=0.5, name="inked"), regions, strokes


def share(tissue: TissueMask, mask: np.ndarray) -> float:
    """Share of the level-0 pixels of ``mask`` that the detection calls tissue."""
    d = int(tissue.downsample)
    grid = mask[d // 2::d, d // 2::d][:tissue.tissue.shape[0], :tissue.tissue.shape[1]]
    return float(tissue.tissue[grid].mean())


def box_mask(y0, y1, x0, x1, margin=64):
    mask = np.zeros((H, W), bool)
    mask[y0 + margin:y1 - margin, x0 + margin:x1 - margin] = True
    return mask


def test_pen_marks_are_not_tissue_and_pale_tissue_is_kept(inked_slide, tmp_path):
    slide, regions, strokes = inked_slide
    tissue = detect_tissue(slide, halo_um=50)
    assert share(tissue, box_mask(*regions["pale"])) > 0.95  # loose stroma
    assert share(tissue, box_mask(*regions["fat"])) > 0.95  # fat: empty cells inside their membranes
    near_ink = np.zeros((H, W), bool)
    near_ink[1000:1400] = True  # the blue stroke across the tissue and its edges
    dense = box_mask(*regions["dense"]) & ~near_ink
    assert share(tissue, dense) > 0.85  # real H&E (its own small glass gaps aside)
    for name, stroke in strokes.items():
        on_glass = stroke.copy()
        on_glass[:, :2000] = False
        assert share(tissue, on_glass) < 0.02, name
    across = strokes["blue"].copy()
    across[:, 2000:] = False
    assert share(tissue, across) < 0.1  # ink over tissue is not tissue either
    glass = np.zeros((H, W), bool)
    glass[2800:, :] = True
    glass[:, 2100:2250] = True
    assert share(tissue, glass) == 0.0
    assert tissue.ink is not None and tissue.ink.any() and tissue.source == "detected"
    assert save_tissue_qc(tissue, tmp_path / "qc.png").is_file()


def test_your_own_roi_replaces_or_restricts_the_detection(inked_slide, tmp_path):
    slide, regions, _ = inked_slide
    roi = tmp_path / "roi.geojson"
    area = [[1000, 200], [1800, 200], [1800, 1400], [1000, 1400], [1000, 200]]
    hole = [[1200, 400], [1400, 400], [1400, 600], [1200, 600], [1200, 400]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [area]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [hole]},
         "properties": {"classification": {"name": "Ignore*"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[3000, 2800], [3100, 2800], [3100, 2900],
                                                                             [3000, 2800]]]}, "properties": {}}]}))
    mine = TissueMask.from_geojson(slide, roi)
    assert mine.source == "roi: roi.geojson"
    assert share(mine, box_mask(*regions["pale"], margin=32) & ~box_mask(400, 600, 1200, 1400, margin=-16)) == 1.0
    assert share(mine, box_mask(400, 600, 1200, 1400, margin=16)) == 0.0  # Ignore* cut out
    assert share(mine, box_mask(*regions["dense"])) == 0.0  # replaced: only the ROI
    assert mine.any_in(2800, 2850, 3050, 3100)  # any class, unclassified included, glass or not
    inside = detect_tissue(slide, roi=roi, roi_mode="intersect")
    assert not inside.any_in(2800, 2900, 3000, 3100) and share(inside, box_mask(*regions["dense"])) == 0.0
    assert inside.source == "detected within roi: roi.geojson"
    # a mask at any resolution (here 1/16 of the slide), or a label store painted in napari
    coarse = np.zeros((H // 16, W // 16), bool)
    coarse[100:150, 50:120] = True
    from_array = TissueMask.from_mask(slide, coarse)
    assert from_array.any_in(1700, 2300, 900, 1800) and not from_array.any_in(0, 1500, 0, 700)
    painted = np.zeros((H // 8, W // 8), np.uint8)
    painted[10:40, 300:400] = 2
    store = write_labels(tmp_path / "roi.ome.zarr", painted, class_names=["a", "b"], mpp=4.0, slide_mpp=0.5)
    from_store = detect_tissue(slide, roi=store)
    assert share(from_store, box_mask(80, 320, 2400, 3200, margin=8)) == 1.0 and from_store.fraction < 0.05
    with pytest.raises(DataError, match="does not exist"):
        detect_tissue(slide, roi=tmp_path / "missing.geojson")
    with pytest.raises(ConfigError, match="roi_mode"):
        detect_tissue(slide, roi=store, roi_mode="union")
