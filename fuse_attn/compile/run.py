"""Running a lowered model: the attention each FlashFwd node runs (the simulator or flash_fwd
through the binding), the Neuron SDK's kernel version, and the comparison with onnxruntime
(`fuse-attn compile --simulate`, and the tests and benchmarks that check a lowering)."""

from __future__ import annotations

import numpy as np
import onnx

from fuse_attn import modelio, verify
from fuse_attn.compile import constraints, kernel_versions
from fuse_attn.compile.reference import run_onnxruntime


def attention_fn(simulate: bool, kernel_version: str = kernel_versions.DEFAULT, api=None):
    """The attention each FlashFwd node runs, and its description: the simulator of
    `kernel_version`, or flash_fwd through the binding (`api`, detected when not given)."""
    if simulate:
        from fuse_attn.compile.simulator import simulator_for

        return simulator_for(kernel_version), f"CPU simulator of {kernel_versions.VERSIONS[kernel_version].describe()}"
    from fuse_attn.compile.binding import detect_kernel_api, launch_flash_fwd

    api = api or detect_kernel_api()
    return (lambda q, k, v, attrs, tile: launch_flash_fwd(api, q, k, v, attrs, tile)), api.describe()


def resolve_kernel(simulate: bool, requested: str):
    """(kernel version, the installed KernelAPI or None, where the version comes from).
    Without --simulate the installed SDK must run flash_fwd (else InputError, one line)."""
    from fuse_attn.compile.binding import SDKUnusable, detect_kernel_api

    try:
        api = detect_kernel_api()
    except SDKUnusable as exc:
        if not simulate:
            raise modelio.InputError(str(exc)) from None
        if requested != "auto":
            return requested, None, "--kernel-version"
        return kernel_versions.DEFAULT, None, "the default: no Neuron SDK with flash_fwd here, --kernel-version chooses"
    if simulate and requested != "auto":
        return requested, api, "--kernel-version"
    if requested not in ("auto", api.kernel_version):
        raise modelio.InputError(f"--kernel-version {requested}: the installed SDK's flash_fwd is {api.kernel_version} "
                                 "(--kernel-version chooses only what --simulate follows)")
    return api.kernel_version, api, f"the installed SDK {api.generation}"


def simulate_tolerance(plans: list[constraints.FlashPlan], model: onnx.ModelProto) -> tuple[tuple[float, float], str]:
    """(abs, rel) allowed for |simulated - onnxruntime| <= abs + rel * max|onnxruntime|, and why:
    with mixed precision the kernel computes in bf16 and bf16's tolerance applies; without it, the
    tolerance of the model's output dtype (that of `fuse-attn --verify`)."""
    if any(plan.attrs.mixed_precision for plan in plans):
        return verify.BF16_TOLERANCE, "bf16: flash_fwd with mixed precision"
    elem = model.graph.output[0].type.tensor_type.elem_type if model.graph.output else onnx.TensorProto.FLOAT
    if elem == onnx.TensorProto.BFLOAT16:
        return verify.BF16_TOLERANCE, "bf16 outputs"
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return verify.TOLERANCES.get(dtype, verify.BF16_TOLERANCE), f"{dtype.name}: flash_fwd without mixed precision"


def lowered_outputs(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The lowered module's outputs on `feeds`, as float numpy arrays."""
    import torch

    from fuse_attn.compile.lower import to_torch

    with torch.no_grad():
        got = module(*[to_torch(feeds[name]) for name in module.input_names])
    if not isinstance(got, (list, tuple)):
        got = [got]
    return [value.float().numpy() for value in got]


def compare_with_onnxruntime(model: onnx.ModelProto, module, feeds: dict[str, np.ndarray],
                             reference: list[np.ndarray] | None = None) -> list[tuple[str, float, float]]:
    """(output, max |lowered - onnxruntime|, that over max |onnxruntime|) per graph output."""
    if reference is None:
        reference = run_onnxruntime(model, feeds)
    rows = []
    for out, ref, val in zip(model.graph.output, reference, lowered_outputs(module, feeds)):
        diff = np.abs(val.astype(np.float64) - np.asarray(ref).astype(np.float64))
        scale = float(np.abs(ref).max()) or 1.0
        rows.append((out.name, float(diff.max()), float(diff.max()) / scale))
    return rows
