"""Where the slide tasks run: a local cluster of worker processes, or an existing dask.distributed scheduler.

``--scheduler local`` (or ``local:N``) starts a :class:`distributed.LocalCluster` of N worker
processes with one thread each. On a GPU box there is one worker per visible GPU, each pinned to its
GPU by ``CUDA_VISIBLE_DEVICES`` (set per worker in the worker's nanny, so a restarted worker keeps
its GPU); without GPUs N defaults to half the CPU cores (at least 1) and the cores are shared out
(``OMP_NUM_THREADS``). ``--scheduler tcp://host:8786`` connects to a running scheduler whose
workers were started elsewhere (``dask worker``, dask-jobqueue, ...).

Nothing here waits forever and a normal run prints only its own lines. A scheduler address must answer
(TCP, then dask's handshake) within :data:`SCHEDULER_CONNECT_TIMEOUT` seconds: dask's own client
bounds the TCP connection but not the handshake, so a port where something else listens would
keep it waiting. dask's loggers stay at WARNING unless ``debug`` (their INFO lines describe the
cluster's machinery, not the run), and a local cluster is closed client first, each worker process
given :data:`WORKER_CLOSE_TIMEOUT` seconds to exit, so a normal shutdown reports nothing.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DASHBOARD = ":8787"
WORKER_START_TIMEOUT = 300.0
#: Seconds a scheduler address gets to answer (TCP connection and dask's handshake), unless told otherwise.
SCHEDULER_CONNECT_TIMEOUT = 15.0
#: Seconds each local worker process gets to exit at the end of a run before its nanny kills it: a
#: process that loaded torch takes seconds to tear down on a busy machine (dask's own default is 4).
WORKER_CLOSE_TIMEOUT = 30.0
#: Seconds the client gets to say goodbye to the scheduler.
CLIENT_CLOSE_TIMEOUT = 10.0
#: The logger of dask.distributed (scheduler, nannies, workers, comms): WARNING unless debugging.
DASK_LOGGER = "distributed"


def need_distributed(what: str = "A dask scheduler") -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f'{what} needs the distributed package: pip install "dask[distributed]".') from exc


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
            raise ConfigError(f"Scheduler '{value}': write local or local:N with N worker processes (N >= 1).")
        return "local", n
    if not text:
        raise ConfigError("A scheduler needs to be local, local:N or an address such as tcp://host:8786.")
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
                  env: Mapping[str, str] | None = None, gpus: list[str] | None = None, debug: bool = False):
    """A :class:`distributed.LocalCluster` of worker processes (one thread each), one per GPU or N.

    ``env`` is added to every worker's environment (e.g. ``PYTHONPATH``); ``gpus`` overrides the
    detected ``CUDA_VISIBLE_DEVICES`` entries; ``dashboard`` is the dashboard address (None: off);
    ``debug`` lets the worker processes log at INFO (else WARNING). Close it with :func:`close_cluster`.
    """
    need_distributed()
    from distributed import LocalCluster
    from distributed.system import MEMORY_LIMIT

    gpus = visible_gpus() if gpus is None else list(gpus)
    envs = worker_envs(n_workers, gpus, env)
    # without a dashboard the scheduler still serves its health routes: on a free port, not on a busy 8787
    # (which dask would announce with a warning)
    cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=dashboard,
                           memory_limit=int(MEMORY_LIMIT // len(envs)), name="pfmseg",
                           silence_logs=False if debug else logging.WARNING,
                           scheduler_kwargs=None if dashboard else {"dashboard_address": "127.0.0.1:0"})
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
def dask_logging(debug: bool = False, level: int = logging.WARNING) -> Iterator[None]:
    """dask.distributed's loggers at ``level`` or above while the block runs (restored afterwards),
    unless ``debug``: their INFO lines (scheduler started, worker registered, connection closed ...)
    describe dask's machinery, and a run's console should hold the run's own lines."""
    if debug:
        yield
        return
    logger = logging.getLogger(DASK_LOGGER)
    before = logger.level
    logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        logger.setLevel(before)


def close_cluster(cluster: Any, timeout: float = WORKER_CLOSE_TIMEOUT) -> None:
    """Close a local cluster, each worker process given ``timeout`` seconds to exit before it is killed.

    dask closes workers with 4 seconds' grace and then kills them, announcing it ("Worker process
    still alive after 4.0 seconds, killing"); a worker that loaded torch often needs longer to exit.
    """

    async def close_workers() -> None:
        await asyncio.gather(*(worker.close(timeout=timeout) for worker in list(cluster.workers.values())),
                             return_exceptions=True)

    try:
        cluster.sync(close_workers)
    finally:
        cluster.close(timeout=timeout)


def _unreachable(address: str, reason: str) -> ConfigError:
    return ConfigError(f"Could not reach a dask scheduler at '{address}': {reason}; check the address (start "
                       "one with 'dask scheduler' and workers with 'dask worker ADDRESS') or use a local "
                       "cluster (local:N).")


def _tcp_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a tcp:// or tls:// address (a bare host:port is TCP to dask), else None."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(address)
        if scheme not in ("tcp", "tls"):
            return None
        return parse_host_port(location, 8786)
    except ValueError as exc:  # a port that is not a number, a malformed IPv6 address, ...
        raise ConfigError(f"'{address}' is not a scheduler address ({exc}); write tcp://host:port, "
                          "or local / local:N.") from exc


async def _handshake(address: str, timeout: float) -> None:
    from distributed.comm import connect
    from distributed.security import Security

    comm = await asyncio.wait_for(connect(address, timeout=timeout, **Security().get_connection_args("client")),
                                  timeout)
    await comm.close()


def check_scheduler(address: str, timeout: float = SCHEDULER_CONNECT_TIMEOUT) -> None:
    """A :class:`ConfigError` naming the reason unless a dask scheduler answers at ``address`` within
    ``timeout`` seconds (its TCP port, then dask's handshake, each bounded).

    A refused port or an unknown host is said at once (dask would retry until its timeout); a port where
    something else answers (garbage, or silence) ends within ``timeout`` instead of waiting forever.
    """
    if not (timeout > 0):
        raise ConfigError(f"The scheduler timeout must be a positive number of seconds, got {timeout}.")
    endpoint = _tcp_endpoint(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=timeout).close()
        except socket.gaierror as exc:
            raise _unreachable(address, f"unknown host '{endpoint[0]}' ({exc.strerror or exc})") from exc
        except TimeoutError as exc:
            raise _unreachable(address, f"no connection within {timeout:g} s") from exc
        except OSError as exc:
            raise _unreachable(address, (exc.strerror or str(exc)).lower()) from exc
    from distributed.comm import CommClosedError

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="pfmseg-scheduler-check") as pool:  # any caller's loop aside
            pool.submit(asyncio.run, _handshake(address, timeout)).result()
    except CommClosedError as exc:
        raise _unreachable(address, "the connection was closed before dask's handshake (whatever listens there is "
                                    "not a dask scheduler, or it refused this client)") from exc
    except TimeoutError as exc:  # asyncio.wait_for's, and dask's "Timed out trying to connect"
        raise _unreachable(address, f"no dask handshake within {timeout:g} s (whatever listens there is not a "
                                    "dask scheduler, or it is overloaded)") from exc
    except OSError as exc:
        raise _unreachable(address, " ".join(str(exc).split()) or type(exc).__name__) from exc
    except Exception as exc:  # what answers does not speak dask's protocol: garbage sizes, bad frames, ...
        raise _unreachable(address, f"what answers there does not speak dask's protocol ({type(exc).__name__}: "
                                    f"{str(exc)[:120]})") from exc


def connect_client(address: str, timeout: float = SCHEDULER_CONNECT_TIMEOUT):
    """A :class:`distributed.Client` of the scheduler at ``address``, or a one-line :class:`ConfigError`
    within about ``timeout`` seconds (see :func:`check_scheduler`)."""
    import dask
    from distributed import Client

    check_scheduler(address, timeout)
    try:
        with dask.config.set({"distributed.comm.timeouts.connect": f"{timeout}s"}):
            return Client(address, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise _unreachable(address, " ".join(str(exc).split())) from exc


def _start_local(n_workers: int | None, dashboard: str | None, env: Mapping[str, str] | None, debug: bool):
    """(cluster, client, description) of a new local cluster whose workers have all started."""
    from distributed import Client

    cluster = local_cluster(n_workers, dashboard=dashboard, env=env, debug=debug)
    try:
        client = Client(cluster)
        n = len(cluster.worker_spec)
        client.wait_for_workers(n, timeout=WORKER_START_TIMEOUT)
    except BaseException:
        close_cluster(cluster)
        raise
    gpus = {spec["options"]["env"].get("CUDA_VISIBLE_DEVICES") for spec in cluster.worker_spec.values()}
    gpus.discard(None)
    where = f"a local cluster of {n} worker process{'es' if n != 1 else ''}" + (
        f" on GPU{'s' if len(gpus) != 1 else ''} {', '.join(sorted(gpus))}" if gpus else "")
    return cluster, client, where


def _shut_down(client: Any, cluster: Any, debug: bool) -> None:
    """Client first, then the cluster: nothing of it is news to the user, so dask's loggers say only errors."""
    with dask_logging(debug, level=logging.ERROR):
        try:
            client.close(timeout=CLIENT_CLOSE_TIMEOUT)
        finally:
            if cluster is not None:
                close_cluster(cluster)


@contextmanager
def open_client(scheduler: str, *, dashboard: str | None = DEFAULT_DASHBOARD,
                env: Mapping[str, str] | None = None, announce=print, debug: bool = False,
                connect_timeout: float = SCHEDULER_CONNECT_TIMEOUT) -> Iterator[Any]:
    """A client of ``scheduler`` ("local", "local:N" or an address); a local cluster is closed afterwards.

    ``announce`` receives one line naming the cluster and its dashboard link. dask logs at WARNING
    while the client is open, at INFO with ``debug``; an address must answer within ``connect_timeout``
    seconds.
    """
    need_distributed()
    kind, value = parse_scheduler(scheduler)
    with dask_logging(debug):
        if kind == "local":
            cluster, client, where = _start_local(value, dashboard, env, debug)
        else:
            cluster, client = None, connect_client(value, connect_timeout)
        try:
            if kind != "local":
                where = f"the scheduler at {value} ({len(client.scheduler_info().get('workers', {}))} workers now)"
            announce(f"Running on {where}; dashboard: "
                     f"{describe_dashboard(client, dashboard if kind == 'local' else True)}")
            yield client
        finally:
            _shut_down(client, cluster, debug)


__all__ = ["CLIENT_CLOSE_TIMEOUT", "DEFAULT_DASHBOARD", "SCHEDULER_CONNECT_TIMEOUT", "WORKER_CLOSE_TIMEOUT",
           "check_scheduler", "close_cluster", "connect_client", "dashboard_link", "dask_logging", "local_cluster",
           "open_client", "parse_scheduler", "visible_gpus", "worker_envs"]
