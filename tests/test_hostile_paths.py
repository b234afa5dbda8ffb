"""Inputs that are not regular files: refused with one line, before anything opens them.

Opening a named pipe for reading waits for a writer forever, so each check here would hang, not fail,
if a reader were reached first; the refusal must come from ``stat`` alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pfmseg_engine.checkpoint import read_checkpoint
from pfmseg_engine.cli import main
from pfmseg_engine.distributed import SlideJob, collect_slides, run_cohort
from pfmseg_engine.distributed.jobs import SlideFailure, slide_task
from pfmseg_engine.errors import CheckpointError, ConfigError, DataError, SlideError
from pfmseg_engine.inference import SlideInferenceConfig
from pfmseg_engine.paths import check_input_path, describe_path_problem
from pfmseg_engine.slides import open_slide
from pfmseg_engine.training.config import load_config
from test_cohort_support import CONFIG, load, summary_rows
from testdata import CMU

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes and sockets are POSIX")


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def loop(path: Path) -> Path:
    """A link that points at itself through a second link: resolving it never ends."""
    other = path.with_name(path.name + ".other")
    os.symlink(other, path)
    os.symlink(path, other)
    return path


def dangling(path: Path) -> Path:
    os.symlink(path.with_name("gone.svs"), path)
    return path


def char_device(path: Path) -> Path:
    """A link to /dev/zero, a character device that never ends when read."""
    os.symlink("/dev/zero", path)
    return path


@pytest.fixture
def unix_socket(tmp_path) -> Iterator[Callable[[Path], Path]]:
    """Makes a listening UNIX socket at a path (closed after the test)."""
    made = []

    def make(path: Path) -> Path:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        made.append(server)
        return path

    yield make
    for server in made:
        server.close()


HOSTILE = {"fifo": (fifo, "named pipe (FIFO)"), "loop": (loop, "symbolic link loop"),
           "dangling": (dangling, "symbolic link to"), "device": (char_device, "character device")}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_open_slide_refuses_what_is_not_a_file(kind, tmp_path):
    make, said = HOSTILE[kind]
    path = make(tmp_path / "slide.svs")
    with pytest.raises(SlideError) as caught:
        open_slide(path, mpp=0.5)
    message = str(caught.value)
    assert said in message and str(path) in message and "\n" not in message


def test_sockets_folders_and_missing_files_are_named(tmp_path, unix_socket):
    sock = unix_socket(tmp_path / "s.svs")
    assert "is a socket" in describe_path_problem(sock)
    assert "is a folder" in describe_path_problem(tmp_path)
    assert describe_path_problem(tmp_path, folders=True) is None  # zarr stores and DICOM series are folders
    with pytest.raises(DataError, match=r"'.*missing\.geojson' does not exist; give a GeoJSON\.$"):
        check_input_path(tmp_path / "missing.geojson", "ROI", hint="give a GeoJSON")
    regular = tmp_path / "a.txt"
    regular.write_text("x")
    assert check_input_path(regular, "Input") == regular
    linked = tmp_path / "link.txt"
    linked.symlink_to(regular)
    assert check_input_path(linked, "Input") == linked  # a link to a regular file is that file


def test_a_folder_with_a_loop_and_a_pipe_finishes_the_cohort(tmp_path):
    folder = tmp_path / "cohort"
    folder.mkdir()
    shutil.copy(CMU, folder / "a_good.svs")
    loop(folder / "b_loop.svs")
    fifo(folder / "c_pipe.svs")
    jobs = collect_slides([folder], region=(0, 0, 512, 512))  # listed by name: nothing is opened here
    assert [Path(j.path).name for j in jobs] == ["a_good.svs", "b_loop.svs", "c_pipe.svs"]
    out = tmp_path / "out"
    cohort = run_cohort("stand-in", jobs, out, SlideInferenceConfig(**CONFIG), model_loader=load, retries=0)
    assert [r.status for r in cohort.records] == ["done", "failed", "failed"]
    rows = summary_rows(out)
    assert [r["status"] for r in rows] == ["done", "failed", "failed"]
    assert "symbolic link loop" in rows[1]["error"] and "named pipe (FIFO)" in rows[2]["error"]
    assert all(str(folder) in row["error"] for row in rows[1:])


def test_a_listed_pipe_or_loop_never_stops_the_listing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loop(tmp_path / "x.svs")
    fifo(tmp_path / "y.ndpi")
    assert [Path(j.path).name for j in collect_slides(["x.svs", "*.ndpi"])] == ["x.svs", "y.ndpi"]
    with pytest.raises(ConfigError, match=r"Manifest .* is a named pipe"):
        collect_slides([fifo(tmp_path / "m.csv")])


def test_cli_refuses_a_pipe_as_checkpoint_or_config_in_one_line(tmp_path, capsys):
    pipe = fifo(tmp_path / "model.pt")
    code = main(["infer", "--slide", str(CMU), "--checkpoint", str(pipe), "--output_dir", str(tmp_path / "out"),
                 "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: Checkpoint") and "named pipe" in err and "\n" not in err
    with pytest.raises(ConfigError, match=r"Config file .* is a named pipe"):
        load_config(fifo(tmp_path / "config.yaml"))
    with pytest.raises(CheckpointError, match=r"is .* a symbolic link loop"):
        read_checkpoint(loop(tmp_path / "best.pt"))


def test_a_cluster_task_returns_its_expected_failure_and_raises_a_bug(tmp_path, caplog):
    job = SlideJob(str(fifo(tmp_path / "p.svs")))
    with caplog.at_level(logging.WARNING):
        failure = slide_task(job, "stand-in", tmp_path / "out", CONFIG, model_loader=load, retries=2)
    assert isinstance(failure, SlideFailure) and "named pipe (FIFO)" in failure.error
    assert isinstance(failure.as_exception(), SlideError) and str(failure.as_exception()) == failure.error
    assert caplog.text.count("retrying") == 2

    def broken_loader(checkpoint, weights, device):
        raise RuntimeError("a bug, not a slide's fault")

    with pytest.raises(RuntimeError, match="a bug"):  # raised, so dask retries and reports it
        slide_task(job, "other", tmp_path / "out", CONFIG, model_loader=broken_loader)
