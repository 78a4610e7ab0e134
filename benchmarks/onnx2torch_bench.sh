#!/usr/bin/env bash
# onnx2torch against compile's own lowering (benchmarks/onnx2torch_bench.py), in a venv of its own
# shaped like a Neuron one: Python 3.10 and torch 2.9.0 (torch-neuronx's last XLA line; PyPI's
# 2.9.0 is the CUDA build, about 3 GB of wheels). It never touches the project's venv.
#   benchmarks/onnx2torch_bench.sh [--skip-zoo] [--only MODEL] [--json benchmarks/onnx2torch.json]
# Environment: ONNX2TORCH_VENV (default .venv-onnx2torch), PYTHON (default python3.10 if found),
# FUSE_ATTN_ZOO_CACHE (the zoo exports; `python -m fuse_attn.models build` makes them).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${ONNX2TORCH_VENV:-$repo/.venv-onnx2torch}"
python="${PYTHON:-$(command -v python3.10 || command -v python3)}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.9.0" onnx onnxruntime numpy ml_dtypes tqdm
fi
if ! "$venv/bin/python" -c "import onnx2torch" 2>/dev/null; then
    # What `pip install onnx2torch` does to a venv holding Neuron's torch (it requires torchvision,
    # whose newer releases pin newer torches): recorded before installing it.
    "$venv/bin/pip" install -q --dry-run --report "$venv/onnx2torch-install-report.json" onnx2torch
    "$venv/bin/pip" install -q onnx2torch "torchvision==0.24.0"  # torch 2.9.0's torchvision
fi
"$venv/bin/pip" install -q --no-deps -e "$repo"
cd "$repo"
exec "$venv/bin/python" benchmarks/onnx2torch_bench.py --install-report "$venv/onnx2torch-install-report.json" "$@"
