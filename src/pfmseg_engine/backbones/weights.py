"""Finding a backbone's weights inside the many checkpoint files published in the wild.

Files may be safetensors, pickled ``.bin``/``.pth``/``.pt`` state dicts, or training checkpoints that
nest the weights under ``model``/``state_dict``/``teacher``/``module`` and prefix every key with
``module.`` or ``backbone.``. This module turns any of them into a flat ``{key: tensor}`` dict; the
layout-specific renaming into timm's names is done by :mod:`.converters`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import WeightsError

HUB_PREFIX = "hf-hub:"
NESTING_KEYS = ("state_dict", "model", "teacher", "module", "model_state_dict", "student")
STRIPPED_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file and return its flat tensor dict with wrapper prefixes removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"Weights file '{path}' does not exist. Give the path to the downloaded checkpoint "
            "(safetensors, .bin, .pth) or an 'hf-hub:<repo>' id."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted, truncated or not a checkpoint at all
        raise WeightsError(f"Could not read weights file '{path}': {exc}") from exc
    return strip_prefixes(unwrap_nesting(raw, source=str(path)))


def unwrap_nesting(obj: object, source: str) -> dict[str, torch.Tensor]:
    """Descend through ``model``/``state_dict``/``teacher``/... until a dict of tensors is found."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        nested = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = nested
    raise WeightsError(
        f"No tensors found in '{source}'. Expected a state dict, possibly nested under one of "
        f"{', '.join(NESTING_KEYS)}."
    )


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``backbone.``) shared by the keys that carry them.

    Only keys with the prefix are renamed, and keys of other heads (e.g. a DINO ``head.``) are kept so
    the caller can report them as unexpected rather than silently dropping them.
    """
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def resolve_weights_file(source: str | Path, hub_id: str | None, filenames: tuple[str, ...]) -> Path:
    """Turn a local path or an ``hf-hub:<repo>`` id into a local file (downloading from the hub).

    ``hf-hub:`` alone uses the backbone's published repository. The download goes through
    ``huggingface_hub`` so cached files, tokens and gated-model access work as users expect.
    """
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        return Path(text).expanduser()
    repo = text[len(HUB_PREFIX):] or hub_id
    if not repo:
        raise WeightsError("'hf-hub:' needs a repository id here: this backbone has no published hub repo.")
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # missing file in repo, gated access, offline
            errors.append(f"{filename}: {type(exc).__name__}: {exc}")
    raise WeightsError(
        f"Could not download weights from hub repo '{repo}' (tried {', '.join(filenames)}). "
        "Gated models need 'hf auth login' and accepted terms; offline machines need a local "
        "file instead. Details: " + " | ".join(errors)
    )
