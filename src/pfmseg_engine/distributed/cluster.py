"""Where the slide tasks run: a local cluster of worker processes, or an existing dask.distributed scheduler.

``--scheduler local`` (or ``local:N``) starts a :class:`distributed.LocalCluster` of N worker
processes with one thread each. On a GPU box there is one worker per visible GPU, each pinned to its
GPU by ``CUDA_VISIBLE_DEVICES`` (set per worker in the worker's nanny, so a restarted worker keeps
its GPU); without GPUs N defaults to half the CPU cores (at least 1) and the cores are shared out
(``OMP_NUM_THREADS``). ``--scheduler tcp://host:8786`` connects to a running scheduler whose
workers were started elsewhere (``dask worker``, dask-jobqueue, ...).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = ":8787"
WORKER_START_TIMEOUT = 300.0


def need_distributed(flag: str = "--scheduler") -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f'{flag} needs the distributed package: pip install "dask[distributed]".') from exc


def parse_scheduler(value: str) -> tuple[str, Any]:
    """("local", N or None) for ``local``/``local:N``, else ("address", the address)."""
    text = str(value).strip()
    if text.lower() == "local" or text.lower().startswith("local:"):
        count = text.partition(":")[2]
        if not count:
            return "local", None
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--scheduler '{value}': write local or local:N with N worker processes (N >= 1).")
        return "local", n
    if not text:
        raise ConfigError("--scheduler needs local, local:N or a scheduler address such as tcp://host:8786.")
    return "address", text


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch build with CUDA, no driver
        count = 0
    if count <= 0:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()][:count]
    return [str(i) for i in range(count)]


def worker_envs(n_workers: int | None, gpus: list[str], env: Mapping[str, str] | None = None,
                cores: int | None = None) -> list[dict[str, str]]:
    """The environment of each local worker: its GPU (round robin) and its share of the CPU cores."""
    cores = cores or os.cpu_count() or 1
    n = n_workers or (len(gpus) if gpus else max(1, cores // 2))
    threads = str(max(1, cores // n))
    envs = []
    for i in range(n):
        worker = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **(env or {})}
        if gpus:
            worker["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        envs.append({k: str(v) for k, v in worker.items()})
    return envs


def local_cluster(n_workers: int | None = None, *, dashboard: str | None = DEFAULT_DASHBOARD,
                  env: Mapping[str, str] | None = None, gpus: list[str] | None = None):
    """A :class:`distributed.LocalCluster` of worker processes (one thread each), one per GPU or N.

    ``env`` is added to every worker's environment (e.g. ``PYTHONPATH``); ``gpus`` overrides the
    detected ``CUDA_VISIBLE_DEVICES`` entries; ``dashboard`` is the dashboard address (None: off).
    """
    need_distributed()
    from distributed import LocalCluster
    from distributed.system import MEMORY_LIMIT

    gpus = visible_gpus() if gpus is None else list(gpus)
    envs = worker_envs(n_workers, gpus, env)
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                           memory_limit=int(MEMORY_LIMIT // len(envs)), name="pfmseg")
    try:
        for i, worker_env in enumerate(envs):  # one spec per worker: each nanny keeps its own environment
            spec = copy.copy(cluster.new_spec)
            options = dict(spec["options"])
            options["env"] = {**(options.get("env") or {}), **worker_env}
            spec["options"] = options
            cluster.worker_spec[f"pfmseg-{i}"] = spec
        cluster.scale(len(envs))
    except BaseException:
        cluster.close()
        raise
    return cluster


def dashboard_link(client) -> str | None:
    try:
        link = client.dashboard_link
    except Exception:
        return None
    return link or None


def describe_dashboard(client, wanted: Any = True) -> str:
    """The dashboard's link, or why there is none (switched off; bokeh, which serves it, missing)."""
    if not wanted:
        return "off"
    link = dashboard_link(client)
    if link is None:
        return "off"
    try:
        import bokeh  # noqa: F401  (dask serves its dashboard with bokeh)
    except ImportError:
        return f"{link} (needs bokeh where the scheduler runs: pip install bokeh)"
    return link


@contextmanager
def open_client(scheduler: str, *, dashboard: str | None = DEFAULT_DASHBOARD,
                env: Mapping[str, str] | None = None, announce=print) -> Iterator[Any]:
    """A client of ``scheduler`` ("local", "local:N" or an address); a local cluster is closed afterwards.

    ``announce`` receives one line naming the cluster and its dashboard link.
    """
    need_distributed()
    from distributed import Client

    kind, value = parse_scheduler(scheduler)
    cluster = None
    try:
        if kind == "local":
            cluster = local_cluster(value, dashboard=dashboard, env=env)
            client = Client(cluster)
            n = len(cluster.worker_spec)
            client.wait_for_workers(n, timeout=WORKER_START_TIMEOUT)
            gpus = {spec["options"]["env"].get("CUDA_VISIBLE_DEVICES") for spec in cluster.worker_spec.values()}
            gpus.discard(None)
            where = f"a local cluster of {n} worker process{'es' if n != 1 else ''}" + (
                f" on GPU{'s' if len(gpus) != 1 else ''} {', '.join(sorted(gpus))}" if gpus else "")
        else:
            try:
                client = Client(value, timeout=60)
            except OSError as exc:
                raise ConfigError(f"Cannot reach the dask scheduler at '{value}' ({exc}). Start one with "
                                  "'dask scheduler' and workers with 'dask worker ADDRESS', or use "
                                  "--scheduler local.") from exc
            where = f"the scheduler at {value} ({len(client.scheduler_info().get('workers', {}))} workers now)"
        announce(f"Running on {where}; dashboard: {describe_dashboard(client, dashboard if kind == 'local' else True)}")
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


__all__ = ["DEFAULT_DASHBOARD", "dashboard_link", "local_cluster", "open_client", "parse_scheduler",
           "visible_gpus", "worker_envs"]
