"""Faults end in one clear message and lose nothing: full disks, permissions, files in the way,
vanishing slides, two writers on one output, and one slide reached by different paths."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pfmseg_engine.cli import main
from pfmseg_engine.errors import SlideError, StorageError
from pfmseg_engine.inference import predict_slide
from pfmseg_engine.storage import OutputBusyError, OutputLock, describe_os_error
from test_wsi_support import PixelModel
from testdata import CMU

REGION = (0, 0, 1024, 768)  # a part of the shipped CMU slide: real JPEG tiles, quick to predict
OPTIONS = {"window": 128, "overlap": 0.25, "chunk": 256, "tissue": False, "region": REGION}


class Stop(Exception):
    pass


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def enospc(path: str | None = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@pytest.fixture
def slide_copy(tmp_path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    return Path(shutil.copy(CMU, folder / CMU.name))


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> dict[str, bytes]:
    """The reference output of an uninterrupted run on the same slide file and settings."""
    folder = tmp_path_factory.mktemp("clean")
    slide = Path(shutil.copy(CMU, folder / CMU.name))
    result = predict_slide(PixelModel(), slide, folder / "out", **OPTIONS)
    return {"tree": tree(result.path), "path": str(slide), "name": result.path.name}


def reference_tree(clean_run, slide: Path) -> dict[str, bytes]:
    """The clean output with the slide path it records replaced by ``slide`` (metadata only)."""
    return {k: v.replace(json.dumps(clean_run["path"]).encode(), json.dumps(str(slide)).encode())
            for k, v in clean_run["tree"].items()}


# --- messages -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only"),
    (errno.ENOTDIR, "file is in the way"), (errno.ENOENT, "does not exist"), (errno.EDQUOT, "quota"),
])
def test_os_errors_read_as_one_sentence_with_path_and_remedy(code, words):
    message = describe_os_error(OSError(code, os.strerror(code)), "/data/out/slide.ome.zarr")
    assert "'/data/out/slide.ome.zarr'" in message and words in message
    assert errno.errorcode[code] in message and "\n" not in message


def test_cli_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "predictions"
    target.write_text("not a folder")
    code = main(["infer", "--slide", str(CMU), "--checkpoint", str(tmp_path / "missing.pt"),
                 "--output_dir", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and str(target) in err
    assert "Traceback" not in err and target.read_text() == "not a folder"


def test_cli_turns_any_os_error_into_one_message(monkeypatch, capsys):
    from pfmseg_engine.commands import models

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/models/table.json")

    monkeypatch.setattr(models, "run", denied)
    code = main(["models"])
    err = capsys.readouterr().err
    assert code == 2 and "'/srv/models/table.json'" in err and "permission denied" in err
    assert "Traceback" not in err
    code = main(["--debug", "models"])
    assert code == 2 and "Traceback" in capsys.readouterr().err  # --debug shows it


# --- disk full ------------------------------------------------------------------------------------
def test_disk_full_mid_slide_keeps_a_resumable_partial(slide_copy, tmp_path, monkeypatch, clean_run):
    from pfmseg_engine.labelstore import omezarr

    real_update = omezarr.update_levels
    calls = []

    def fill_up(levels, box, method):
        calls.append(box)
        if len(calls) == 3:  # level 0 of this chunk is written, its pyramid update hits a full disk
            raise enospc()
        return real_update(levels, box, method)

    monkeypatch.setattr(omezarr, "update_levels", fill_up)
    out = tmp_path / "out"
    with pytest.raises(StorageError, match="disk is full") as info:
        predict_slide(PixelModel(), slide_copy, out, **OPTIONS)
    assert str(out / clean_run["name"]) in str(info.value) and "resumes" in str(info.value)
    assert (out / f"{clean_run['name']}.partial").is_dir() and not (out / clean_run["name"]).exists()
    monkeypatch.setattr(omezarr, "update_levels", real_update)
    resumed = predict_slide(PixelModel(), slide_copy, out, **OPTIONS)
    assert resumed.resumed and 0 < resumed.chunks_run < resumed.chunks_total
    assert tree(resumed.path) == reference_tree(clean_run, slide_copy)


def test_disk_full_through_the_cli_is_one_message(slide_copy, tmp_path, monkeypatch, capsys):
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model

    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2,
                                                         input_size=64)))

    def no_space(handle, array, *args, **kwargs):
        handle.write(b"\x93NUMPY half a spill")
        raise enospc()

    monkeypatch.setattr(np, "save", no_space)  # the first spill hits a full disk
    code = main(["infer", "--slide", str(slide_copy), "--checkpoint", str(checkpoint), "--output_dir",
                 str(tmp_path / "out"), "--region", "0", "0", "512", "512", "--no-tissue", "--chunk_size", "128",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert str(tmp_path / "out") in err
    assert list((tmp_path / "out").glob("*.partial")) and not list((tmp_path / "out").glob("*.ome.zarr"))


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    from pfmseg_engine import checkpoint as ckpt
    from pfmseg_engine.model import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64))
    path = tmp_path / "checkpoints" / "best.pt"
    ckpt.save_checkpoint(path, model, metrics={"mIoU": 0.5})
    good = path.read_bytes()
    real_save = torch.save

    def half_then_full(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise enospc()

    monkeypatch.setattr(torch, "save", half_then_full)
    with torch.no_grad():
        model.head.classify.weight.add_(1.0)
    with pytest.raises(StorageError, match="disk is full") as info:
        ckpt.save_checkpoint(path, model, metrics={"mIoU": 0.9})
    assert str(path) in str(info.value)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == good and sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    assert ckpt.read_checkpoint(path)["metrics"]["mIoU"] == 0.5


def test_disk_full_during_exports_and_history_leaves_no_torn_file(tmp_path, monkeypatch):
    from pfmseg_engine.inference import export_geojson, export_ome_tiff
    from pfmseg_engine.labelstore.omezarr import write_labels
    from pfmseg_engine.training.history import History

    labels = np.zeros((300, 300), np.uint8)
    labels[50:150, 60:200] = 1
    store = write_labels(tmp_path / "labels.ome.zarr", labels, class_names=["tumour"], mpp=1.0)
    real_write_text = Path.write_text

    def full_write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise enospc()

    real_open = Path.open

    def full_open(self, mode="r", *args, **kwargs):  # the GeoJSON export streams: the disk fills mid-file
        handle = real_open(self, mode, *args, **kwargs)
        if "w" not in mode:
            return handle

        class Full:
            def __getattr__(self, name):
                return getattr(handle, name)

            def write(self, text):
                handle.write(text[: len(text) // 2])
                raise enospc()

        return Full()

    monkeypatch.setattr(Path, "open", full_open)
    with pytest.raises(StorageError, match="GeoJSON export"):
        export_geojson(store, tmp_path / "labels.geojson")
    monkeypatch.setattr(Path, "open", real_open)
    monkeypatch.setattr(Path, "write_text", full_write_text)
    history = History([{"epoch": 1, "train_loss": 0.5}])
    with pytest.raises(StorageError, match="training history"):
        history.write(tmp_path / "run")
    monkeypatch.setattr(Path, "write_text", real_write_text)
    import tifffile

    real_tiff_write = tifffile.TiffWriter.write
    monkeypatch.setattr(tifffile.TiffWriter, "write", lambda *a, **k: (_ for _ in ()).throw(enospc()))
    with pytest.raises(StorageError, match="OME-TIFF export"):
        export_ome_tiff(store, tmp_path / "labels.ome.tif")
    monkeypatch.setattr(tifffile.TiffWriter, "write", real_tiff_write)
    leftovers = [p.name for p in tmp_path.rglob("*") if p.is_file() and "labels.ome.zarr" not in str(p)]
    assert leftovers == []  # no half-written export, history or temporary file looks complete


# --- a slide that vanishes ------------------------------------------------------------------------
def test_slide_vanishing_mid_run_is_one_message_and_resumes(slide_copy, tmp_path, monkeypatch, clean_run):
    from pfmseg_engine.inference import plan as plan_module

    reader = plan_module.OffsetReader  # what a region run's plan reads its pixels through
    real_read = reader.__getitem__
    reads = []

    def vanish(self, key):
        reads.append(key)
        if len(reads) > 4:  # the file's disk goes away after a few chunks
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(slide_copy))
        return real_read(self, key)

    monkeypatch.setattr(reader, "__getitem__", vanish)
    out = tmp_path / "out"
    with pytest.raises(SlideError) as info:
        predict_slide(PixelModel(), slide_copy, out, **OPTIONS)
    message = str(info.value)
    assert str(slide_copy) in message and "does not exist" in message and "resume" in message
    monkeypatch.setattr(reader, "__getitem__", real_read)
    resumed = predict_slide(PixelModel(), slide_copy, out, **OPTIONS)
    assert resumed.resumed and tree(resumed.path) == reference_tree(clean_run, slide_copy)


# --- the same slide by another path ----------------------------------------------------------------
def test_same_slide_by_another_path_resumes_the_same_output(tmp_path, monkeypatch, clean_run):
    first = tmp_path / "mount_a" / "slides"
    second = tmp_path / "mount_b" / "archive"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    shutil.copy(CMU, first / CMU.name)
    shutil.copy(CMU, second / CMU.name)  # the same file as another mount point shows it
    out = tmp_path / "out"
    seen = []

    def interrupt(chunk):
        seen.append(chunk)
        if len(seen) == 5:
            raise Stop

    monkeypatch.chdir(first)
    with pytest.raises(Stop):
        predict_slide(PixelModel(), Path(CMU.name), out, callback=interrupt, **OPTIONS)  # a relative path
    resumed = predict_slide(PixelModel(), second / CMU.name, out, **OPTIONS)  # absolute, elsewhere
    assert resumed.resumed and resumed.chunks_run == resumed.chunks_total - 5
    assert tree(resumed.path) == reference_tree(clean_run, second / CMU.name)


def test_a_different_file_under_the_same_name_does_not_resume(tmp_path):
    from pfmseg_engine.slides import Slide
    from test_wsi_support import random_image

    a = Slide.from_array(random_image(64, 64, seed=1), mpp=1.0, name="same")
    b = Slide.from_array(random_image(64, 64, seed=2), mpp=1.0, name="same")
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(CMU, folder / "x.svs")
    other = tmp_path / "other"
    other.mkdir()
    data = bytearray(CMU.read_bytes())
    data[200:208] = b"DIFFEREN"  # another file with the same name and size
    (other / "x.svs").write_bytes(bytes(data))
    from pfmseg_engine.slides import open_slide

    with open_slide(folder / "x.svs") as one, open_slide(other / "x.svs") as two:
        assert one.content_identity()["size"] == two.content_identity()["size"]
        assert one.content_identity() != two.content_identity()
    with open_slide(folder / "x.svs") as one, open_slide(Path(os.path.relpath(folder / "x.svs"))) as rel:
        assert one.content_identity() == rel.content_identity()
    assert a.content_identity()["dimensions"] == b.content_identity()["dimensions"]


# --- two processes on one output ------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import filelock
    from test_wsi_support import PixelModel
    from pfmseg_engine.inference import predict_slide
    from pfmseg_engine.errors import PfmsegError

    slide, wait, role = sys.argv[1:4]
    if role == "holder":  # holds the output mid-run: says so, then computes once its stdin says go
        compute, held = PixelModel.forward, []

        def gated(self, x):
            if not held:
                held.append(True)
                print("COMPUTING", flush=True)
                sys.stdin.readline()
            return compute(self, x)

        PixelModel.forward = gated
    elif role == "waiter":  # says when it finds the output locked, then waits for the lock as usual
        acquire = filelock.FileLock.acquire

        def reporting(self, timeout=None, poll_interval=0.05, **kwargs):
            try:
                return acquire(self, timeout=0, poll_interval=poll_interval, **kwargs)
            except filelock.Timeout:
                print("WAITING", flush=True)
            return acquire(self, timeout=timeout, poll_interval=poll_interval, **kwargs)

        filelock.FileLock.acquire = reporting
    try:
        result = predict_slide(PixelModel(), slide, {out!r}, wait=None if wait == "none" else float(wait),
                               **{options!r})
    except PfmsegError as exc:
        print("ERROR", exc)
        sys.exit(2)
    print("DONE", result.chunks_run, result.chunks_total)
""")
#: Seconds a child process may take (importing torch on a loaded machine included): a deadlock guard only.
CHILD_TIMEOUT = 600


def _writer(slide: Path, out: Path, wait: str, role: str = "plain") -> subprocess.Popen:
    """A process predicting ``slide`` into ``out``; a "holder" stops at its first batch until its stdin
    gets a line, a "waiter" prints WAITING when the output is locked (synchronisation by pipes, not time)."""
    script = WRITER.format(tests=str(Path(__file__).parent), out=str(out), options=OPTIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, str(slide), wait, role], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _holding(process: subprocess.Popen) -> None:
    """Block until a holder process is computing, i.e. holds the output's lock (it prints nothing else first)."""
    line = process.stdout.readline()
    if line != "COMPUTING\n":
        process.kill()
        raise AssertionError(f"the first writer stopped before computing: {line!r} {process.communicate()[1]}")


def test_two_processes_on_one_output(slide_copy, tmp_path, clean_run):
    out = tmp_path / "out"
    lock = OutputLock(out / clean_run["name"])
    first = _writer(slide_copy, out, "0", role="holder")
    _holding(first)  # it holds the output until this test lets it go on
    assert lock.owner() is not None and lock.owner()["pid"] == first.pid
    second = _writer(slide_copy, out, "0")  # a double-click: stops at once, says who writes
    stdout, _ = second.communicate(timeout=CHILD_TIMEOUT)
    assert second.returncode == 2
    assert f"being written by PID {first.pid} on " in stdout and " since " in stdout
    third = _writer(slide_copy, out, "none", role="waiter")  # a cluster retry: waits, then reuses the result
    assert third.stdout.readline() == "WAITING\n"  # it found the output locked by the first, still held
    stdout_first, err_first = first.communicate("go\n", timeout=CHILD_TIMEOUT)
    stdout_third, err_third = third.communicate(timeout=CHILD_TIMEOUT)
    assert first.returncode == 0, err_first
    assert third.returncode == 0, err_third
    done, total = map(int, stdout_first.split()[1:3])
    assert done == total > 0
    assert stdout_third.split()[1] == "0"  # nothing recomputed: the first run's output was reused
    assert tree(out / clean_run["name"]) == reference_tree(clean_run, slide_copy)
    assert lock.owner() is None  # the holder removes its note; the OS lock itself died with it


def test_lock_of_a_killed_process_is_not_stale(slide_copy, tmp_path, clean_run):
    out = tmp_path / "out"
    lock = OutputLock(out / clean_run["name"])
    first = _writer(slide_copy, out, "0", role="holder")
    _holding(first)
    first.kill()
    first.communicate(timeout=CHILD_TIMEOUT)
    assert lock.owner() is not None  # its note stays behind, but the kernel released the lock
    result = predict_slide(PixelModel(), slide_copy, out, **OPTIONS)
    assert result.resumed or result.chunks_run == result.chunks_total
    assert tree(result.path) == reference_tree(clean_run, slide_copy)


def test_busy_message_names_pid_host_and_time(tmp_path):
    target = tmp_path / "slide.ome.zarr"
    with OutputLock(target):
        other = OutputLock(target, wait=0)
        code = "import sys; from pfmseg_engine.storage import OutputLock; OutputLock(sys.argv[1]).acquire()"
        run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "OutputBusyError" in run.stderr
        message = other.busy_message()
        assert f"PID {os.getpid()} on " in message and "wait=SECONDS" in message
    with OutputLock(target, wait=0):  # released: free again
        pass
    assert issubclass(OutputBusyError, StorageError)
