"""Peak memory of whole-slide inference does not grow with slide size (measured in subprocesses).

The same tissue (a fixed 2048 x 2048 px region) sits on a lazily generated 8k x 8k and 32k x 32k
slide; everything else is glass. Holding the slide, a full-size label array or a float canvas would
add gigabytes at 32k; chunked prediction must stay within 10 % of the 8k peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

SCRIPT = r"""
import json, resource, sys, time
from test_wsi_support import PixelModel
from pfmseg_engine.inference import predict_slide
from pfmseg_engine.slides.virtual import virtual_slide

size, out = int(sys.argv[1]), sys.argv[2]
slide = virtual_slide(size, size, mpp=0.25, tissue=[(3000, 5048, 2500, 4548)])
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = predict_slide(PixelModel(), slide, out, window=256, chunk=1024, batch_size=8)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak_kb / 1024, "work_mb": (peak_kb - base_kb) / 1024,
                  "chunks": result.chunks_run, "windows": result.windows_run,
                  "seconds": time.perf_counter() - start, "shape": list(result.shape)}))
"""


def measure(size: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "OMP_NUM_THREADS": "1",
           "MALLOC_ARENA_MAX": "2"}  # fewer per-thread malloc arenas: steadier peaks
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(size), str(out)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_flat_in_slide_size(tmp_path):
    small = measure(8192, tmp_path / "8k")
    large = measure(32768, tmp_path / "32k")
    assert large["shape"] == [32768, 32768] and small["windows"] == large["windows"] > 0
    assert large["peak_mb"] <= 1.10 * small["peak_mb"], (small, large)
