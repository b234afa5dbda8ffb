"""Random-number-generator state as checkpoint-safe data (readable with ``torch.load(weights_only=True)``).

Exact resume needs the RNG streams exactly where the interrupted run left them: torch (CPU and
CUDA), NumPy's legacy global generator and Python's ``random``. NumPy's state holds an ndarray,
which a weights-only load refuses, so it is stored as a tensor plus plain numbers.
"""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    legacy = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # legacy=True: the tuple
    kind, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and ``random`` (the seed's set_random_seed, minus the cudnn flags)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
