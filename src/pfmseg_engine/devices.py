"""The one place that turns a device name ("auto", "cpu", "cuda:1", "mps") into a torch device.

Training, evaluation, benchmarks, the CLI and the napari plugin all ask here, so "auto" means the
same everywhere (CUDA, then Apple MPS, then the CPU) and asking for a device this machine lacks is
the same clear error everywhere, instead of a late crash inside the first forward pass.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICES = ("auto", "cuda", "mps", "cpu")  # the choices a user interface offers ("cuda:1" etc. also work)
AUTO_ORDER = ("cuda", "mps", "cpu")


def available_devices() -> dict[str, bool]:
    """Which device types this machine offers (``cpu`` always)."""
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": torch.cuda.is_available(), "mps": bool(mps is not None and mps.is_available()), "cpu": True}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/empty/None -> CUDA, else MPS, else CPU; any other name must be a device that exists here.

    Raises :class:`ConfigError` naming the device and what is available, so a config written on a GPU
    machine fails at once (with the fix) on a laptop rather than half-way into a run.
    """
    if name is None or str(name).strip().lower() in ("", "auto"):
        available = available_devices()
        return torch.device(next(kind for kind in AUTO_ORDER if available[kind]))
    try:
        device = torch.device(str(name).strip().lower()) if isinstance(name, str) else torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Device '{name}' is not a valid torch device; use one of {', '.join(DEVICES)} "
                          "(or an indexed CUDA device such as cuda:1).") from exc
    available = available_devices()
    if device.type not in available:
        raise ConfigError(f"Device '{name}' is not supported; use one of {', '.join(DEVICES)}.")
    if not available[device.type]:
        found = ", ".join(kind for kind, ok in available.items() if ok)
        raise ConfigError(f"Device '{name}' is not available on this machine (available: {found}); "
                          "use 'auto' or 'cpu' instead.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s); use 'cuda' or 'auto'.")
    return device
