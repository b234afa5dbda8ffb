#!/usr/bin/env bash
# Every GPU question in one command, one JSON line on stdout (about 3-6 minutes on one H100; no network,
# random weights): ViT-L/16 bfloat16 slide inference end to end against model only, the live feature fill,
# LoRA and CNN-adapter training at 512 px against the model step, peak GPU memory, and labels of the GPU
# path byte for byte against the CPU path. Exits 2 with one message on stderr when no CUDA device is present.
#
#   benchmarks/gpu_check.sh [--size 16384] [--batch 128] [--workdir /scratch]     (python benchmarks/gpu_check.py -h)
#
# PYTHON chooses the interpreter (default: python). The logic lives in benchmarks/gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}/../src${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" "${here}/gpu_check.py" "$@"
