"""Self-describing model checkpoints, written atomically.

One file holds the model config (backbone, strategy and its settings, head, classes, input size,
normalisation), the trainable state only, and metadata (package versions, metrics). The frozen
backbone is not duplicated: reloading needs this file plus the backbone's published weights, which
keeps a LoRA or adapter checkpoint a few megabytes instead of gigabytes. A ``full`` fine-tune and the
from-scratch ``unet`` baseline train every weight, so their checkpoints hold them all and reload
without any backbone weights file.

``metadata["training_scale"]`` records the scale the model learnt (µm per model pixel, and how much the
training crops shrank the images: :class:`~pfmseg_engine.training_scale.TrainingScale`); a loaded model
carries it as ``model.training_scale``. Checkpoints written before it was recorded load with None
(unknown), and slide inference then cannot check the resolution it runs at.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .backbones.backbone import Backbone
from .errors import CheckpointError
from .model import ModelConfig, SegmentationModel, build_model
from .paths import check_input_path
from .training_scale import TrainingScale, attach_training_scale, training_scale_of
from .tuning import STRATEGIES

log = logging.getLogger(__name__)

FORMAT = "pfmseg-checkpoint"
#: 2: ``cnn_adapter`` is the seed's ResNetV2 branch (the earlier small adapter is ``cnn_adapter_small``) and
#: the Transformer adapter reads the whole token sequence after the final norm.
#: 3: backbones published as transformers models resample their position table with the vendor's kernel,
#: from the weights file's grid.
FORMAT_VERSION = 3


class PositionKernelWarning(UserWarning):
    """A checkpoint was trained when its backbone resampled positions with another kernel than today."""


def _versions() -> dict[str, str]:
    import timm

    from . import __version__

    versions = {"pfmseg": __version__, "torch": str(torch.__version__), "timm": str(timm.__version__),
                "python": platform.python_version()}
    try:
        import peft

        versions["peft"] = str(peft.__version__)
    except ImportError:  # peft only matters for LoRA/DoRA checkpoints
        pass
    return versions


def backbone_fingerprint(model: SegmentationModel) -> float | None:
    """A cheap checksum of the frozen patch embedding, to notice a swapped backbone on reload.

    None for a from-scratch baseline (unet): it has no published backbone, and every weight it has is
    trained and stored in the checkpoint, so there is nothing outside the file to check.
    """
    backbone = model.encoder.backbone
    if model.spec.from_scratch or not isinstance(backbone, Backbone):
        return None
    weight = backbone.vit.patch_embed.proj.weight
    return float(weight.detach().double().abs().sum().cpu())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` next to ``path`` under a temporary name, fsync, then rename over ``path``.

    A crash, Ctrl-C or full disk mid-write leaves the previous file intact and no half-written file under
    the final name nor a temporary one beside it. A failed write (torch reports a full disk as
    ``RuntimeError: [enforce fail at inline_container.cc...]``) is a one-line
    :class:`~pfmseg_engine.errors.StorageError` naming ``path``.
    """
    from .storage import writing

    path = Path(path)
    with writing(path, "checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                _torch_save(obj, handle, path)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _torch_save(obj: Any, handle: Any, path: Path) -> None:
    """``torch.save`` whose failed write is a :class:`StorageError` (other errors pass unchanged)."""
    from .storage import write_failure

    try:
        torch.save(obj, handle)
    except RuntimeError as exc:
        failure = write_failure(exc, path, "checkpoint")
        if failure is exc:
            raise
        raise failure from exc


def save_checkpoint(
    path: str | Path,
    model: SegmentationModel,
    metrics: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model``'s config and trainable weights (plus optional resume state) atomically.

    ``metadata`` may give ``training_scale`` (a :class:`TrainingScale` dict, or None for unknown);
    without it, the scale the model carries (from training or from the checkpoint it was loaded from)
    is recorded, so re-saving a model never drops it.
    """
    spec = model.spec
    metadata = dict(metadata or {})
    if "training_scale" not in metadata:
        scale = training_scale_of(model)
        metadata["training_scale"] = scale.to_dict() if scale is not None else None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
        "state": model.trainable_state_dict(),
        "backbone_fingerprint": backbone_fingerprint(model),
        "metrics": dict(metrics or {}),
        "training_state": training_state,
        "metadata": {"versions": _versions(), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metadata},
    }
    return atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file and check that it is one of ours."""
    path = check_input_path(path, "Checkpoint", error=CheckpointError)  # missing, a folder, a pipe, a link loop
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"Could not read checkpoint '{path}' (truncated or not a checkpoint?): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not a pfmseg checkpoint. Backbone weights go to 'weights'/'pfm_weights_path', "
            "trained segmentation models to 'checkpoint'."
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint '{path}' has format version {payload['format_version']}, newer than this pfmseg "
            f"understands ({FORMAT_VERSION}); upgrade pfmseg."
        )
    return upgrade_checkpoint(payload, path)


def checkpoint_training_scale(payload: dict[str, Any]) -> TrainingScale | None:
    """The training scale a checkpoint records; None when it records none (written before it was)."""
    return TrainingScale.from_dict((payload.get("metadata") or {}).get("training_scale"))


def read_training_scale(path: str | Path) -> TrainingScale | None:
    """The training scale of checkpoint ``path``, without reading its weights into memory (memory-mapped).

    For callers that check a resolution before any model is loaded (a cluster run's client, a dry run).
    """
    path = check_input_path(path, "Checkpoint", error=CheckpointError)  # a pipe would block the memory map
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an older or odd layout that cannot be memory-mapped: read it the ordinary way
        payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a pfmseg checkpoint.")
    return checkpoint_training_scale(payload)


def upgrade_checkpoint(payload: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """Map a checkpoint written by an earlier format onto today's names (as timm's checkpoint filters do).

    Version 1 called the small three-stage adapter ``cnn_adapter``; from version 2 that name means the
    seed framework's ResNetV2 branch, so such checkpoints load as ``cnn_adapter_small``, which computes
    exactly what they were trained with. A version-1 Transformer adapter saw patch tokens only; from
    version 2 the adapter sees the whole sequence, so its weights would compute something else: refused.
    Versions 1-2 resampled the position tables of transformers-published backbones (Phikon, Phikon-v2,
    Midnight, Hibou) with timm's kernel; version 3 follows the vendor's, which changes their features
    slightly at input sizes other than the weights' own: loaded, with a :class:`PositionKernelWarning`.
    """
    version = payload.get("format_version", 0)
    if version >= FORMAT_VERSION:
        return payload
    payload = {**payload, "config": dict(payload["config"])}
    if version < 2:
        payload = _upgrade_adapters_from_format_1(payload, path)
    _warn_about_position_kernel(payload["config"], path)
    payload["format_version"] = FORMAT_VERSION
    return payload


def _warn_about_position_kernel(config: dict[str, Any], path: str | Path) -> None:
    from .backbones.positions import ANTIALIAS_BY_LAYOUT
    from .backbones.registry import get_spec

    spec = get_spec(config["backbone"])
    if spec.checkpoint_layout not in ANTIALIAS_BY_LAYOUT:
        return
    message = (
        f"Checkpoint '{path}' was trained with an earlier pfmseg that resampled {spec.name}'s position table "
        "with timm's kernel; this one uses the vendor's (transformers), as the published model computes. At "
        "input sizes other than the backbone weights' own, features differ slightly from those it was trained "
        "on, so outputs can shift a little. Retrain (the same config) for an exact match."
    )
    log.warning(message)
    warnings.warn(message, PositionKernelWarning, stacklevel=3)


def _upgrade_adapters_from_format_1(payload: dict[str, Any], path: str | Path) -> dict[str, Any]:
    tuning = dict(payload["config"].get("tuning") or {})
    strategy = tuning.get("strategy")
    if strategy == "cnn_adapter" and any(k.startswith("encoder.cnn_adapter.stages.") for k in payload["state"]):
        tuning["strategy"] = "cnn_adapter_small"
    elif strategy == "transformer_adapter":
        raise CheckpointError(
            f"Checkpoint '{path}' holds a Transformer adapter of pfmseg format 1, which saw patch tokens only; "
            "this pfmseg's adapter follows the seed framework and sees the whole token sequence, so those weights "
            "do not apply. Retrain it (python -m pfmseg_engine train ... with the same config)."
        )
    payload["config"]["tuning"] = tuning
    return payload


def load_into(model: SegmentationModel, payload: dict[str, Any], source: str = "checkpoint",
              adopt_position_grid: bool = True) -> None:
    """Load a checkpoint's trainable state into an existing model, refusing mismatches by name.

    ``adopt_position_grid``: a trained position table brings its grid along
    (:meth:`SegmentationModel.adopt_stored_position_grid`). Off when an optimizer already holds the
    model's parameters (resuming), where a replaced table would go stale: a mismatch is then refused.
    """
    stored = ModelConfig.from_dict(payload["config"])
    ours = model.config
    differences = [
        f"{key}: checkpoint {getattr(stored, key)!r} vs model {getattr(ours, key)!r}"
        for key in ("backbone", "tiny", "num_classes", "head", "light_head_final_norm", "tuning", "feature_indices")
        if getattr(stored, key) != getattr(ours, key)
    ]
    if differences:
        raise CheckpointError(
            f"{source} does not match this model: {'; '.join(differences)}. Build the model from the "
            "checkpoint's config (load_checkpoint) instead."
        )
    try:
        if adopt_position_grid:
            model.adopt_stored_position_grid(payload["state"])
        model.load_trainable_state_dict(payload["state"])
    except ValueError as exc:
        raise CheckpointError(f"{source} does not fit the model: {exc}") from exc


def load_checkpoint(
    path: str | Path,
    weights: str | None = None,
    device: str | torch.device | None = "cpu",
) -> SegmentationModel:
    """Rebuild the model a checkpoint describes and load its trained weights.

    ``weights`` overrides the backbone weights path stored in the checkpoint (checkpoints travel
    between machines; backbone files move). A frozen backbone that differs from the one trained on is
    an error, because the trained head would silently produce garbage. The model carries the scale it
    was trained at as ``model.training_scale`` (None when the checkpoint records none).
    """
    payload = read_checkpoint(path)
    config = ModelConfig.from_dict(payload["config"])
    if weights is not None:
        config = config.with_changes(weights=weights)
    elif config.weights and not config.weights.startswith("hf-hub:") and not Path(config.weights).exists():
        raise CheckpointError(
            f"Checkpoint '{path}' was trained on backbone weights '{config.weights}', which do not exist "
            f"here. Give the {config.backbone} weights file (weights=PATH).",
            fix_with=("weights",),
        )
    model = build_model(config)
    load_into(model, payload, source=f"Checkpoint '{path}'")
    expected = payload.get("backbone_fingerprint")
    if expected is not None and not STRATEGIES[config.tuning.strategy].backbone_trains:
        actual = backbone_fingerprint(model)
        if abs(actual - expected) > 1e-6 * max(1.0, abs(expected)):
            raise CheckpointError(
                f"The {config.backbone} backbone weights loaded differ from those checkpoint '{path}' "
                "was trained on; the trained head would give meaningless output. Pass the same backbone "
                "weights file used for training (weights=PATH).",
                fix_with=("weights",),
            )
    attach_training_scale(model, checkpoint_training_scale(payload))
    model.eval()
    return model.to(device) if device is not None else model

