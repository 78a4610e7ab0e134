"""The options that say how a model is fused, shared by `fuse-attn MODEL` and `fuse-attn check`:
defined once (`add_fuse_options`), parsed and validated once (`fuse_options`), so both commands
accept the same spellings and refuse the same bad values before any model is read. The options
themselves are the pipeline's `FuseOptions`.
"""

from __future__ import annotations

import argparse

from fuse_attn.modelio import InputError
from fuse_attn.pipeline import FuseOptions
from fuse_attn.specialize import ShapeError, parse_dim_args, parse_shape_args


def as_argv(options: FuseOptions) -> list[str]:
    """The same options as command-line arguments (for `fuse_attn.commands.check_worker`)."""
    out = ["--assume-no-padding"] if options.assume_no_padding else []
    for name, shape in options.shapes.items():
        out.append(f"--shape={name}={'x'.join(map(str, shape))}")  # one token: a name may start with '-'
    for name, value in options.dims.items():
        out.append(f"--dim={name}={value}")
    return out + (["--freeze-initializer-inputs"] if options.freeze_initializer_inputs else [])


def add_fuse_options(parser: argparse.ArgumentParser, *, many_models: bool = False) -> None:
    """Add --assume-no-padding, --shape, --dim and --freeze-initializer-inputs to `parser`.
    `many_models`: a command over a folder (`check`) applies --shape/--dim to each model that has
    the input or symbol and leaves the others as they are; the help says so."""
    shape_each = " Applied to each model with that input; the others are checked as they are." if many_models else ""
    dim_each = (" Applied to each model whose inputs declare that symbol; the others are checked as they are."
                if many_models else "")
    parser.add_argument("--assume-no-padding", action="store_true",
                        help="treat graph inputs whose contents reach a mask or bias (attention_mask) as all ones")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=DxD..",
                        help="fix an input's shape before proving, e.g. input_ids=1x2048 (0 allowed: an empty past); "
                             "a symbolic dim named here is fixed on every input." + shape_each)
    parser.add_argument("--dim", action="append", default=[], metavar="SYMBOL=N",
                        help="fix a symbolic dim everywhere before proving, e.g. past_sequence_length=0 "
                             "(a KV-cache decoder's prefill)." + dim_each)
    parser.add_argument("--freeze-initializer-inputs", action="store_true",
                        help="read initializers that are also listed as graph inputs (overridable defaults) "
                             "as the constants they hold")


def fuse_options(args: argparse.Namespace) -> FuseOptions:
    """The options `add_fuse_options` added, parsed; a bad --shape or --dim is an InputError."""
    try:
        shapes, dims = parse_shape_args(args.shape, allow_zero=True), parse_dim_args(args.dim)
    except ShapeError as exc:
        raise InputError(str(exc)) from None
    return FuseOptions(assume_no_padding=args.assume_no_padding, shapes=shapes, dims=dims,
                       freeze_initializer_inputs=args.freeze_initializer_inputs)
