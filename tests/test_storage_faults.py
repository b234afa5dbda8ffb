"""A full disk is one line wherever it strikes: torch's wrapped checkpoint writes, reserved memmap space,
a comparison that stops at the first storage fault, and a comparison whose every row failed."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from pfmseg_engine import storage
from pfmseg_engine.cli import main
from pfmseg_engine.errors import StorageError
from pfmseg_engine.storage import OutputBusyError, reserve, storage_fault, write_failure
from test_compare import count_training, read_rows, write_config


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullAfter:
    """A file object whose disk fills after ``writes`` successful writes (as a small tmpfs does)."""

    def __init__(self, handle, writes: int):
        self.handle, self.left = handle, writes

    def write(self, data):
        if self.left <= 0:
            raise enospc()
        self.left -= 1
        return self.handle.write(data)

    def flush(self):
        return self.handle.flush()


def full_disk_save(monkeypatch, writes: int) -> list[BaseException]:
    """Make ``torch.save`` write into a disk that fills after ``writes`` writes; returns what torch raised."""
    real_save = torch.save
    raised: list[BaseException] = []

    def save(obj, handle, *args, **kwargs):
        try:
            return real_save(obj, FullAfter(handle, writes), *args, **kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(torch, "save", save)
    return raised


def one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message


# --- the checkpoint writer ------------------------------------------------------------------------
@pytest.mark.parametrize("writes", [0, 2, 8])
def test_torch_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch, writes):
    from pfmseg_engine.checkpoint import read_checkpoint, save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64))
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, model, metrics={"mIoU": 0.5})
    good = path.read_bytes()
    raised = full_disk_save(monkeypatch, writes)
    with pytest.raises(StorageError) as info:
        save_checkpoint(path, model, metrics={"mIoU": 0.9})
    if writes:  # what torch itself raises once part of the file is written: its enforce failure, not the OSError
        assert isinstance(raised[0], RuntimeError) and "inline_container" in str(raised[0])
    message = str(info.value)
    assert one_line(message) and f"'{path}'" in message and "disk is full" in message and "ENOSPC" in message
    assert "inline_container" not in message
    monkeypatch.undo()
    assert path.read_bytes() == good and [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert read_checkpoint(path)["metrics"]["mIoU"] == 0.5


def test_torch_writer_failure_without_an_os_error_is_one_line(tmp_path, monkeypatch):
    """``torch.save`` to a path reports a full disk with its own words only."""
    from pfmseg_engine.checkpoint import save_checkpoint
    from pfmseg_engine.model import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="kaiko-vits16", tiny=True, num_classes=2, input_size=64))

    def enforce_fail(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598\n"
                           "Exception raised from writeRecord at inline_container.cc:672 (most recent call first):")

    monkeypatch.setattr(torch, "save", enforce_fail)
    path = tmp_path / "best.pt"
    with pytest.raises(StorageError, match="could not be written completely") as info:
        save_checkpoint(path, model)
    assert one_line(str(info.value)) and f"'{path}'" in str(info.value) and "free space" in str(info.value)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not a write fault")))
    with pytest.raises(RuntimeError, match="not a write fault"):  # other errors keep their type
        save_checkpoint(path, model)


def test_storage_faults_are_recognised_through_torch_wrappers():
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 30 vs 0")
    wrapped.__context__ = enospc()
    fault = storage_fault(wrapped, "/runs/a/last.pt", "checkpoint")
    assert isinstance(fault, StorageError) and "'/runs/a/last.pt'" in str(fault) and "disk is full" in str(fault)
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/runs/b")
    assert "quota" in str(storage_fault(quota))
    assert "read-only" in str(storage_fault(OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/c")))
    own = StorageError("Writing x failed: the disk is full.")
    assert storage_fault(own) is own
    assert storage_fault(OutputBusyError("'x' is being written by PID 1")) is None  # one output, not the disk
    assert storage_fault(FileNotFoundError(errno.ENOENT, "missing", "/weights.bin")) is None
    assert storage_fault(RuntimeError("CUDA out of memory")) is None
    assert write_failure(ValueError("bad"), "/x", "checkpoint").__class__ is ValueError


# --- reserving space ------------------------------------------------------------------------------
def test_reserve_allocates_or_says_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "reserved.bin"
    with path.open("wb") as handle:
        handle.write(b"header")
        handle.flush()
        reserve(handle.fileno(), 6, 3_000_000)
    assert path.stat().st_size == 3_000_006 and path.read_bytes()[:6] == b"header"

    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(enospc()),
                        raising=False)
    with path.open("r+b") as handle, pytest.raises(OSError) as info:
        reserve(handle.fileno(), 0, 10)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("why", ["missing", "unsupported"])
def test_reserve_falls_back_to_checked_zero_writes(tmp_path, monkeypatch, why):
    if why == "missing":  # platforms without posix_fallocate
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:  # file systems that cannot preallocate
        monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (_ for _ in ()).throw(
            OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))), raising=False)
    real_write = os.write
    sizes: list[int] = []

    def short_writes(fd, data):  # the kernel may take part of a write: the rest is written again
        sizes.append(len(data))
        return real_write(fd, bytes(data[: max(1, len(data) // 2)]))

    monkeypatch.setattr(storage.os, "write", short_writes)
    path = tmp_path / "zeros.bin"
    path.write_bytes(b"abc")
    with path.open("r+b") as handle:
        reserve(handle.fileno(), 3, 2_500_000)
    assert path.stat().st_size == 2_500_003
    data = path.read_bytes()
    assert data[:3] == b"abc" and data[3:].count(0) == 2_500_000 and len(sizes) > 3

    monkeypatch.setattr(storage.os, "write", lambda fd, data: 0)  # nothing taken: no room
    with path.open("r+b") as handle, pytest.raises(OSError) as info:
        reserve(handle.fileno(), 0, 100)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(storage.os, "write", lambda fd, data: (_ for _ in ()).throw(enospc()))
    with path.open("r+b") as handle, pytest.raises(OSError) as info:
        reserve(handle.fileno(), 0, 100)
    assert info.value.errno == errno.ENOSPC


# --- compare --------------------------------------------------------------------------------------
def test_compare_stops_at_the_first_full_disk(slide_tile_dataset, tmp_path, monkeypatch, capsys):
    """The first checkpoint save hits a full disk: the comparison stops with one line (exit 2) instead of
    recording every remaining row as failed with torch's error; the leaderboard of what finished is written."""
    config = write_config(tmp_path, slide_tile_dataset)
    out = tmp_path / "cmp"
    calls = count_training(monkeypatch)
    full_disk_save(monkeypatch, writes=2)
    code = main(["compare", "--config", str(config), "--pfms", "kaiko-vits16,unet", "--strategies", "frozen",
                 "--seeds", "2", "--tiny", "--output_dir", str(out), "--n_bootstrap", "20", "--throughput_steps", "0",
                 "--no-progress"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(calls) == 1  # no second seed, no second backbone
    assert len(errors) == 1 and "disk is full" in errors[0] and "kaiko-vits16 / frozen seed 0" in errors[0]
    assert "last.pt" in errors[0] or "best.pt" in errors[0]
    assert "Traceback" not in captured.err + captured.out and "inline_container" not in captured.err
    rows = read_rows(out / "leaderboard.csv")
    assert sorted(r["status"] for r in rows) == ["pending", "pending"] and not any(r["error"] for r in rows)
    assert not list(out.rglob("error.txt")) and (out / "leaderboard.png").is_file()
    assert not [p for p in out.rglob("*.tmp")]


def test_compare_where_every_row_fails_writes_the_leaderboard_of_errors(slide_tile_dataset, tmp_path, capsys):
    config = write_config(tmp_path, slide_tile_dataset)
    out = tmp_path / "cmp"
    code = main(["compare", "--config", str(config), "--pfms", "phikon,lunit_vits8", "--strategies",
                 "frozen,cnn_adapter_small", "--seeds", "2", "--tiny", "--output_dir", str(out), "--weights",
                 f"phikon={tmp_path / 'missing_phikon.safetensors'}",
                 f"lunit_vits8={tmp_path / 'missing_lunit.pth'}", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err + captured.out and "FixedLocator" not in captured.err
    rows = read_rows(out / "leaderboard.csv")
    assert len(rows) == 4 and all(r["status"] == "failed" and r["rank"] == "" for r in rows)
    for row in rows:
        missing = "missing_phikon" if row["pfm"] == "phikon" else "missing_lunit"
        assert missing in row["error"] and "does not exist" in row["error"]
    markdown = (out / "leaderboard.md").read_text()
    failed = [line for line in markdown.splitlines() if line.startswith("- `")]
    assert len(failed) == 4 and all("does not exist" in line for line in failed)
    assert (out / "leaderboard.json").stat().st_size > 0 and (out / "leaderboard.png").stat().st_size > 0
    assert "4 combination(s) failed" in captured.err
