"""What every exporter script shares. These scripts run inside an exporter's own venv (see
`fuse_attn.models.environments`), so they import nothing from fuse_attn.

    python SCRIPT.py SPEC.json OUT_DIR

SPEC.json: the manifest entry's `params`. OUT_DIR holds `inputs.npz` (written by the zoo
before the run: the example inputs, by name). The script writes its ONNX file(s) into OUT_DIR,
`reference.npz` (the framework's own outputs on those inputs, `out0`, `out1`, ...) when it
computes them, and `result.json`: {"files": [...], "versions": {...}, "reference": bool}.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path


def args() -> tuple[dict, Path]:
    spec_path, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    return json.loads(Path(spec_path).read_text()), out_dir


def load_inputs(out_dir: Path) -> dict:
    import numpy as np

    path = out_dir / "inputs.npz"
    if not path.exists():
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def save_reference(out_dir: Path, outputs: list) -> None:
    import numpy as np

    np.savez(out_dir / "reference.npz", **{f"out{i}": np.asarray(o) for i, o in enumerate(outputs)})


def finish(out_dir: Path, files: list[str], packages: list[str], reference: bool, **extra) -> None:
    versions = {}
    for p in packages:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "missing"
    result = {"files": files, "versions": versions, "reference": reference, **extra}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
