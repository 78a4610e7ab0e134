"""`fuse-attn check DIR_OR_FILES...`: a regression run over the user's own model zoo.

Every model is fused and verified against the original in onnxruntime in its own worker process
(`fuse_attn.commands.check_worker`), at most --jobs at once: a crash or a timeout costs only that model.
The result is the zoo's coverage table; --json keeps it for the next run's --baseline, so CI
catches exporter drift (fewer blocks fused, a model now failing, a model gone).

Exit codes: 0 every model ok and nothing worse than the baseline; 1 a model wrong, failing
(unreadable, crashed, timed out) or worse than the baseline; 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed

from fuse_attn import modelio
from fuse_attn.commands.coverage import MODEL_COLUMNS, Column, Row, render_markdown
from fuse_attn.commands.fuse_options import add_fuse_options, as_argv, fuse_options
from fuse_attn.modelio import InputError
from fuse_attn.pipeline import FuseOptions
from fuse_attn.printable import printable
from fuse_attn.specialize import Specialization

EXIT_OK, EXIT_FAILED = 0, 1  # bad usage raises InputError: exit 2 (fuse_attn.usage)
RESULTS_FORMAT = "fuse-attn check results"
RESULTS_VERSION = 1


# -- which models ------------------------------------------------------------------------------

def collect_models(paths: list[str]) -> dict[str, str]:
    """{name: absolute path} of every .onnx file under the folders, plus the files given. A model
    in a folder is named by its path inside that folder, a file by the path given; names are
    what a baseline is matched by."""
    models: dict[str, str] = {}
    seen: set[str] = set()
    for arg in paths:
        if not os.path.exists(arg):
            raise InputError(f"'{arg}' does not exist")
        if os.path.isdir(arg):
            found = []
            for folder, dirs, files in os.walk(arg):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, caches
                found += [os.path.join(folder, f) for f in files
                          if f.lower().endswith(".onnx") and not f.startswith(".")]
            if not found:
                raise InputError(f"no .onnx models found in '{arg}'")
            named = sorted((os.path.relpath(f, arg), f) for f in found)
        else:
            named = [(os.path.normpath(arg), arg)]
        for name, path in named:
            real = os.path.realpath(path)
            if real in seen:  # the same file reached twice
                continue
            seen.add(real)
            name = name.replace(os.sep, "/")
            if name in models:  # two folders both holding e.g. model.onnx: keep the folder in the name
                name = os.path.normpath(path).replace(os.sep, "/")
            models[name] = os.path.abspath(path)
    return models


# -- where results go: checked before any model runs ------------------------------------------

_TABLE_START = "| model |"
_LARGEST_RESULTS = 64 << 20  # bytes; a bigger file is not one of ours


def _is_earlier_output(path: str, option: str) -> bool:
    """An existing file a run may replace: empty, or what an earlier run wrote there."""
    try:
        if os.path.getsize(path) == 0:
            return True
        if not os.path.isfile(path) or os.path.getsize(path) > _LARGEST_RESULTS:
            return False
        with open(path, encoding="utf-8") as f:
            if option == "--markdown":
                return f.read(len(_TABLE_START)) == _TABLE_START
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == RESULTS_FORMAT


def check_output_path(option: str, path: str, models: dict[str, str]) -> str:
    """The absolute path --json or --markdown may write: a writable place that is none of the
    models, and that replaces only what an earlier run wrote there (or an empty file)."""
    target = modelio.check_writable_file(path, option, not_over={
        f"the model being checked '{name}'": model for name, model in models.items()})
    if os.path.exists(target) and not _is_earlier_output(target, option):
        what = "a 'fuse-attn check --json' file" if option == "--json" else "a table 'fuse-attn check' wrote"
        raise InputError(f"{option} '{path}' exists and is not {what}; remove it or choose another path")
    return target


def load_baseline(path: str) -> dict[str, dict]:
    """A previous run's --json: {model name: its result}."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise InputError(f"cannot read the baseline '{path}': {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"the baseline '{path}' is not JSON; give a file written by 'fuse-attn check --json'") from None
    if not (isinstance(data, dict) and data.get("format") == RESULTS_FORMAT and isinstance(data.get("models"), list)):
        raise InputError(f"the baseline '{path}' was not written by 'fuse-attn check --json'")
    if not all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in data["models"]):
        raise InputError(f"the baseline '{path}' has a model entry without a name")
    return {m["model"]: m for m in data["models"]}


# -- running the workers -----------------------------------------------------------------------

def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _failed(status: str, problem: str) -> dict:
    return {"status": status, "exporter": "", "dtype": "", "found": None, "fused": None, "not_fused": [],
            "blocks": [], "assumptions": [], "specialized": [], "max_err": None, "outputs": [], "feeds": [], "seconds": None,
            "problems": [problem]}


def run_one(path: str, result_path: str, *, options: FuseOptions, timeout: float | None) -> dict:
    """Check one model in a worker process; a crash or a timeout becomes this model's result."""
    command = [sys.executable, "-m", "fuse_attn.commands.check_worker", path, result_path, *as_argv(options)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
        return _failed("timeout", f"timed out after {timeout:g} s (--timeout)")
    if proc.returncode == 0:
        try:
            with open(result_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass  # reported below, as the worker's failure
    last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
    how = (f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0
           else f"exited with code {proc.returncode}")
    return _failed("crashed", f"the worker process {how}" + (f": {last.strip()[:300]}" if last else ""))


def run_all(models: dict[str, str], *, jobs: int, timeout: float | None, options: FuseOptions,
            progress: bool) -> dict[str, dict]:
    """{name: result} for every model, checked `jobs` at a time."""
    results: dict[str, dict] = {}
    bar = None
    if progress:  # a bar only for a person watching a terminal
        from tqdm import tqdm

        bar = tqdm(total=len(models), desc="checking models", unit="model", file=sys.stderr, leave=False)
    with tempfile.TemporaryDirectory(prefix="fuse-attn-check-") as scratch, ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(run_one, path, os.path.join(scratch, f"{i}.json"),
                               options=options, timeout=timeout): name
                   for i, (name, path) in enumerate(models.items())}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except Exception as exc:  # the worker could not even be started (no memory, no processes)
                    results[futures[future]] = _failed("error", f"cannot start a worker process: "
                                                                f"{type(exc).__name__}: {exc}")
                if bar is not None:
                    bar.update()
        except BaseException:  # interrupted: start no more workers (a terminal's Ctrl-C stops the running ones)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if bar is not None:
        bar.close()
    return {name: {"model": name, "path": models[name], "ok": results[name]["status"] == "ok", **results[name]}
            for name in models}


def unused_options(options: FuseOptions, results: dict[str, dict]) -> list[str]:
    """The --shape and --dim options that fixed no model (a misspelt name, most likely)."""
    fixed = {line for r in results.values() for line in r.get("specialized", [])}
    taken = [(f"--shape {name}={'x'.join(map(str, shape))}", Specialization({}, {name: shape}))
             for name, shape in options.shapes.items()]
    taken += [(f"--dim {name}={value}", Specialization({name: value}, {})) for name, value in options.dims.items()]
    return [option for option, effect in taken if effect.lines()[0] not in fixed]


# -- against the baseline ----------------------------------------------------------------------

def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def regressions(results: dict[str, dict], baseline: dict[str, dict]) -> list[str]:
    """What got worse since the baseline: a model gone, a model now failing, fewer blocks fused."""
    found = []
    for name, before in baseline.items():
        now = results.get(name)
        if now is None:
            found.append(f"{name}: in the baseline, missing from this run")
        elif before.get("ok") and not now["ok"]:
            found.append(f"{name}: failing now ({now['status']}), ok in the baseline")
        elif isinstance(before.get("fused"), int) and (now["fused"] or 0) < before["fused"]:
            found.append(f"{name}: {_blocks(now['fused'] or 0)} fused, the baseline {before['fused']}")
    return found


# -- output ------------------------------------------------------------------------------------

def _padded(result: dict) -> str | None:
    """"3 of 4": the padded feeds (all but the first, all-ones, feed) within tolerance."""
    padded = result.get("feeds", [])[1:]
    return f"{sum(f['ok'] for f in padded)} of {len(padded)}" if padded else None


def to_row(result: dict) -> Row:
    return Row(padded=_padded(result), model=result["model"], exporter=result["exporter"] or "—", found=result["found"],
               fused=result["fused"], expected=None, expected_found=None, max_err=result["max_err"],
               seconds=result["seconds"], ok=result["ok"], problems=list(result["problems"]),
               dtype=result["dtype"], not_fused=list(result["not_fused"]),
               failure=None if result["ok"] else result["status"])


def _baseline_column(baseline: dict[str, dict]) -> Column:
    def cell(row: Row) -> str:
        before = baseline.get(row.model)
        if before is None:
            return "new"
        if before.get("fused") is None:
            return f"— ({before.get('status', '?')})"
        return f"{before['fused']} of {before.get('found')}"

    return Column("baseline fused", "---:", cell)


def _finite(value):
    """JSON without NaN/Infinity (not standard JSON): a non-finite error becomes its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def results_json(results: dict[str, dict], found_regressions: list[str], baseline_path: str | None) -> str:
    data = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION,
            "ok": all(r["ok"] for r in results.values()) and not found_regressions,
            "baseline": baseline_path, "regressions": found_regressions, "models": list(results.values())}
    return json.dumps(_finite(data), indent=2) + "\n"


# -- the command -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from fuse_attn.usage import ArgumentParser  # usage errors in the commands' shared format

    parser = ArgumentParser(
        prog="fuse-attn check",
        description="Fuse and verify every ONNX model in the given folders (recursively) and files, each in "
                    "its own worker process, and print the coverage table. Exit 1 when a model is wrong, "
                    "fails, or is worse than --baseline.")
    parser.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="folders to search for .onnx files, or models")
    parser.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                        help="models checked at once (default: the number of CPUs)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S",
                        help="seconds one model may take before it is stopped and reported (default 600; 0: none)")
    add_fuse_options(parser, many_models=True)  # the fuse command's own, passed to every worker
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON (a later run's --baseline)")
    parser.add_argument("--markdown", metavar="FILE", help="write the coverage table as Markdown")
    parser.add_argument("--baseline", metavar="FILE",
                        help="a previous --json: exit 1 when a model is missing, now failing or fuses fewer blocks")
    return parser


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use, not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    options = fuse_options(args)
    if args.jobs is not None and args.jobs < 1:
        raise InputError("--jobs must be at least 1")
    jobs = args.jobs or _cpus()
    if args.timeout < 0:
        raise InputError("--timeout must be 0 (none) or more seconds")
    models = collect_models(args.paths)
    json_path = check_output_path("--json", args.json, models) if args.json else None
    markdown_path = check_output_path("--markdown", args.markdown, models) if args.markdown else None
    if json_path and json_path == markdown_path:
        raise InputError("--json and --markdown name the same file")
    baseline = load_baseline(args.baseline) if args.baseline else None

    results = run_all(models, jobs=min(jobs, len(models)), timeout=args.timeout or None,
                      options=options, progress=sys.stderr.isatty())
    for option in unused_options(options, results):
        print(f"fuse-attn check: note: {option} fixed no model", file=sys.stderr)
    found_regressions = regressions(results, baseline) if baseline is not None else []
    columns = MODEL_COLUMNS if baseline is None else (*MODEL_COLUMNS[:5], _baseline_column(baseline), *MODEL_COLUMNS[5:])
    table = render_markdown([to_row(r) for r in results.values()], columns=columns)
    if baseline is not None:
        table += "\n\n" + (f"Worse than the baseline '{args.baseline}':\n\n" + "\n".join(printable(f"- {r}") for r in found_regressions)
                           if found_regressions else f"Nothing worse than the baseline '{args.baseline}'.")
    outputs = {}
    if markdown_path:
        outputs[markdown_path] = table + "\n"
    if json_path:
        outputs[json_path] = results_json(results, found_regressions, args.baseline)
    modelio.write_together([(target, modelio.write_text(text)) for target, text in outputs.items()])
    print(table)
    ok = all(r["ok"] for r in results.values()) and not found_regressions
    return EXIT_OK if ok else EXIT_FAILED
