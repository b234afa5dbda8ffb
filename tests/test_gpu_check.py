"""benchmarks/gpu_check: a clean refusal without CUDA, and the whole check on the CPU with tiny models."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_exits_2_with_one_message(monkeypatch, capsys):
    import torch

    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.NO_CUDA_STATUS == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == gpu_check.NO_CUDA and "no CUDA device" in captured.err


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_the_script_refuses_without_cuda(tmp_path):
    """The shell entry point: status 2, the message on stderr, nothing on stdout (CUDA hidden from torch)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == ""
    assert "no CUDA device" in done.stderr and done.stderr.count("\n") == 1


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    gpu_check = load_gpu_check()

    def broken(*args):
        raise RuntimeError("no such kernel")

    for name in ("slide_inference", "feature_fill", "training", "identity"):
        monkeypatch.setattr(gpu_check, name, broken)
    monkeypatch.setattr(gpu_check, "vit_large", lambda tiny, window: None)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--workdir", str(tmp_path)]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["errors"]["slide"] == "RuntimeError: no such kernel"
    assert set(result["errors"]) >= {"slide", "training", "identity"}
    assert result["slide"] is None and result["feature_fill_windows_per_s"] is None and result["feature_fill_reason"]


@pytest.mark.slow
def test_tiny_run_on_the_cpu_prints_one_json_line(tmp_path, capsys):
    """Every part runs and reports its fields; the stand-in labels of the two paths are byte-identical."""
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--device", "cpu", "--tiny", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["errors"] == {}
    slide = result["slide"]
    assert slide["windows"] > 0 and slide["end_to_end_windows_per_s"] > 0 and slide["model_only_windows_per_s"] > 0
    assert slide["ratio"] == pytest.approx(slide["end_to_end_windows_per_s"] / slide["model_only_windows_per_s"],
                                           rel=0.01)
    assert set(result["training"]) == {"lora", "cnn_adapter"}
    for row in result["training"].values():
        assert row["input_px"] == 128 and row["trainer_steps_per_s"] > 0 and row["model_step_steps_per_s"] > 0
        assert row["step_over_trainer"] > 0
    assert result["identity"]["labels_identical"] is True
    assert 0.0 <= result["identity"]["vit_label_agreement_vs_cpu_float32"] <= 1.0
    assert "peak_gpu_memory_gib" in result and result["peak_gpu_memory_gib"] is None  # no GPU memory on the CPU
    if result["feature_fill"] is None:
        assert result["feature_fill_windows_per_s"] is None and result["feature_fill_reason"]
    else:
        assert result["feature_fill_windows_per_s"] == result["feature_fill"]["as_stored"]["fill_windows_per_s"] > 0
