"""Cohort inputs (files, globs, folders, manifests), the run summary and the cluster settings: no model runs."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pfmseg_engine.distributed import CohortSummary, SlideJob, SlideRecord, collect_slides, read_manifest
from pfmseg_engine.errors import ConfigError, SlideError
from test_cohort_support import manifest, summary_rows


@pytest.fixture
def cohort(tmp_path) -> Path:
    """Empty stand-in slide files: inputs are only listed here, never opened."""
    root = tmp_path / "cohort"
    (root / "sub").mkdir(parents=True)
    for name in ("a.svs", "b.ndpi", "c.tif", "notes.txt", ".hidden.svs", "sub/d.svs", "sub/e.mrxs"):
        (root / name).write_bytes(b"")
    (root / "store.zarr").mkdir()
    (root / "store.zarr" / ".zgroup").write_text("{}")
    (root / "dicom_series").mkdir()
    (root / "dicom_series" / "1.dcm").write_bytes(b"")
    return root


def test_folder_lists_its_slides_by_suffix(cohort):
    jobs = collect_slides([cohort])
    assert [Path(j.path).name for j in jobs] == ["a.svs", "b.ndpi", "c.tif", "dicom_series", "store.zarr"]
    assert all(Path(j.path).is_absolute() for j in jobs)


def test_globs_files_and_relative_paths(cohort, monkeypatch):
    monkeypatch.chdir(cohort)
    jobs = collect_slides(["sub/*.svs", "**/*.mrxs", "a.svs"], mpp=0.25, region=[0, 0, 64, 32])
    assert [Path(j.path).relative_to(cohort).as_posix() for j in jobs] == ["sub/d.svs", "sub/e.mrxs", "a.svs"]
    assert all(j.mpp == 0.25 and j.region == (0, 0, 64, 32) for j in jobs)
    with pytest.raises(ConfigError, match="matches no file"):
        collect_slides(["*.czi"])
    with pytest.raises(SlideError, match="does not exist"):
        collect_slides(["missing.svs"])
    (cohort / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no slides"):
        collect_slides([cohort / "empty"])


def test_manifest_columns_and_relative_paths(cohort, tmp_path):
    path = manifest(cohort / "sub" / "cohort.csv", [
        {"slide_path": "d.svs", "mpp": "0.5", "name": "case-d", "target_mpp": "2", "diagnosis": "ignored"},
        {"slide_path": "../a.svs", "region": "10 20 300 400"},
        {"slide_path": str(cohort / "b.ndpi"), "region": "1,2,3,4", "mpp": ""},
        {"slide_path": "missing.svs"},  # listed slides are checked when they run: one missing slide fails alone
    ])
    jobs = read_manifest(path)
    assert jobs[0] == SlideJob(path=str(cohort / "sub" / "d.svs"), mpp=0.5, name="case-d", target_mpp=2.0,
                               source="cohort.csv:2")
    assert Path(jobs[1].path).resolve() == (cohort / "a.svs").resolve() and jobs[1].region == (10, 20, 300, 400)
    assert jobs[2].region == (1, 2, 3, 4) and jobs[2].mpp is None
    assert jobs[3].path == str(cohort / "sub" / "missing.svs")
    # a manifest's values win over the run's defaults, which fill what it leaves out
    mixed = collect_slides([path], mpp=0.25, target_mpp=1.0)
    assert [(j.mpp, j.target_mpp) for j in mixed] == [(0.5, 2.0), (0.25, 1.0), (0.25, 1.0), (0.25, 1.0)]


@pytest.mark.parametrize(("text", "words"), [
    ("path,mpp\na.svs,0.5\n", "no 'slide_path' column \\(columns: path, mpp\\)"),
    ("slide_path,mpp\na.svs,fast\n", "line 2: mpp 'fast'"),
    ("slide_path,region\na.svs,1 2 3\n", "line 2: '1 2 3' is not a region"),
    ("slide_path,region\na.svs,0 0 -5 5\n", "positive width"),
    ("slide_path,name\na.svs,x/y\n", "plain file name"),
    ("slide_path,mpp\na.svs,0.5\n,0.5\n", "line 3: the slide_path cell is empty"),
    ("slide_path,mpp\n", "lists no slides"),
])
def test_bad_manifests_name_the_line_and_the_fix(tmp_path, text, words):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        read_manifest(path)


def test_duplicates_are_dropped_with_a_warning_and_name_clashes_refused(cohort, tmp_path, caplog):
    path = manifest(tmp_path / "m.csv", [{"slide_path": str(cohort / "a.svs")}])
    with caplog.at_level(logging.WARNING):
        jobs = collect_slides([cohort / "a.svs", path, cohort, str(cohort / "a.*")])
    assert [Path(j.path).name for j in jobs] == ["a.svs", "b.ndpi", "c.tif", "dicom_series", "store.zarr"]
    assert "listed more than once" in caplog.text and "a.svs" in caplog.text
    # a manifest row's settings fill in what another listing of the same slide lacks
    settings = manifest(tmp_path / "s.csv", [{"slide_path": str(cohort / "b.ndpi"), "mpp": "0.5", "name": "bee"}])
    with caplog.at_level(logging.WARNING):
        merged = collect_slides([cohort, settings], mpp=0.25)
    assert [(Path(j.path).name, j.mpp, j.name) for j in merged][:3] == [
        ("a.svs", 0.25, None), ("b.ndpi", 0.5, "bee"), ("c.tif", 0.25, None)]
    # the same slide with two regions is two jobs
    assert len(collect_slides([SlideJob(str(cohort / "a.svs"), region=(0, 0, 8, 8)),
                               SlideJob(str(cohort / "a.svs"), region=(8, 0, 8, 8))])) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.svs").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"would both write 'a\.ome\.zarr'.*'name' column"):
        collect_slides([cohort / "a.svs", other / "a.svs"])


def test_summary_files(tmp_path):
    records = [
        SlideRecord(slide="/d/a.svs", name="a", status="done", seconds=12.345, tissue_mm2=3.14159, chunks_run=4,
                    chunks_total=4, windows=40, windows_per_s=3.24, output="/o/a.ome.zarr", worker="h:1"),
        SlideRecord(slide="/d/b.svs", name="b", status="reused", seconds=0.5, chunks_run=0, chunks_total=4,
                    windows=0, output="/o/b.ome.zarr"),
        SlideRecord.from_error("/d/c.svs", "c", SlideError("Cannot open '/d/c.svs':\n truncated | corrupt")),
    ]
    summary = CohortSummary(records, tmp_path, seconds=13.0, settings={"retries": 1})
    assert not summary.ok and [r.name for r in summary.failed] == ["c"]
    assert summary.counts == {"done": 1, "reused": 1, "failed": 1, "pending": 0}
    paths = summary.write()
    assert sorted(p.name for p in paths.values()) == ["summary.csv", "summary.json", "summary.md"]
    rows = summary_rows(tmp_path)
    assert [r["status"] for r in rows] == ["done", "reused", "failed"]
    assert rows[0]["tissue_mm2"] == "3.1416" and rows[0]["windows_per_s"] == "3.2" and rows[1]["tissue_mm2"] == ""
    assert rows[2]["error"] == "Cannot open '/d/c.svs': truncated | corrupt"  # one line
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["counts"]["failed"] == 1 and data["settings"] == {"retries": 1} and len(data["slides"]) == 3
    text = (tmp_path / "summary.md").read_text()
    assert "3 slides: 1 done, 1 reused, 1 failed" in text and "## Failed" in text
    assert "truncated \\| corrupt" in text and "| a | done | 12.3 | 3.14 | 4/4 | 3.2 |" in text
    assert not list(tmp_path.glob(".*tmp"))


def test_scheduler_and_worker_settings():
    from pfmseg_engine.distributed.cluster import parse_scheduler, worker_envs

    assert parse_scheduler("local") == ("local", None) and parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://node1:8786") == ("address", "tcp://node1:8786")
    with pytest.raises(ConfigError, match="local:N"):
        parse_scheduler("local:zero")
    # one worker per GPU, pinned; the CPU cores shared out
    envs = worker_envs(None, ["0", "1", "3"], {"PYTHONPATH": "/x"}, cores=12)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "3"]
    assert all(e["OMP_NUM_THREADS"] == "4" and e["PYTHONPATH"] == "/x" for e in envs)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(4, ["0", "1"], cores=8)] == ["0", "1", "0", "1"]
    cpu = worker_envs(None, [], cores=8)
    assert len(cpu) == 4 and "CUDA_VISIBLE_DEVICES" not in cpu[0] and cpu[0]["OMP_NUM_THREADS"] == "2"
    assert len(worker_envs(None, [], cores=1)) == 1


@contextlib.contextmanager
def not_a_scheduler(reply: bytes) -> Iterator[tuple[str, threading.Event]]:
    """A TCP server on 127.0.0.1 that is not dask: it sends ``reply`` (b"": nothing) on every connection and
    keeps it open until the block ends. Yields its address and an event set once a client connected."""
    server = socket.create_server(("127.0.0.1", 0))
    address = server.getsockname()
    connected, done = threading.Event(), threading.Event()

    def serve() -> None:
        held = []
        with server:
            while not done.is_set():
                connection, _ = server.accept()
                held.append(connection)
                connected.set()
                if reply:
                    connection.sendall(reply)
        for connection in held:
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://{address[0]}:{address[1]}", connected
    finally:
        done.set()
        socket.create_connection(address).close()  # wakes the server's accept, which then sees `done`
        thread.join()


@pytest.mark.parametrize(("reply", "reason"), [
    (b"", "no dask handshake within 2 s"),  # accepts and never answers: dask alone would wait forever
    (b"\xff" * 64, "does not speak dask's protocol"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "does not speak dask's protocol"),
])
def test_a_port_where_something_else_answers_fails_with_the_reason(reply, reason):
    pytest.importorskip("distributed")
    from pfmseg_engine.distributed.cluster import open_client

    with not_a_scheduler(reply) as (address, connected):
        with pytest.raises(ConfigError) as caught, open_client(address, connect_timeout=2):
            pytest.fail("connected to something that is not a dask scheduler")
        assert connected.is_set()
    message = str(caught.value)
    assert message.startswith(f"Could not reach a dask scheduler at '{address}': ") and reason in message
    assert message.endswith("or use a local cluster (local:N).") and "\n" not in message


def test_a_refused_port_or_unknown_host_is_said_at_once():
    pytest.importorskip("distributed")
    from pfmseg_engine.distributed.cluster import check_scheduler

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(ConfigError, match=re.escape(f"scheduler at 'tcp://127.0.0.1:{port}': connection refused;")):
        check_scheduler(f"tcp://127.0.0.1:{port}", timeout=60)  # refused: no waiting for the timeout
    with pytest.raises(ConfigError, match=re.escape("unknown host 'no-such-host.invalid'")):
        check_scheduler("tcp://no-such-host.invalid:8786", timeout=60)
    with pytest.raises(ConfigError, match="positive number of seconds"):
        check_scheduler("tcp://127.0.0.1:8786", timeout=0)
    with pytest.raises(ConfigError, match="is not a scheduler address"):
        check_scheduler("tcp://127.0.0.1:port", timeout=60)


@pytest.mark.parametrize("debug", [False, True])
def test_dask_logs_at_warning_unless_debugging(debug):
    pytest.importorskip("distributed")
    from pfmseg_engine.distributed.cluster import dask_logging

    logger = logging.getLogger("distributed")
    before = logger.level
    logger.setLevel(logging.INFO)  # what dask's own configuration sets
    try:
        with dask_logging(debug):
            assert logging.getLogger("distributed.nanny").isEnabledFor(logging.INFO) == debug
            assert logging.getLogger("distributed.nanny").isEnabledFor(logging.WARNING)
        assert logger.level == logging.INFO  # restored
    finally:
        logger.setLevel(before)
