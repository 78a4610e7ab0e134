#!/usr/bin/env bash
# Trace every zoo model's lowered module with torch-xla 2.9 on CPU (benchmarks/xla_trace.py).
# Builds its own venv: torch 2.9.0 + torch-xla 2.9.0, torch-neuronx's last XLA line. PyPI's torch
# 2.9.0 is the CUDA build (about 3 GB of wheels); it never touches the project's own torch.
#   benchmarks/xla_trace.sh [--only NAME] [--json benchmarks/xla_trace.json]
# Environment: XLA_VENV (default .venv-xla), PYTHON (default python3.10 if found, else python3),
# FUSE_ATTN_ZOO_CACHE (the zoo exports; `python -m fuse_attn.models build` makes them).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${XLA_VENV:-$repo/.venv-xla}"
python="${PYTHON:-$(command -v python3.10 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.9.0" "torch-xla==2.9.0" onnx onnxruntime numpy ml_dtypes tqdm
fi
"$venv/bin/pip" install -q --no-deps -e "$repo"
cd "$repo"
PJRT_DEVICE=CPU exec "$venv/bin/python" benchmarks/xla_trace.py --zoo-cache "${FUSE_ATTN_ZOO_CACHE:-$repo/.zoo-cache}" "$@"
