"""Run the fusion pass over the zoo and hold every model to its manifest entry.

    from fuse_attn.models.build import build_all
    from fuse_attn.models.check import check_zoo, render_markdown
    rows = check_zoo(build_all())
    print(render_markdown(rows))

A row is ok when the pass found exactly the expected blocks, fused the expected number, reported
every expected not-fused block with a reason that carries one of its keywords, and the fused
model's outputs match the original's in onnxruntime on the same random inputs: the manifest's, and
when the report names token masks (a key-bias column's inputs, or --assume-no-padding's), the
padded feeds of `fuse-attn --verify` (right, left, random, whole tiles; `fuse_attn.verify`).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from fuse_attn.commands.coverage import Row, render_markdown

from .manifest import ZooModel, cache_dir, load_manifest
from .export import max_abs_err, ort_session
from .recipes import make_inputs


def exporter_label(entry: dict[str, Any], opset: Any) -> str:
    """"dynamo/20"; in the exporter's own environment with another transformers,
    "torchscript/14 (transformers 4.44.2)"."""
    label = f"{entry['exporter']}/{opset}"
    if entry.get("environment") == "transformers4":
        from .environments import ENVIRONMENTS

        pin = next(r for r in ENVIRONMENTS["transformers4"]["requirements"] if r.startswith("transformers=="))
        label += f" (transformers {pin.split('==')[1]})"
    return label


def kernel_can_run(expected: dict[str, Any]) -> int:
    """Blocks flash_fwd can compute: the expected fused, and the groups the manifest marks
    `kernel_can_run` among those left alone (`not_fused`) or not found at all (`missed`)."""
    groups = expected.get("not_fused", []) + expected.get("missed", [])
    return expected["fused"] + sum(g["count"] for g in groups if g.get("kernel_can_run"))


def fuse_options(entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `fuse` options (assume_no_padding, shapes, dims) as `fuse()` keywords."""
    options = dict(entry.get("fuse") or {})
    if "shapes" in options:
        options["shapes"] = {k: tuple(v) for k, v in options["shapes"].items()}
    return options


def as_declared_types(inputs: dict[str, Any], path: Path) -> dict[str, Any]:
    """The inputs in the element types the model declares (optimum's `use_cache_branch` is a
    bool: the manifest gives it as a 0/1 mask)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    declared = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}
    return {k: v.astype(declared[k]) if k in declared and v.dtype != declared[k] else v for k, v in inputs.items()}


def _tolerance(entry: dict[str, Any], manifest: dict[str, Any]) -> float:
    return float(entry.get("tolerance") or manifest.get("tolerance", {}).get(entry["dtype"], 1e-3))


def describe_exc(exc: BaseException) -> str:
    """One line: the exception, and the root cause when it was raised from another."""
    def one(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0] if text else ''}"

    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    return one(exc) if root is exc else f"{one(exc)} (caused by {one(root)})"


def match_not_fused(reasons: list[str], expected: list[dict[str, Any]]) -> list[str]:
    """Problems with the not-fused blocks: each expected group must be met by `count` reasons
    carrying one of its keywords (case-insensitive); no reason may be left unexplained."""
    problems = []
    left = list(reasons)
    for group in expected:
        keys = [k.lower() for k in group["keywords"]]
        hits = [r for r in left if any(k in (r or "").lower() for k in keys)][: group["count"]]
        for r in hits:
            left.remove(r)
        if len(hits) < group["count"]:
            problems.append(f"expected {group['count']} not fused for '{group['reason']}' "
                            f"(keywords {group['keywords']}), the pass reported {len(hits)}")
    for reason, n in Counter(left).items():
        problems.append(f"unexpected not fused x{n}: {reason}")
    return problems


def check_model(zm: ZooModel, *, fused_dir: Path | None = None, manifest: dict[str, Any] | None = None) -> Row:
    entry = zm.entry
    manifest = manifest or load_manifest()
    exp = entry["expected"]
    expected_nf = sum(g["count"] for g in exp.get("not_fused", []))
    opset = zm.meta.get("opset") or entry.get("opset") or "?"
    row = Row(model=zm.name, exporter=exporter_label(entry, opset), found=None, fused=None,
              expected=exp["fused"], expected_found=exp["fused"] + expected_nf, max_err=None, seconds=None,
              ok=False, family=entry.get("family", ""), dtype=entry["dtype"], attn_impl=entry.get("attn_impl"),
              known_issue=entry.get("known_issue"),
              runnable=kernel_can_run(exp))
    if zm.skipped:
        row.skipped = True
        row.problems.append(f"skipped: {zm.error}")
        return row
    if not zm.ok:
        row.problems.append(f"build failed: {zm.error}")
        return row
    if entry.get("opset") is not None and zm.meta.get("opset") != entry["opset"]:
        row.problems.append(f"exported at opset {zm.meta.get('opset')}, manifest says {entry['opset']}")

    try:
        from fuse_attn import fuse, save
    except ImportError as exc:
        row.problems.append(f"fuse_attn.fuse unavailable: {exc}")
        return row

    t0 = time.perf_counter()
    try:
        fused_model, report = fuse(zm.path, **fuse_options(entry))
    except Exception as exc:
        row.seconds = time.perf_counter() - t0
        row.problems.append(f"fuse raised {describe_exc(exc)}"[:500])
        return row
    row.seconds = time.perf_counter() - t0
    blocks = list(report.blocks)
    row.found = len(blocks)
    row.fused = sum(1 for b in blocks if b.fused)
    row.not_fused = [b.reason or "(no reason given)" for b in blocks if not b.fused]
    if row.fused != row.expected:
        row.problems.append(f"fused {row.fused}, expected {row.expected}")
    if row.found != row.expected_found:
        row.problems.append(f"found {row.found} blocks, expected {row.expected_found}")
    row.problems += match_not_fused(row.not_fused, exp.get("not_fused", []))

    out_dir = fused_dir or (zm.path.parent / "fused")
    out_dir.mkdir(parents=True, exist_ok=True)
    fused_path = out_dir / f"{zm.name}.fused.onnx"
    try:
        save(fused_model, fused_path, source_path=zm.path)
        inputs = as_declared_types(make_inputs(entry["inputs"], entry["dtype"], seed=1), zm.path)
        want = ort_session(zm.path).run(None, inputs)
        got = ort_session(fused_path).run(None, inputs)
        if len(want) != len(got):
            raise ValueError(f"{len(got)} outputs, the original has {len(want)}")
        row.max_err = max(max_abs_err(g, w) for g, w in zip(got, want))
    except Exception as exc:
        row.problems.append(f"saving or running the fused model: {describe_exc(exc)}"[:500])
    else:
        tol = _tolerance(entry, manifest)
        if not row.max_err <= tol:
            row.problems.append(f"max error {row.max_err:.3g} > {tol:g}")
        try:
            _check_padded(row, report, zm.path, fused_path, tol, inputs)
        except Exception as exc:
            row.problems.append(f"running the padded feeds: {describe_exc(exc)}"[:500])
    row.ok = not row.problems
    return row


def _padded_template(fused, inputs: dict[str, Any]) -> dict[str, Any]:
    """The manifest's inputs (its lengths: a recipe picks one at which padding covers whole tiles),
    with a symbolic batch grown to two entries so each gets its own mask."""
    import numpy as np

    from fuse_attn import verify

    symbolic = {i.name for i in fused.graph.input
                if i.type.tensor_type.shape.dim and not i.type.tensor_type.shape.dim[0].HasField("dim_value")}
    return {n: np.repeat(a, verify.PADDED_BATCH, axis=0) if n in symbolic and a.ndim and a.shape[0] == 1 else a
            for n, a in inputs.items()}


def _check_padded(row: Row, report, original_path: Path, fused_path: Path, tol: float,
                  row_inputs: dict[str, Any]) -> None:
    """The padded feeds `fuse-attn --verify` runs, on the manifest's inputs, for every token mask
    a key-bias column is computed from; each within the zoo's tolerance. `row.padded`: how many feeds, how many within
    it. Inputs the manifest's `assume_no_padding` vouches for are not padded here (the recipe says
    they are all ones; `--verify` pads them to show what that costs): the cell says so."""
    import onnx

    from fuse_attn import verify

    masks = list(dict.fromkeys(n for b in report.blocks if b.fused for n in b.key_mask_inputs))
    if not masks:
        if report.assumed_all_ones:
            row.padded = "assumed all ones"
        return
    original = onnx.load(str(original_path), load_external_data=False)
    # Shapes from the fused model: it declares any the manifest's `fuse` options fixed.
    fused = onnx.load(str(fused_path), load_external_data=False)
    causal = any(b.fused and b.causal and b.key_mask_inputs for b in report.blocks)
    feeds = verify.padded_feeds(fused, masks, causal=causal, seed=1, template=_padded_template(fused, row_inputs))
    if not feeds:
        row.problems.append(f"the key-bias columns read {masks}, but no input of rank >= 2 to pad")
        return
    want_session, got_session = ort_session(original_path), ort_session(fused_path)
    names = [o.name for o in original.graph.output]
    good = 0
    for feed in feeds:
        checks = verify.run_feed(want_session, got_session, names, feed).checks
        err = max(c.max_abs for c in checks)
        row.max_err = max(row.max_err, err)
        if err <= tol:
            good += 1
        else:
            row.problems.append(f"{feed.describe()}: max error {err:.3g} > {tol:g}")
    row.padded = f"{good} of {len(feeds)}"


def check_zoo(models: Iterable[ZooModel], *, fused_dir: Path | str | None = None, log=None) -> list[Row]:
    """One Row per model: the pass run on it, held to the manifest, numerics in onnxruntime."""
    manifest = load_manifest()
    rows = []
    for zm in models:
        row = check_model(zm, fused_dir=Path(fused_dir) if fused_dir else None, manifest=manifest)
        if log is not None:
            log(f"{row.model}: {'ok' if row.ok else 'FAIL ' + '; '.join(row.problems)}")
        rows.append(row)
    return rows


def _environment_lines() -> list[str]:
    from .environments import ENVIRONMENTS

    lines = ["Exporters whose pins clash with the zoo's run in their own venv, which the build creates "
             "(`models/environments.py`, cached under `<zoo cache>/envs/` by its pins):", ""]
    for name, env in ENVIRONMENTS.items():
        lines.append(f"- `{name}`: {', '.join(env['requirements'])} (`models/exporters/{env['script']}`)")
    return lines


def coverage_document(rows: list[Row]) -> str:
    """The public coverage record: a heading, the versions it was measured with, the table."""
    from importlib import metadata

    versions = []
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "timm"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return "\n".join([
        "# Model zoo coverage",
        "",
        "Every recipe in `models/manifest.json`, exported and run through the pass: blocks found, fused, "
        "and expected fused (of expected found); max abs error of the fused model against the original in "
        "onnxruntime on the same inputs (the manifest's, and for a model whose report names token masks the "
        "padded feeds of `fuse-attn --verify`: right, left, random and whole tiles, counted in *padded feeds "
        "ok*); the pass's own time. Regenerate with "
        "`fuse-attn zoo --markdown models/COVERAGE.md`.",
        "",
        "*Kernel can run*: the blocks flash_fwd can compute: those expected fused, and those the manifest "
        "marks `kernel_can_run` that the pass leaves alone (its gaps, each named in the manifest). The "
        "totals per exporter follow the table.",
        "",
        f"Measured with {', '.join(versions)}.",
        "",
        *_environment_lines(),
        "",
        render_markdown(rows),
        "",
    ])


def default_fused_dir(out_dir: Path | str | None = None) -> Path:
    return cache_dir(out_dir) / "fused"


def zoo_main(argv: list[str] | None = None) -> int:
    """`fuse-attn zoo [--only NAME] [--out DIR] [--markdown FILE]`: build (cached), run the pass on
    every model, print the coverage table. Exit 0 when every row is ok (or skipped); bad usage is
    one line and exit 2 (`fuse_attn.usage`)."""
    import sys

    from fuse_attn.usage import run

    return run(_zoo, list(sys.argv[1:] if argv is None else argv))


def _zoo(argv: list[str]) -> int:
    import sys

    from fuse_attn.modelio import InputError
    from fuse_attn.usage import ArgumentParser

    from .build import build_all
    from .manifest import names_matching

    ap = ArgumentParser(prog="fuse-attn zoo", description="the regression suite over the model zoo")
    ap.add_argument("--only", action="append", help="a model name (exact, or a substring); repeatable")
    ap.add_argument("--out", help=f"cache dir (default {cache_dir()})")
    ap.add_argument("--markdown", help="also write the table to this Markdown file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-model progress lines")
    args = ap.parse_args(argv)
    only = names_matching(args.only)
    if only == []:
        raise InputError(f"no recipe matches {args.only}")
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    models = build_all(args.out, only, log=log)
    rows = check_zoo(models, fused_dir=default_fused_dir(args.out), log=log)
    table = render_markdown(rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(coverage_document(rows))
    return 0 if all(r.ok or r.skipped or r.known_issue for r in rows) else 1
