"""Many slides over a dask.distributed cluster: one slide per task, idempotent outputs.

Each task loads the checkpoint once per worker process (cached), plans its slide
(:func:`~pfmseg_engine.inference.plan_slide`) and runs the plan
(:func:`~pfmseg_engine.inference.execute_plan`). Because a finished slide is reused and
a ``.partial`` one resumed, a task that fails or loses its worker is simply retried, and rerunning
the whole batch only computes what is missing. Give each worker one GPU (e.g. dask-cuda's
``LocalCUDACluster`` or ``CUDA_VISIBLE_DEVICES`` per worker) and one thread, so slides never share
a device. Requires the ``distributed`` package (``pip install "dask[distributed]"``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

_MODELS: dict[tuple[str, str | None, str], Any] = {}
_LOCK = threading.Lock()


def _model(checkpoint: str, weights: str | None, device: str):
    """The worker's cached model for this checkpoint (loading a PFM per slide would dominate)."""
    from ..checkpoint import load_checkpoint

    key = (checkpoint, weights, device)
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_checkpoint(checkpoint, weights=weights, device=device)
        return _MODELS[key]


def predict_one(checkpoint: str, slide: str, output_dir: str, config: dict[str, Any], *,
                weights: str | None = None, mpp: float | None = None, device: str | None = None,
                model_loader: Callable[[str, str | None, str], Any] | None = None):
    """One cluster task: plan ``slide`` for the checkpoint's model, then run the plan (safe to run again:
    a complete output is reused, a partial one resumed). The result carries the plan's summary in
    ``extra["plan"]`` (the plan itself, which holds the open slide, stays on the worker)."""
    from ..devices import resolve_device
    from ..inference.plan import SlideInferenceConfig, plan_slide
    from ..inference.runner import model_info
    from ..inference.slide import execute_plan
    from ..slides import open_slide

    device = str(resolve_device(device))  # resolved here, on the worker that owns the GPU
    model = (model_loader or _model)(checkpoint, weights, device)
    with open_slide(slide, mpp=mpp) as opened:
        plan = plan_slide(opened, model_info(model), SlideInferenceConfig(**config), output_dir=output_dir)
        # wait=None: a retry that starts while an earlier attempt still writes waits for it, then reuses it
        result = execute_plan(plan, model, device=device, wait=None)
        result.extra["plan"] = plan.summary()
    result.slide_plan = None
    return result


def task_key(slide: str | Path, output_dir: str | Path) -> str:
    """Deterministic task key: submitting the same slide and output twice never runs it twice at once."""
    digest = hashlib.sha1(f"{Path(slide).resolve()}|{Path(output_dir).resolve()}".encode()).hexdigest()[:16]
    return f"pfmseg-slide-{Path(slide).name}-{digest}"


def predict_slides(
    checkpoint: str | Path,
    slides: Sequence[str | Path],
    output_dir: str | Path,
    config=None,
    *,
    client=None,
    weights: str | None = None,
    mpp: float | None = None,
    device: str | None = None,
    retries: int = 2,
    on_done: Callable[[Any], Any] | None = None,
    model_loader: Callable[[str, str | None, str], Any] | None = None,
) -> list[Any]:
    """Predict every slide as its own task on ``client`` (default: a local in-process cluster).

    Returns the :class:`~pfmseg_engine.inference.SlideResult` of each slide, in input order; a slide
    that fails after ``retries`` raises its error here. ``on_done`` sees each result as it finishes.
    """
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise ConfigError(
            'Distributed inference needs the distributed package: pip install "dask[distributed]".'
        ) from exc
    from ..inference.plan import SlideInferenceConfig

    config = config or SlideInferenceConfig()
    own = client is None
    client = client or Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
    try:
        futures = [client.submit(predict_one, str(checkpoint), str(s), str(output_dir), config.to_dict(),
                                 weights=weights, mpp=mpp, device=device, model_loader=model_loader,
                                 key=task_key(s, output_dir), retries=retries, pure=False)
                   for s in slides]
        if on_done is not None:
            for future in as_completed(futures):
                on_done(future.result())
        return client.gather(futures)
    finally:
        if own:
            client.close()
