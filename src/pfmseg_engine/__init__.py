"""pfmseg engine: pathology foundation models for whole-slide segmentation, without a GUI.

The public API is re-exported here, lazily: ``import pfmseg_engine`` is instant and pulls in torch,
timm or torchvision only when a name that needs them is first used, so readers, exporters and the
napari plugin start fast. Importing it never imports napari or Qt.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("BackboneSpec", "build_backbone", "get_spec", "list_backbones"), "backbones"),
    **dict.fromkeys(("load_checkpoint", "read_checkpoint", "save_checkpoint"), "checkpoint"),
    **dict.fromkeys(("DEVICES", "resolve_device"), "devices"),
    **dict.fromkeys(("CheckpointError", "ConfigError", "DataError", "PfmsegError", "SlideError", "StorageError",
                     "TrainingScaleWarning", "WeightsError"),
                    "errors"),
    **dict.fromkeys(("ModelConfig", "SegmentationModel", "build_model"), "model"),
    **dict.fromkeys(("CancelToken", "TrainConfig", "Trainer", "build_annotation_trainer", "load_config",
                     "train_from_config", "train_on_annotations", "train_on_slides"), "training"),
    **dict.fromkeys(("STRATEGIES", "TuningConfig"), "tuning"),
    **dict.fromkeys(("READERS", "Slide", "open_slide", "detect_tissue"), "slides"),
    **dict.fromkeys(("SlideInferenceConfig", "SlidePlan", "execute_plan", "export_geojson", "export_ome_tiff",
                     "infer_image_set", "iter_predict_slide", "plan_slide", "predict_image", "predict_slide"),
                    "inference"),
    **dict.fromkeys(("collect_slides", "predict_slides", "run_cohort"), "distributed"),
    **dict.fromkeys(("CohortSettings", "FineTune", "FineTuneSettings", "PredictionSettings", "SlidePrediction"),
                    "jobs"),
    **dict.fromkeys(("compare_models", "feature_pca"), "compare"),
    **dict.fromkeys(("measure_output", "read_geojson", "write_measurements"), "annotations"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
