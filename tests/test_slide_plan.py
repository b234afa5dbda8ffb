"""The public, torch-free slide plan: what it holds, that the executor follows it, and who reads it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pfmseg_engine.errors import ConfigError
from pfmseg_engine.inference import (
    LabelOutput,
    ModelInfo,
    SlideInferenceConfig,
    execute_plan,
    plan_slide,
    predict_slide,
)
from pfmseg_engine.inference.window import window_starts
from pfmseg_engine.slides import Slide
from test_wsi_support import PixelModel, random_image
from testdata import CMU


def test_plan_module_does_not_import_torch():
    code = ("import sys; import pfmseg_engine.inference.plan as p; from pfmseg_engine.inference import plan_slide, "
            "SlidePlan, ModelInfo, SlideInferenceConfig; "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_planning_a_real_slide_stays_torch_free(tmp_path):
    """Planning a real slide (tissue detection included) stays torch-free too."""
    code = (f"import sys; from pfmseg_engine.inference.plan import plan_slide, ModelInfo; "
            f"from pfmseg_engine.slides import open_slide; s = open_slide({str(CMU)!r}); "
            f"p = plan_slide(s, ModelInfo(3, 16, ('a', 'b', 'c'), 256, None), output_dir={str(tmp_path)!r}); "
            f"print(p.windows_total > 0, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True False"


def test_plan_geometry_matches_what_the_run_writes(tmp_path):
    image = random_image(256, 320, seed=7)
    slide = Slide.from_array(image, mpp=0.5, name="r", bounds_offset=(1000, 2000))
    config = SlideInferenceConfig(target_mpp=1.0, window=32, overlap=0.25, chunk=48, tissue=False)
    plan = plan_slide(slide, ModelInfo.from_model(PixelModel()), config, region=(96, 64, 200, 170),
                      priority_box=(200, 100, 20, 20), output_dir=tmp_path)
    # (x, y, w, h) = (96, 64, 200, 170) level-0 px at 2 px per output px -> rows 32..117, cols 48..148
    assert plan.downsample == 2.0 and plan.mpp == 1.0 and plan.resolution.level == 0
    assert plan.out_origin == (32, 48) and plan.origin == (64.0, 96.0) and plan.shape == (85, 100)
    assert plan.window == 32 and plan.stride == 24 and plan.chunk == 48  # MONAI's stride: int(32 * 0.75)
    assert plan.region == {"x": 96.0, "y": 64.0, "width": 200.0, "height": 170.0}
    assert plan.name == "r_x96_y64_200x170" and plan.final == tmp_path / "r_x96_y64_200x170.ome.zarr"
    assert plan.partial.name == "r_x96_y64_200x170.ome.zarr.partial" and plan.qc_path is None
    assert plan.pyramid_shapes == [(85, 100)]
    assert plan.windows_total == len(window_starts(85, 32, 24)) * len(window_starts(100, 32, 24))
    assert [c.index for c in plan.order] == sorted(c.index for c in plan.order) and plan.chunks_total == 2 * 3
    # priority (x 200..220, y 100..120 level 0) -> output rows 18..28, cols 52..62: chunk (0, 1) first
    assert plan.finish_order[0].index == (0, 1) and len(plan.finish_order) == plan.chunks_total
    json.dumps(plan.to_dict())  # plain data
    assert "window 32 stride 24" in plan.summary() and str(plan.final) in plan.summary()

    result = execute_plan(plan, PixelModel())
    output = LabelOutput(result.path)
    assert result.path == plan.final and result.slide_plan is plan
    assert result.windows_run == plan.windows_total and result.chunks_total == plan.chunks_total
    assert [tuple(level.shape) for level in output.levels] == plan.pyramid_shapes
    assert output.region_offset == plan.origin and output.downsample == plan.downsample
    assert output.pfmseg["stride"] == plan.stride and output.pfmseg["region"] == plan.region
    same = predict_slide(PixelModel(), Slide.from_array(image, mpp=0.5, name="r", bounds_offset=(1000, 2000)),
                         tmp_path / "again", config, region=(96, 64, 200, 170))
    np.testing.assert_array_equal(np.asarray(LabelOutput(same.path).levels[0][:]), np.asarray(output.levels[0][:]))


def test_plan_defaults_from_the_model_and_tissue_on_demand(tmp_path):
    from pfmseg_engine.slides import open_slide

    info = ModelInfo(num_classes=2, patch_size=16, class_names=("a", "b"), input_size=256, mpp=2.0)
    with open_slide(CMU) as slide:
        plan = plan_slide(slide, info, output_dir=tmp_path)
        assert plan.window == 256 and plan.stride == 192 and plan.chunk == 1024
        assert plan.resolution.target_mpp == 2.0 and plan.mpp == pytest.approx(2.0, rel=0.1)
        assert "tissue" not in plan.__dict__  # detection runs when first needed, not when planning
        assert 0.2 < plan.tissue.fraction < 1 and plan.qc_path == tmp_path / "CMU-1-Small-Region_tissue.png"
        grid = len(window_starts(plan.shape[0], 256, 192)) * len(window_starts(plan.shape[1], 256, 192))
        assert 0 < plan.windows_total <= grid and plan.pyramid_shapes == [plan.shape]


def test_model_info_from_a_model_config_without_building_it():
    from pfmseg_engine.model import ModelConfig

    config = ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=3, class_names=("x", "y", "z"),
                         input_size=64, mpp=0.5)
    info = ModelInfo.from_model_config(config)
    assert info == ModelInfo(3, 16, ("x", "y", "z"), 64, 0.5)
    assert ModelInfo.from_model_config(config.to_dict()) == info  # the dict a checkpoint stores
    unet = ModelInfo.from_model_config({"backbone": "unet", "num_classes": 2, "input_size": 128})
    assert unet.patch_size == 16 and unet.class_names == ("class_0", "class_1")
    with pytest.raises(ConfigError, match="num_classes"):
        ModelInfo.from_model_config({"backbone": "unet"})


class Placed(PixelModel):
    """Records every move to a device."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append((args, kwargs))
        return super().to(*args, **kwargs)


def test_planning_does_not_touch_the_model_and_the_plan_must_fit_it(tmp_path):
    image = random_image(64, 64)
    model = Placed()
    plan = plan_slide(Slide.from_array(image, mpp=1.0, name="m"), model,
                      SlideInferenceConfig(window=32, tissue=False), output_dir=tmp_path)
    assert model.moves == []  # a model passed to plan_slide is only read
    execute_plan(plan, model, device="cpu")
    assert model.moves  # the executor places it
    other = ModelInfo(num_classes=5, patch_size=16, class_names=tuple("abcde"), input_size=None, mpp=None)
    mismatch = plan_slide(Slide.from_array(image, mpp=1.0, name="n"), other,
                          SlideInferenceConfig(window=32, tissue=False), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="plan again with this model"):
        execute_plan(mismatch, PixelModel())
    with pytest.raises(ConfigError, match="output_dir"):
        execute_plan(plan_slide(Slide.from_array(image, mpp=1.0), PixelModel(), SlideInferenceConfig(window=32)),
                     PixelModel())
    with pytest.raises(ConfigError, match="254"):
        plan_slide(Slide.from_array(image, mpp=1.0), ModelInfo(300, 16, (), None, None))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2,
                                                   input_size=64)))
    return path


def test_cli_prints_the_plan_and_dry_run_only_plans(checkpoint, tmp_path, capsys):
    from pfmseg_engine.cli import main

    args = ["infer", "--slide", str(CMU), "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"),
            "--target_mpp", "4.0", "--region", "0", "0", "1024", "768", "--device", "cpu"]
    assert main([*args, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "window 64 stride 48" in out and "output new" in out and "CMU-1-Small-Region_x0_y0_1024x768" in out
    assert not list((tmp_path / "out").glob("*.ome.zarr*"))  # nothing written
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "window 64 stride 48" in out and "chunks run" in out
    assert main([*args, "--dry_run"]) == 0 and "output complete" in capsys.readouterr().out


def test_planning_at_an_unchosen_resolution_warns():
    """A model with no training mpp and no target_mpp: level 0 is used, and the user is told so."""
    import warnings

    from pfmseg_engine.inference import SlideInferenceConfig, plan_slide
    from pfmseg_engine.inference.plan import MagnificationWarning
    from pfmseg_engine.inference.runner import ModelInfo

    slide = Slide.from_array(random_image(64, 64), mpp=0.25, name="level0")
    unknown = ModelInfo(num_classes=3, patch_size=16, class_names=("a", "b", "c"), input_size=32, mpp=None)
    with pytest.warns(MagnificationWarning, match=r"level 0 .*0.25.*\(target_mpp\)"):
        plan_slide(slide, unknown, SlideInferenceConfig(tissue=False))
    known = ModelInfo(num_classes=3, patch_size=16, class_names=("a", "b", "c"), input_size=32, mpp=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MagnificationWarning)
        plan_slide(slide, known, SlideInferenceConfig(tissue=False))
        plan_slide(slide, unknown, SlideInferenceConfig(tissue=False, target_mpp=0.5))


def test_a_tissue_roi_decides_where_prediction_runs(tmp_path):
    """--tissue_roi: a QuPath GeoJSON replaces the detected tissue; outside it nothing is predicted."""
    import zarr

    from pfmseg_engine.inference import predict_slide

    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"classification": {"name": "Tissue"}},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [128, 0], [128, 96], [0, 96], [0, 0]]]}}]}))
    slide = Slide.from_array(random_image(256, 320, seed=4), mpp=8.0, name="roi")
    result = predict_slide(PixelModel(), slide, tmp_path / "out", window=32, chunk=64, tissue=True,
                           tissue_roi=str(roi), tissue_halo_um=0.0)
    labels = np.asarray(zarr.open_group(str(result.path), mode="r")["0"][:])
    assert labels[:96, :128].all()  # the ROI is predicted
    assert not labels[160:, :].any() and not labels[:, 192:].any()  # far outside it, nothing
    with pytest.raises(ConfigError, match="needs tissue detection"):
        predict_slide(PixelModel(), slide, tmp_path / "other", window=32, tissue=False, tissue_roi=str(roi))
