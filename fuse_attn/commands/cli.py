"""fuse-attn command line: `fuse-attn MODEL -o OUT`, `fuse-attn compile ...`, `fuse-attn zoo`, `fuse-attn check`.

Exit codes: 0 done, 1 verification failed, 2 bad input or usage. Errors are one line on
stderr, the same prefix for every command (`fuse_attn.usage`; FUSE_ATTN_DEBUG=1 adds the
traceback); every path is checked first, then all outputs are written in one step.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from fuse_attn import __version__
    from fuse_attn.commands.fuse_options import add_fuse_options
    from fuse_attn.usage import ArgumentParser

    parser = ArgumentParser(
        prog="fuse-attn",
        description="Fuse every attention block of an ONNX model into one FlashFwd op (NKI flash_fwd). "
                    "Also: 'fuse-attn compile FUSED.onnx ...' (Inf2), 'fuse-attn zoo' (regression suite), "
                    "'fuse-attn check DIR_OR_FILES...' (fuse and verify your own models).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("model", help="the ONNX model to fuse")
    parser.add_argument("-o", "--output", required=True, help="where to write the fused model")
    parser.add_argument("--report", metavar="JSON",
                        help="also write the report as JSON to this file ('-': stdout, the other lines go to "
                             "stderr); an existing file is replaced only if it is an earlier fuse-attn report")
    parser.add_argument("--verify", action="store_true",
                        help="run original and fused model in onnxruntime on the same random inputs")
    add_fuse_options(parser)
    parser.add_argument("--in-place", action="store_true", help="allow the output to overwrite the input")
    parser.add_argument("--link-external-data", action="store_true",
                        help="with the output in another folder, hard-link external weight files beside it "
                             "instead of copying them (onnxruntime loads that; onnx.load refuses linked data)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    return parser


def _fuse_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from fuse_attn import modelio, verify
    from fuse_attn.commands.fuse_options import fuse_options
    from fuse_attn.pipeline import fuse_model
    from fuse_attn.printable import printable

    options = fuse_options(args)
    # Every path is checked before the pass runs, and nothing is written until all are good.
    proto = modelio.load_proto(args.model)
    modelio.validate(proto, args.model)
    outputs = modelio.plan_outputs(proto, args.model, args.output, report=args.report, in_place=args.in_place,
                                   link_external_data=args.link_external_data)
    source = os.path.abspath(args.model)
    # With the JSON on stdout, the lines a person reads go to stderr.
    human = sys.stderr if outputs.report == "-" else sys.stdout
    fused = fuse_model(proto, os.path.dirname(source), options, name=args.model, progress=sys.stderr.isatty())
    report = fused.report
    for line in report.lines() if not args.quiet else [report.summary()]:
        print(printable(line), file=human)
    # Read before the output is written: with --in-place it replaces the original.
    original = modelio.load_proto(args.model) if args.verify and report.fused else None
    verified_ok = True
    if args.verify and original is None:
        print("nothing fused; nothing to verify", file=human)
    if original is not None:
        # Inputs at the specialized shapes (the fused model declares them), fed to both models;
        # verified before writing, so the JSON report carries the results (and an input whose
        # declared size is refused leaves nothing written).
        results = verify.verify_fused(original, fused.model, report, base_dir=os.path.dirname(source),
                                      shapes_from=fused.model if fused.specialized is not None else None)
        for line in verify.result_lines(results, report):
            print(printable(line), file=human)
        report.verification = [r.to_json() for r in results]
        verified_ok = all(r.ok for r in results)
    # Nothing fused: the model goes through exactly as it came.
    modelio.write_outputs(outputs, fused.model, report.to_json())
    if outputs.report == "-":
        sys.stdout.write(report.to_json())
    if not verified_ok:
        return EXIT_VERIFY_FAILED
    return EXIT_OK


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["compile"]:
        from fuse_attn.commands.compile import compile_main

        return compile_main(argv[1:])
    if argv[:1] == ["check"]:
        from fuse_attn.commands.check import check_main

        return check_main(argv[1:])
    if argv[:1] == ["zoo"]:
        from fuse_attn.models.check import zoo_main

        return zoo_main(argv[1:])
    return _fuse_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A short-lived process that builds one object per node: collection passes are pure cost.
    gc.disable()
    from fuse_attn.usage import run

    return run(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
