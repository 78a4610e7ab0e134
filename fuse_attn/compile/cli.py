"""`fuse-attn compile fused.onnx --target inf2 [--shape input_ids=1x2048] -o model.neuron.pt [--simulate]`.

Exit codes: 0 done; 1 a FlashFwd node cannot be launched (every reason listed with its fix);
2 bad input or usage (a --shape that does not fit, no -o) or the Neuron SDK is missing.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import onnx

from fuse_attn.compile import constraints, shapes
from fuse_attn.modelio import InputError
from fuse_attn.usage import ERROR_PREFIX, ArgumentParser, run

TARGETS = ("inf2", "trn1", "trn1n", "trn2")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fuse-attn compile", description=(
        "Lower a fused ONNX model to PyTorch, bind each FlashFwd node to NKI flash_fwd, and trace it "
        "with torch-neuronx into a TorchScript module holding the NEFF."))
    p.add_argument("model", help="the fused .onnx model (output of `fuse-attn`)")
    p.add_argument("--target", choices=TARGETS, default="inf2", help="neuronx-cc --target (default inf2)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DxD..",
                   help="fix an input's shape, e.g. input_ids=1x2048; a symbolic dim named here is fixed on every input")
    p.add_argument("-o", "--output", help="where to torch.jit.save the traced module (required without --simulate)")
    p.add_argument("--simulate", action="store_true",
                   help="everything but the Neuron trace, on CPU: flash_fwd simulated, compared with onnxruntime")
    p.add_argument("--no-mixed-precision", action="store_true",
                   help="run flash_fwd with mixed_precision=False (intermediates in the IO dtype, not bf16)")
    p.add_argument("--auto-cast", choices=("none", "matmult", "all"), help="neuronx-cc --auto-cast")
    p.add_argument("--auto-cast-type", choices=("bf16", "fp16", "tf32", "fp8_e4m3"), help="neuronx-cc --auto-cast-type")
    p.add_argument("--compiler-arg", action="append", default=[], metavar="ARG",
                   help="one more argument passed to neuronx-cc as is (repeatable); a value that starts "
                        "with '-' needs the '=': --compiler-arg=--optlevel=1")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    return p


def attention_fn(simulate: bool):
    """The attention each FlashFwd node runs: the simulator, or flash_fwd through the binding."""
    if simulate:
        from fuse_attn.compile.simulator import simulate_node

        return simulate_node, "CPU simulator of flash_fwd"
    from fuse_attn.compile.binding import detect_kernel_api, launch_flash_fwd

    api = detect_kernel_api()
    return (lambda q, k, v, attrs, tile: launch_flash_fwd(api, q, k, v, attrs, tile)), f"NKI flash_fwd, SDK call style {api.style}"


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def compare_with_onnxruntime(model: onnx.ModelProto, module, feeds: dict[str, np.ndarray],
                             reference: list[np.ndarray] | None = None) -> list[tuple[str, float, float]]:
    """(output, max |lowered - onnxruntime|, that over max |onnxruntime|) per graph output."""
    import torch

    if reference is None:
        reference = run_onnxruntime(model, feeds)
    # onnx2pytorch's ops index with lists, which torch warns about on every call: not the user's concern.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="onnx2pytorch")
        got = module(*[torch.from_numpy(feeds[name]) for name in module.input_names])
    if not isinstance(got, (list, tuple)):
        got = [got]
    rows = []
    for out, ref, val in zip(model.graph.output, reference, got):
        diff = np.abs(val.float().numpy().astype(np.float64) - ref.astype(np.float64))
        scale = float(np.abs(ref).max()) or 1.0
        rows.append((out.name, float(diff.max()), float(diff.max()) / scale))
    return rows


def compile_main(argv: list[str]) -> int:
    """The command: exit 0 done, 1 a launch problem, 2 bad input (one line, `fuse_attn.usage`)."""
    return run(_compile, argv)


def _compile(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.simulate and not args.output:
        raise InputError("-o/--output is required (or pass --simulate)")
    try:
        model = shapes.fix_input_shapes(onnx.load(args.model), shapes.parse_shape_args(args.shape))
    except shapes.ShapeError as e:
        raise InputError(str(e)) from None
    feeds = shapes.example_feeds(model, args.seed)
    plans, problems = constraints.plan_model(model, False if args.no_mixed_precision else None, feeds)
    if problems:
        print(f"{ERROR_PREFIX}{len(problems)} FlashFwd launch problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if not args.simulate:
        from fuse_attn.compile.trace import NeuronSDKMissing, require_neuron_sdk

        try:
            require_neuron_sdk()
        except NeuronSDKMissing as e:
            raise InputError(str(e)) from None
    for plan in plans:
        print(plan.describe())
    if not plans:
        print("no FlashFwd nodes: the graph is compiled as it is")

    from fuse_attn.compile.lower import lower

    attention, backend = attention_fn(args.simulate)
    print(f"attention backend: {backend}")
    module = lower(model, plans, attention)

    if args.simulate:
        for name, abs_err, rel_err in compare_with_onnxruntime(model, module, feeds):
            print(f"output {name}: max |simulated - onnxruntime| = {abs_err:.3g} ({rel_err:.3g} of max |output|)")
        print("simulated: this is the error flash_fwd's arithmetic adds on Inf2 (the rest of the graph as "
              "neuronx-cc compiles it, --auto-cast included, is not simulated); no Neuron trace was run"
              + (f", {args.output} not written" if args.output else ""))
        return 0

    import torch

    from fuse_attn.compile.trace import compiler_args, trace_and_save

    cargs = compiler_args(args.target, args.auto_cast, args.auto_cast_type, args.compiler_arg)
    print(f"torch_neuronx.trace, compiler_args={cargs}")
    trace_and_save(module, tuple(torch.from_numpy(feeds[name]) for name in module.input_names), cargs, args.output)
    print(f"wrote {args.output}")
    return 0


def main() -> None:
    raise SystemExit(compile_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
