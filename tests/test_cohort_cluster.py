"""Cohorts on a real dask.distributed LocalCluster of two worker processes.

Workers import the stand-in model from ``test_cohort_support`` (the tests folder is on their
PYTHONPATH). Parallel runs must write exactly what serial runs write, also when a worker process is
killed mid-slide; a corrupt slide fails alone; workers are recycled after K slides.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from pfmseg_engine.distributed import SlideJob, run_cohort
from pfmseg_engine.inference import SlideInferenceConfig
from test_cohort_support import CONFIG, TESTS, load, outputs, slide_folder, summary_rows

pytest.importorskip("distributed")

WORKERS = 2
#: Seconds a cohort may take on a loaded machine: a deadlock guard, never a race decider.
GUARD = 600


@pytest.fixture(scope="module")
def client():
    from distributed import Client

    from pfmseg_engine.distributed.cluster import local_cluster

    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cluster = local_cluster(WORKERS, dashboard=None, env=env, gpus=[])
    with Client(cluster) as client:
        client.wait_for_workers(WORKERS, timeout=120)
        yield client
    cluster.close()


@pytest.fixture
def cluster_client(client):
    client.wait_for_workers(WORKERS, timeout=120)  # a previous test may have killed or recycled one
    return client


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return slide_folder(tmp_path_factory.mktemp("cohort"))


def jobs(slides: dict[str, Path], count: int = 2) -> list[SlideJob]:
    """Regions of the shipped slides (TCGA needs its mpp), named so their outputs are easy to find."""
    return [SlideJob(str(slides["cmu"]), name="cmu", region=(0, 0, 1024, 768)),
            SlideJob(str(slides["tcga"]), mpp=0.5, name="tcga", region=(512, 512, 1024, 768)),
            SlideJob(str(slides["cmu"]), name="cmu2", region=(1024, 1536, 1024, 768)),
            SlideJob(str(slides["tcga"]), mpp=0.5, name="tcga2", region=(2048, 1024, 1024, 768))][:count]


@pytest.fixture(scope="module")
def serial(slides, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Every test slide predicted in this process: the reference outputs."""
    out = tmp_path_factory.mktemp("serial")
    assert run_cohort("stand-in", jobs(slides, 4), out, SlideInferenceConfig(**CONFIG), model_loader=load).ok
    return outputs(out)


def test_parallel_outputs_match_serial_ones(cluster_client, slides, serial, tmp_path):
    cohort = run_cohort("stand-in", jobs(slides), tmp_path, SlideInferenceConfig(**CONFIG), client=cluster_client,
                        model_loader=load)
    assert [r.status for r in cohort.records] == ["done", "done"]
    assert outputs(tmp_path) == {k: serial[k] for k in ("cmu.ome.zarr", "tcga.ome.zarr")}
    assert all(r.worker and r.worker.split(":")[1] != str(os.getpid()) for r in cohort.records)  # not here
    assert [r["status"] for r in summary_rows(tmp_path)] == ["done", "done"]


def test_a_killed_worker_costs_only_a_resumed_slide(cluster_client, slides, serial, tmp_path):
    config = SlideInferenceConfig(**CONFIG)
    todo = jobs(slides, 3)
    result: dict = {}
    hold = tmp_path / "hold"
    hold.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(GUARD)  # a deadlock guard: the held worker reports long before
        checkpoint = f"hold={server.getsockname()[1]}:{hold}"

        def run():
            try:
                result["cohort"] = run_cohort(checkpoint, todo, tmp_path, config, client=cluster_client,
                                              model_loader=load)
            except BaseException as exc:  # surfaced below
                result["error"] = exc
            finally:
                if not (hold / "claimed").exists():  # no worker was held: do not leave the test waiting
                    socket.create_connection(server.getsockname()).close()

        thread = threading.Thread(target=run)
        thread.start()
        connection, _ = server.accept()  # a worker holds a slide whose first chunk is recorded on disk
        with connection:
            reported = b"".join(iter(lambda: connection.recv(64), b""))
    assert reported, result.get("error") or "the cohort ended without any worker recording a chunk"
    killed = int(reported)
    os.kill(killed, signal.SIGKILL)
    thread.join(timeout=GUARD)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    cohort = result["cohort"]
    assert cohort.ok, [r.error for r in cohort.records]
    assert any(r.resumed for r in cohort.records)  # the killed slide went on from its finished chunks
    assert all(r.worker.split(":")[1] != str(killed) for r in cohort.records)
    assert outputs(tmp_path) == {k: serial[k] for k in ("cmu.ome.zarr", "tcga.ome.zarr", "cmu2.ome.zarr")}


def test_a_corrupt_slide_fails_alone(cluster_client, slides, serial, tmp_path):
    todo = [SlideJob(str(slides["broken"]), region=(0, 0, 1024, 768)), *jobs(slides)]
    cohort = run_cohort("stand-in", todo, tmp_path, SlideInferenceConfig(**CONFIG), client=cluster_client,
                        model_loader=load, retries=1)
    assert [r.status for r in cohort.records] == ["failed", "done", "done"]
    assert "Cannot open" in cohort.records[0].error and "truncated" in cohort.records[0].error
    assert [r["status"] for r in summary_rows(tmp_path)] == ["failed", "done", "done"]
    assert outputs(tmp_path) == {k: serial[k] for k in ("cmu.ome.zarr", "tcga.ome.zarr")}
    # the rerun reuses what finished and tries the corrupt slide again
    again = run_cohort("stand-in", todo, tmp_path, SlideInferenceConfig(**CONFIG), client=cluster_client,
                       model_loader=load)
    assert [r.status for r in again.records] == ["failed", "reused", "reused"]


def test_workers_are_recycled_after_k_slides(cluster_client, slides, serial, tmp_path):
    cohort = run_cohort("stand-in", jobs(slides, 4), tmp_path, SlideInferenceConfig(**CONFIG),
                        client=cluster_client, model_loader=load, recycle_after=1)
    assert cohort.ok and [r.status for r in cohort.records] == ["done"] * 4
    assert len({r.worker for r in cohort.records}) == 4  # every slide on a fresh process
    assert outputs(tmp_path) == serial
    cluster_client.wait_for_workers(WORKERS, timeout=120)
    assert not any("pfmseg-recycle" in plugins for plugins in cluster_client.run(
        lambda dask_worker: list(dask_worker.plugins)).values())


def test_cli_on_a_local_cluster(slides, tmp_path, capfd, caplog):
    """The CLI's cluster run, and its console: only the run's own lines (capfd holds the workers' output too)."""
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.cli import main
    from pfmseg_engine.model import ModelConfig, build_model
    from test_cohort_support import manifest

    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2,
                                                         input_size=64)))
    listed = manifest(tmp_path / "m.csv", [{"slide_path": str(slides["tcga"]), "mpp": "0.5", "name": "tcga"},
                                           {"slide_path": str(slides["broken"])},
                                           {"slide_path": str(slides["cmu"]), "region": "0 0 1024 768"}])
    out = tmp_path / "out"
    code = main(["infer", "--slide", str(listed), "--checkpoint", str(checkpoint), "--output_dir", str(out),
                 "--target_mpp", "8", "--no-tissue", "--scheduler", "local:2", "--dashboard", "none",
                 "--reader", "tiffslide", "--retries", "0", "--recycle_after", "1"])
    text, err = capfd.readouterr()
    assert code == 1, text
    assert "local cluster of 2 worker processes" in text and "dashboard: off" in text
    assert "3 slides: 2 done, 1 failed" in text and "tried tiffslide (" in text and "; openslide (" not in text
    rows = summary_rows(out)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("tcga", "done"), ("broken", "failed"), ("CMU-1-Small-Region_x0_y0_1024x768", "done")]
    assert rows[1]["error"].startswith(f"Cannot open '{slides['broken']}'") and "\n" not in rows[1]["error"]
    # quiet: no dask INFO lines, no worker traceback for the expected failure, nothing at shutdown
    console = text + err + caplog.text
    for noise in ("Traceback", "INFO distributed", "Compute Failed", "CommClosedError", "still alive"):
        assert noise not in console, (noise, console)
    assert not [r for r in caplog.records if r.name.startswith("distributed") and r.levelno < logging.WARNING]
