"""``python -m pfmseg_engine models``."""

from __future__ import annotations

import json
import subprocess
import sys

from pfmseg_engine.backbones import ALL_SPECS, SPECS
from pfmseg_engine.cli import main


def test_models_table_lists_every_backbone(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for spec in SPECS:
        assert spec.name in out
    assert "303.4M" in out and "hf-hub:MahmoodLab/UNI" in out


def test_models_json_is_machine_readable(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert len(rows) == len(ALL_SPECS) == len(SPECS) + 1  # the PFMs and the from-scratch unet baseline
    assert by_name["uni_v2"]["params"] == 681_394_176
    assert by_name["uni_v2"]["prefix_tokens"] == 9
    assert by_name["conch_v1"]["mean"][0] == 0.48145466


def test_module_entry_point_runs_without_qt():
    code = (
        "import sys, runpy; sys.argv=['x','models','--json']; "
        "import pfmseg_engine.cli as c; c.main(['models','--json']); "
        "assert not any(m.split('.')[0] in ('napari','qtpy','PyQt6','PySide6') for m in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 1
    assert "models" in capsys.readouterr().out


def test_benchmark_reports_throughput(capsys):
    assert main(["benchmark", "--tiny", "--steps", "1", "--input_size", "32", "--batch_size", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "images/s" in out and "kaiko-vits16 (tiny) / frozen" in out


def test_engine_errors_print_one_line_and_exit_2(capsys):
    assert main(["benchmark", "--backbone", "uni_v3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Unknown backbone 'uni_v3'") and "Traceback" not in err


def test_parsing_the_command_line_and_reading_the_table_do_not_import_torch():
    code = ("import sys; from pfmseg_engine.cli import build_parser; build_parser(); "
            "from pfmseg_engine.backbones import SPECS, get_spec; get_spec('uni_v1'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
