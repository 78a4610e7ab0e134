"""python -m fuse_attn.models build [--only NAME] [--out DIR] [--force] | list | check"""

from __future__ import annotations

import sys
import time

from .build import build_all
from .manifest import cache_dir, entries, names_matching


def main(argv: list[str] | None = None) -> int:
    """Bad usage is one `fuse-attn: error:` line and exit 2, as in every fuse-attn command."""
    from fuse_attn.usage import run

    return run(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    from fuse_attn.modelio import InputError
    from fuse_attn.usage import ArgumentParser

    ap = ArgumentParser(prog="python -m fuse_attn.models", description="the fuse-attn model zoo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="export every recipe (cached by recipe hash)")
    b.add_argument("--only", action="append", help="a model name (exact, or a substring); repeatable")
    b.add_argument("--out", help=f"cache dir (default {cache_dir()})")
    b.add_argument("--force", action="store_true", help="re-export even when the cache is current")
    sub.add_parser("check", help="build, run the pass on every model, print the coverage table "
                   "(same as `fuse-attn zoo`; see its --help)", add_help=False)
    sub.add_parser("list", help="list the recipes")
    if argv[:1] == ["check"]:
        from .check import zoo_main

        return zoo_main(argv[1:])
    args = ap.parse_args(argv)

    if args.cmd == "list":
        for e in entries():
            print(f"{e['name']:<34} {e['family']:<14} {e['exporter']:<11} {str(e.get('opset') or '-'):<4} "
                  f"{e['dtype']:<8} {e.get('attn_impl') or '-'}")
        return 0

    only = names_matching(args.only)
    if only == []:
        raise InputError(f"no recipe matches {args.only}")
    t0 = time.perf_counter()
    models = build_all(args.out, only, force=getattr(args, "force", False), log=lambda m: print(m, flush=True))
    failed = [m for m in models if not m.ok and not m.skipped]
    print(f"built {len(models) - len(failed)}/{len(models)} models in {time.perf_counter() - t0:.1f}s "
          f"-> {cache_dir(args.out)}")
    for m in models:
        if not m.ok:
            print(f"  {'skipped' if m.skipped else 'FAILED'} {m.name}: {m.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
