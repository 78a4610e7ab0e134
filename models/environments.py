"""Exporter environments: venvs the zoo creates for exporters whose pins clash with its own.

optimum-onnx pins transformers < 4.58, the TorchScript recipes want a transformers 4.x, tf2onnx
needs TensorFlow and jax2onnx JAX: none of them can share the zoo's environment (torch 2.13,
transformers 5). Each environment is a plain venv (no system site packages) under
`<zoo cache>/envs/<name>-<hash of its pins>`, created on first use and reused while the pins are
unchanged. Its exporter script (`exporters/<script>`) runs there in a subprocess; see
`exporters/_protocol.py` for what goes in and out.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXPORTER_SCRIPTS = Path(__file__).with_name("exporters")

# name -> what the venv installs (exact pins: the export's form depends on every one of them),
# the script that exports in it, and whether that script computes the framework's own outputs
# on the zoo's inputs (else the exporter validates itself, as optimum-cli does).
ENVIRONMENTS: dict[str, dict] = {
    "optimum": {
        # torch 2.13.0 resolves to the CPU build this machine kind carries; onnxruntime is what
        # optimum-cli's own validation (onnxruntime vs torch) runs on.
        "requirements": ["torch==2.13.0", "optimum-onnx==0.1.0", "optimum==2.1.0", "transformers==4.57.6",
                         "onnx==1.23.2", "onnxruntime==1.32.0"],
        "script": "optimum_cli.py",
        "reference": False,
    },
    "transformers4": {
        "requirements": ["torch==2.13.0", "transformers==4.44.2", "onnx==1.23.2"],
        "script": "torchscript_hf.py",
        "reference": True,
    },
    "tf2onnx": {
        "requirements": ["tensorflow-cpu==2.21.0", "keras==3.15.1", "tf2onnx==1.17.0", "onnx==1.23.2"],
        "script": "tf2onnx_keras.py",
        "reference": True,
    },
    "jax2onnx": {
        "requirements": ["jax2onnx==0.17.1", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "onnx==1.23.2"],
        "script": "jax2onnx_attn.py",
        "reference": True,
    },
}

_READY = "zoo-environment.json"  # written last: a venv without it is a half-built one


def env_key(name: str) -> str:
    """What the venv is built from: its pins and the Python that creates it."""
    spec = {"requirements": ENVIRONMENTS[name]["requirements"], "python": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def env_dir(name: str, cache: Path) -> Path:
    return Path(cache) / "envs" / f"{name}-{env_key(name)}"


def ensure(name: str, cache: Path, log=None) -> Path:
    """The venv's python, creating the venv first if it is not there (or half-built)."""
    root = env_dir(name, cache)
    python = root / "bin" / "python"
    if (root / _READY).exists():
        return python
    if root.exists():
        shutil.rmtree(root)
    if log is not None:
        log(f"environment {name}: creating {root} ({', '.join(ENVIRONMENTS[name]['requirements'])})")
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True, text=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *ENVIRONMENTS[name]["requirements"]], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"creating environment {name!r} failed: {' | '.join(tail)}") from None
    seconds = time.perf_counter() - t0
    (root / _READY).write_text(json.dumps({"name": name, "requirements": ENVIRONMENTS[name]["requirements"],
                                           "seconds": round(seconds, 1)}, indent=1))
    if log is not None:
        log(f"environment {name}: ready in {seconds:.0f}s")
    return python


def run_script(name: str, python: Path, spec: dict, work: Path, timeout: float = 1800) -> dict:
    """Run the environment's exporter script on `spec` in `work` (which holds inputs.npz, if any);
    the script's result.json."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1, sort_keys=True))
    script = EXPORTER_SCRIPTS / ENVIRONMENTS[name]["script"]
    proc = subprocess.run([str(python), str(script), str(spec_path), str(work)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=work)  # nothing lands beside the caller
    (work / "export.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-1:]
        raise RuntimeError(f"{ENVIRONMENTS[name]['script']} failed in environment {name!r} "
                           f"(exit {proc.returncode}): {tail[0] if tail else 'no output'} (log: {work / 'export.log'})")
    return json.loads((work / "result.json").read_text())
