"""`fuse-attn compile fused.onnx --target inf2 [--shape input_ids=1x2048] -o model.neuron.pt [--simulate]`.

Exit codes, as the fuse command's: 0 done; 1 a FlashFwd node cannot be launched (every reason
listed with its fix) or --simulate found a MISMATCH; 2 bad input or usage, a missing dependency,
or no Neuron SDK that can run flash_fwd (one line `fuse-attn: error: ...`, nothing written).
Bad input raises modelio.InputError; `fuse_attn.usage.run` prints it.
"""

from __future__ import annotations

import argparse
import sys

import onnx

from fuse_attn import modelio, verify
from fuse_attn.compile import constraints, kernel_versions, launch_cost, sbuf, shapes
from fuse_attn.compile.reference import run_onnxruntime
from fuse_attn.compile.run import attention_fn, lowered_outputs, resolve_kernel, simulate_tolerance
from fuse_attn.compile.torch_required import TorchUnavailable, require_torch
from fuse_attn.printable import printable
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
    p.add_argument("--kernel-version", choices=("auto", *kernel_versions.VERSIONS), default="auto",
                   help="the flash_fwd arithmetic --simulate follows and whose SBUF use is checked: 2.20 (bf16 scores, "
                        "mask -9984), 2.21 (fp32 scores), 2.21-swa (fp32 scores, mask fp32 min). auto (default): the "
                        f"installed SDK's kernel, else {kernel_versions.DEFAULT}")
    p.add_argument("--kernel-min-seq", type=_positive_int, metavar="N",
                   help="run FlashFwd launches shorter than N tokens as plain attention ops instead of flash_fwd "
                        f"(default: flash_fwd wherever it can run; NxD Inference's own default is "
                        f"{launch_cost.NXDI_FLASH_DEFAULT_SEQ})")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {text!r}")
    return value


def _load(path: str) -> onnx.ModelProto:
    """The model with its weights, bad input as the fuse command reports it."""
    proto = modelio.load_proto(path)
    modelio.validate(proto, path)
    modelio.load_external_data(proto, path)
    return proto


def compile_main(argv: list[str]) -> int:
    """The command: exit 0 done, 1 a launch problem or a MISMATCH, 2 bad input (one line, `fuse_attn.usage`)."""
    return run(_compile, argv)


def _compile(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.simulate and not args.output:
        raise modelio.InputError("-o/--output is required (or pass --simulate)")
    proto = _load(args.model)
    target = None
    if args.output:  # checked before anything runs, as the fuse command does
        target = modelio.check_writable_file(args.output, "output", not_over=modelio.input_files(proto, args.model))
    try:
        require_torch()  # never installed by fuse-attn: the Neuron SDK's own (2.1 or later)
    except TorchUnavailable as e:
        raise modelio.InputError(str(e)) from None
    try:
        model = shapes.fix_input_shapes(proto, shapes.parse_shape_args(args.shape))
    except shapes.ShapeError as e:
        raise modelio.InputError(str(e)) from None
    feeds = shapes.example_feeds(model, args.seed)
    version, api, origin = resolve_kernel(args.simulate, args.kernel_version)
    if not args.simulate:
        from fuse_attn.compile.trace import NeuronSDKMissing, require_neuron_sdk

        try:
            require_neuron_sdk()
        except NeuronSDKMissing as e:
            raise modelio.InputError(str(e)) from None
    plans, problems = constraints.plan_model(model, False if args.no_mixed_precision else None, feeds,
                                             args.kernel_min_seq)
    problems += [p for p in (sbuf.sbuf_problem(version, plan) for plan in plans if plan.kernel) if p]
    if problems:
        print(f"{ERROR_PREFIX}{len(problems)} FlashFwd launch problem(s):", file=sys.stderr)
        for problem in problems:
            print(printable(f"  {problem}"), file=sys.stderr)
        return 1
    print(f"flash_fwd {version} ({origin})")
    for plan in plans:
        if plan.kernel:
            use = sbuf.sbuf_use(version, plan.padded_seq, plan.seq_tile_size, plan.launch_head_dim, plan.dtype,
                                plan.attrs.mixed_precision)
            print(printable(f"{plan.describe()}; {use.describe()} per program"))
        else:
            print(printable(f"{plan.describe()}: seq {plan.seq} < --kernel-min-seq {args.kernel_min_seq}"))
        # neuronx-cc casts float32 matmuls to bf16 unless told otherwise (--auto-cast none).
        plain_bf16 = plan.dtype != "float" or args.auto_cast != "none"
        for line in launch_cost.launch_cost(plan, plain_bf16).text(plan):
            print(printable(line))
    if not plans:
        print("no FlashFwd nodes: the graph is compiled as it is")

    from fuse_attn.compile.lower import LoweringError, lower, to_torch

    attention, backend = attention_fn(args.simulate, version, api)
    print(f"attention backend: {backend}")
    try:
        module = lower(model, plans, attention)
    except LoweringError as e:
        print(printable(f"{ERROR_PREFIX}cannot lower the model: {e}"), file=sys.stderr)
        return 1

    if args.simulate:
        tolerance, why = simulate_tolerance(plans, model)
        # The padded feeds of `fuse-attn --verify`, for the inputs the key-bias columns read.
        masks, causal = verify.fused_mask_inputs(model)
        runs = [verify.Feed(verify.ALL_ONES, feeds)]
        runs += verify.padded_feeds(model, masks, causal=causal, seed=args.seed, template=feeds)
        names = [o.name for o in model.graph.output]
        results = [verify.compare_outputs(names, run_onnxruntime(model, feed.inputs), lowered_outputs(module, feed.inputs),
                                          feed, tolerance=tolerance, kind="simulate") for feed in runs]
        for line in verify.result_lines(results):
            print(printable(line))
        checks = [check for result in results for check in result.checks]
        ok = all(check.ok for check in checks)
        print(f"simulated flash_fwd {version} against onnxruntime, tolerance {why} "
              f"({tolerance[0]:g} + {tolerance[1]:g} x max|output|): {'ok' if ok else 'MISMATCH'}. This is the "
              "error flash_fwd's arithmetic adds on Inf2 (the rest of the graph as neuronx-cc compiles it, "
              "--auto-cast included, is not simulated); no Neuron trace was run"
              + (f", {args.output} not written" if args.output else ""))
        if not ok and any(plan.attrs.mixed_precision for plan in plans):
            print("with mixed precision flash_fwd multiplies in bf16, which on peaked attention (large scores) alone can "
                  "exceed bf16's tolerance; if the mismatch stays with --no-mixed-precision (flash_fwd in the model's "
                  "dtype), the kernel and the model disagree")
        return 0 if ok else 1

    from fuse_attn.compile.trace import compiler_args, trace_and_save

    cargs = compiler_args(args.target, args.auto_cast, args.auto_cast_type, args.compiler_arg)
    print(f"torch_neuronx.trace, compiler_args={cargs}")
    trace_and_save(module, tuple(to_torch(feeds[name]) for name in module.input_names), cargs, target)
    print(f"wrote {args.output}")
    return 0


def main() -> None:
    raise SystemExit(compile_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
