"""--verify: run the original and the fused model in onnxruntime on the same random inputs."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx

# Per dtype: (abs, rel) — allowed |fused - original| <= abs + rel * max|original|.
TOLERANCES = {
    np.dtype(np.float32): (1e-4, 1e-4),
    np.dtype(np.float64): (1e-6, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-2),
}
BF16_TOLERANCE = (3e-2, 2e-2)
SYMBOLIC_BATCH, SYMBOLIC_SEQ = 1, 128


@dataclasses.dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    tolerance: float
    kind: str = "verify"  # what compared: `fuse-attn --verify`, or `compile --simulate`

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"{self.kind} {self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
                f"(tolerance {self.tolerance:.3g}) {verdict}")


# Ops that pass index values through unchanged: TorchScript exports Reshape input_ids before the
# embedding's Gather.
_INDEX_PRESERVING = {"Reshape", "Identity", "Cast", "Unsqueeze", "Squeeze", "Flatten"}


def _gather_rows(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs used as Gather indices (token ids), directly or through ops that keep
    their values (Reshape, Cast...): the table's row count."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) > 1:
            dims = tables.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if dims:
                index = node.input[1]
                seen = set()
                while index in producers and producers[index].op_type in _INDEX_PRESERVING and index not in seen:
                    seen.add(index)
                    index = producers[index].input[0]
                rows[index] = min(rows.get(index, dims[axis]), dims[axis])
    return rows


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids within the vocabulary, all-ones integer masks, normal floats; symbolic dims
    get batch 1 and seq 128."""
    rng = np.random.default_rng(seed)
    rows = _gather_rows(model)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (SYMBOLIC_BATCH if i == 0 else SYMBOLIC_SEQ)
                 for i, d in enumerate(tensor_type.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating) or tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif value.name in rows:
            feeds[value.name] = rng.integers(0, rows[value.name], size=shape).astype(dtype)
        else:
            feeds[value.name] = np.ones(shape, dtype=dtype)
    return feeds


def _session(proto: onnx.ModelProto, base_dir: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if base_dir is not None:
        # External data resolves against this folder, as it would beside a model file there:
        # nothing is written next to the user's model (its folder may be read-only).
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.path.abspath(base_dir))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare(original: onnx.ModelProto, fused: onnx.ModelProto, feeds: dict[str, np.ndarray],
            base_dir: str | None = None) -> list[OutputCheck]:
    expected = _session(original, base_dir).run(None, feeds)
    actual = _session(fused, base_dir).run(None, feeds)
    checks = []
    for out, want, got in zip(original.graph.output, expected, actual):
        want, got = np.asarray(want), np.asarray(got)
        if want.dtype.kind not in "fc":
            checks.append(OutputCheck(out.name, float(np.abs(want.astype(np.int64) - got.astype(np.int64)).max(initial=0)), 0.0, 0.0))
            continue
        atol, rtol = TOLERANCES.get(want.dtype, BF16_TOLERANCE)
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        diff = np.abs(want64 - got64)
        both_nan = np.isnan(want64) & np.isnan(got64)
        diff[both_nan] = 0.0
        scale = float(np.abs(want64[~np.isnan(want64)]).max(initial=0.0))
        max_abs = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
        checks.append(OutputCheck(out.name, max_abs, max_abs / scale if scale else max_abs, atol + rtol * scale))
    return checks
