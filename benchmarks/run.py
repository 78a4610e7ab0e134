"""Time fuse-attn against the floor and onnxscript on LLaMA-shaped graphs, as whole processes.

    python benchmarks/run.py                      # 8..128 layers + the long-context table, ~10 min on 2 cores
    python benchmarks/run.py --layers 8 32        # a subset
    python benchmarks/run.py --big                # also the >= 3 GB external-data model

For every graph (benchmarks/llama_graph.py: the dynamo export's layer structure, hidden 256,
weights as zeros in external data) and every tool, each measurement is one fresh process
(python start-up and imports included), best of --repeat runs:

* floor:      `onnx.load(p, load_external_data=False)` + `onnx.save` -- parse and write the graph;
* fuse-attn:  the `fuse-attn p -o out` CLI (n/a until it is installed / importable);
* onnxscript: `onnx_ir.load` + `onnxscript.rewriter.ort_fusions.optimize_for_ort` + `onnx_ir.save`.

It also times the pass in-process (`fuse_attn.fuse(p)` after the imports) to get the cost per
node, which should be flat from 8 to 128 layers.  Peak RSS of each process: GNU time's %M
(wait4()'s ru_maxrss when it is missing, which also counts this script's memory at fork).

--big builds LLaMA-7B dimensions (hidden 4096, 32 heads, 8 kv heads, MLP 11008, vocab 32000)
with --big-layers layers (default 4: 3.9 GB of fp32 weights, beyond protobuf's 2 GB limit) as a
sparse zeros data file, fuses it once, compares fuse-attn's peak RSS with the graph's own size,
and loads + runs the fused model in onnxruntime.

Prints a Markdown table and writes benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from llama_graph import BIG, SMALL, build_llama  # noqa: E402

FLOOR = "import onnx, sys; m = onnx.load(sys.argv[1], load_external_data=False); onnx.save(m, sys.argv[2])"

ONNXSCRIPT = r"""
import json, os, sys
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort
model = ir.load(sys.argv[1])
model, counts = optimize_for_ort(model)
ir.save(model, sys.argv[2], external_data=os.path.basename(sys.argv[2]) + ".data")
attn = sum(1 for n in model.graph.all_nodes()
           if n.domain == "com.microsoft" and n.op_type in ("MultiHeadAttention", "GroupQueryAttention", "Attention"))
print("RESULT " + json.dumps({"attention_nodes": attn, "counts": counts}))
"""

# The pass in-process, after the imports: the first call (cold: lazy imports, first proofs)
# and a second one (warm), each as wall and CPU time; no save.
FUSE_API = r"""
import json, sys, time
from fuse_attn import fuse
out = {}
for run in ("cold", "warm"):
    t, c = time.perf_counter(), time.process_time()
    model, report = fuse(sys.argv[1])
    out[run] = {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}
out["fused"] = getattr(report, "fused", None)
print("RESULT " + json.dumps(out))
"""

IMPORT_ONLY = "import fuse_attn.commands.cli"

ORT_RUN = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
t = time.perf_counter()
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
t_load = time.perf_counter() - t
shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
ids = np.zeros(shape, dtype=np.int64)
t = time.perf_counter()
out = sess.run(None, {sess.get_inputs()[0].name: ids})[0]
print("RESULT " + json.dumps({"load_s": t_load, "run_s": time.perf_counter() - t, "output_shape": list(out.shape),
                              "finite": bool(np.isfinite(out).all())}))
"""


@dataclasses.dataclass
class Run:
    seconds: float | None = None  # best wall time over the repeats
    rss_mb: float | None = None  # peak RSS of the best run's process
    cpu_seconds: float | None = None  # least user+sys CPU over the repeats (robust on a shared box)
    runs: int = 0
    error: str | None = None
    result: dict | None = None  # the process's "RESULT {json}" line, if any


# A child's ru_maxrss counts what it held between fork and exec, i.e. this benchmark's own
# memory; GNU time forks the measured process from a small one, so its %M is the process's own.
GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def _run_process(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[float, float, float, int, str, str]:
    """One process: (wall seconds, CPU seconds, peak RSS MB, exit code, stdout, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        if GNU_TIME:
            cmd = [GNU_TIME, "-o", peak.name, "-f", "%M"] + cmd
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise TimeoutError(f"timed out after {timeout:.0f} s")
            time.sleep(0.002)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        rss_kb = usage.ru_maxrss
        if GNU_TIME:
            lines = [ln for ln in peak.read().split() if ln.isdigit()]
            rss_kb = int(lines[-1]) if lines else rss_kb
        return wall, cpu, rss_kb / 1024, proc.returncode, out.read().decode(errors="replace"), err.read().decode(
            errors="replace"
        )


def measure(cmd: list[str], repeat: int, timeout: float, slow_after: float = 60.0, env=None) -> Run:
    """Best of `repeat` runs; a tool that needs more than `slow_after` s is run once."""
    run = Run()
    for _ in range(repeat):
        try:
            wall, cpu, rss, code, out, err = _run_process(cmd, timeout, env)
        except TimeoutError as exc:
            run.error = str(exc)
            return run
        run.runs += 1
        if code != 0:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            run.error = f"exit {code}: {lines[-1] if lines else ''}"[:300]
            return run
        if run.seconds is None or wall < run.seconds:
            run.seconds, run.rss_mb = wall, rss
        run.cpu_seconds = cpu if run.cpu_seconds is None else min(run.cpu_seconds, cpu)
        for line in out.splitlines():
            if line.startswith("RESULT "):
                run.result = json.loads(line[len("RESULT "):])
        if wall > slow_after:
            break
    return run


def fuse_attn_command() -> list[str] | None:
    """How to run the CLI: the installed console script, else its entry point from this checkout."""
    # The script next to this interpreter first: a pyenv/asdf shim on PATH adds ~0.1 s of bash.
    for exe in (os.path.join(os.path.dirname(sys.executable), "fuse-attn"), shutil.which("fuse-attn")):
        if exe and os.path.isfile(exe) and os.access(exe, os.X_OK):
            return [exe]
    probe = subprocess.run([sys.executable, "-c", "import fuse_attn.commands.cli"], cwd=ROOT, capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-c", "import sys; from fuse_attn.commands.cli import main; sys.exit(main())"]
    return None


def has_module(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True).returncode == 0


def count_flashfwd(path: str) -> int | None:
    import onnx

    try:
        m = onnx.load(path, load_external_data=False)
    except Exception:
        return None
    return sum(1 for n in m.graph.node if n.op_type == "FlashFwd")


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for mod in ("onnx", "onnx_ir", "onnxruntime", "onnxscript", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def fmt(x, digits=2, suffix=""):
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}{suffix}"


def bench_layers(args, work: str, fuse_cmd, have_onnxscript: bool, have_api: bool, import_s: float | None) -> list[dict]:
    rows = []
    for n in args.layers:
        path = os.path.join(work, f"llama_{n}.onnx")
        info = build_llama(path, dataclasses.replace(SMALL, layers=n), attn=args.attn, weights="zeros")
        row = {"layers": n, "nodes": info["nodes"], "graph_bytes": info["graph_bytes"], "data_bytes": info["data_bytes"]}
        print(f"[{n} layers, {info['nodes']} nodes]", file=sys.stderr, flush=True)

        floor = measure([sys.executable, "-c", FLOOR, path, os.path.join(work, f"floor_{n}.onnx")], args.repeat, args.timeout)
        row["floor"] = dataclasses.asdict(floor)

        row.update(time_fuse_attn(fuse_cmd, path, os.path.join(work, f"fused_{n}.onnx"), args))

        if have_api:
            api = measure([sys.executable, "-c", FUSE_API, path], args.repeat, args.timeout)
            row["fuse_api"] = dataclasses.asdict(api)
            secs = api.result["warm"]["cpu_seconds"] if api.result else None
            row["fuse_us_per_node"] = secs / info["nodes"] * 1e6 if secs is not None else None
        else:
            row["fuse_api"] = None
            row["fuse_us_per_node"] = None

        if have_onnxscript and not args.skip_onnxscript:
            ox = measure(
                [sys.executable, "-c", ONNXSCRIPT, path, os.path.join(work, f"ox_{n}.onnx")],
                args.repeat,
                args.onnxscript_timeout,
                slow_after=args.slow_after,
            )
            row["onnxscript"] = dataclasses.asdict(ox)
            row["onnxscript_attention_nodes"] = ox.result["attention_nodes"] if ox.result else None
        else:
            row["onnxscript"] = None
            row["onnxscript_attention_nodes"] = None

        f, fa, ox = row["floor"]["seconds"], row["fuse_attn"]["seconds"], (row["onnxscript"] or {}).get("seconds")
        row["fuse_over_floor"] = fa / f if fa and f else None
        fc, fac = row["floor"]["cpu_seconds"], row["fuse_attn"]["cpu_seconds"]
        row["fuse_over_floor_cpu"] = fac / fc if fac and fc else None
        row["onnxscript_over_fuse"] = ox / fa if ox and fa else None
        rows.append(row)
        for p in os.listdir(work):  # keep the work dir small: 128 layers of outputs add up
            if p.startswith(("floor_", "fused_", "ox_")):
                os.unlink(os.path.join(work, p))
    return rows


# The long-context table: a GQA model, fixed seq lengths up to 128k, and a symbolic seq whose
# mask has a real sliding window (Mistral's 4096): every row fused or left alone as it must be.
GQA = dataclasses.replace(SMALL, hidden=512, heads=8, kv_heads=2)  # head dim 64
WINDOW = 4096


def long_models(args) -> list[tuple[str, object]]:
    models = [(f"GQA 8 q / 2 kv heads", dataclasses.replace(GQA, layers=args.seq_layers, seq=2048))]
    models += [("fixed seq", dataclasses.replace(SMALL, layers=args.seq_layers, seq=seq)) for seq in args.seq_sweep]
    models.append((f"symbolic seq, window {WINDOW}",
                   dataclasses.replace(SMALL, layers=args.seq_layers, symbolic=True, window=WINDOW)))
    return models


def bench_long(args, work: str, fuse_cmd) -> list[dict]:
    """Each model: the floor and fuse-attn as whole processes, best of --repeat, time and peak RSS."""
    rows = []
    for label, cfg in long_models(args):
        path = os.path.join(work, "long.onnx")
        info = build_llama(path, cfg, attn=args.attn, weights="zeros")
        seq = "seq" if cfg.symbolic else cfg.seq
        print(f"[{label}: {cfg.layers} layers at seq {seq}]", file=sys.stderr, flush=True)
        row = {"model": label, "layers": cfg.layers, "seq": seq, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
               "head_dim": cfg.head_dim, "nodes": info["nodes"], "graph_bytes": info["graph_bytes"]}
        row["floor"] = dataclasses.asdict(
            measure([sys.executable, "-c", FLOOR, path, os.path.join(work, "long_floor.onnx")], args.repeat, args.timeout))
        report = os.path.join(work, "long_report.json")
        row.update(time_fuse_attn(fuse_cmd, path, os.path.join(work, "long_fused.onnx"), args, ["--report", report]))
        reasons = []
        if os.path.exists(report):
            with open(report) as f:
                blocks = json.load(f).get("blocks", [])
            reasons = sorted({b.get("reason") for b in blocks if not b.get("fused") and b.get("reason")})
        row["blocks"], row["left_alone_reasons"] = cfg.layers, reasons
        floor, fa = row["floor"], row["fuse_attn"]
        row["time_over_floor"] = fa["seconds"] / floor["seconds"] if fa["seconds"] and floor["seconds"] else None
        row["rss_over_floor_mb"] = fa["rss_mb"] - floor["rss_mb"] if fa["rss_mb"] and floor["rss_mb"] else None
        rows.append(row)
        for p in os.listdir(work):
            if p.startswith("long"):
                os.unlink(os.path.join(work, p))
    return rows


def long_table(rows: list[dict]) -> str:
    lines = ["| model | layers | seq | nodes | floor s | floor MB | fuse-attn s | fuse-attn MB | time / floor "
             "| MB over floor | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fa, fl = r["fuse_attn"], r["floor"]
        if fa["error"] is not None:
            result = f"error: {fa['error'][:60]}"
        else:
            result = f"{r['flashfwd_nodes']} of {r['blocks']} fused"
            if r["left_alone_reasons"]:
                result += "; left alone: " + "; ".join(r["left_alone_reasons"])
        seq = f"{r['seq']:,}" if isinstance(r["seq"], int) else r["seq"]
        lines.append(f"| {r['model']} ({r['heads']}/{r['kv_heads']} heads, d {r['head_dim']}) | {r['layers']} | {seq} | "
                     f"{r['nodes']} | {fmt(fl['seconds'])} | {fmt(fl['rss_mb'], 0)} | {fmt(fa['seconds'])} | "
                     f"{fmt(fa['rss_mb'], 0)} | {fmt(r['time_over_floor'], 1, 'x')} | {fmt(r['rss_over_floor_mb'], 0)} | "
                     f"{result} |")
    return "\n".join(lines)


def bench_big(args, work: str, fuse_cmd, import_rss: float | None) -> dict:
    cfg = dataclasses.replace(BIG, layers=args.big_layers, seq=args.big_seq)
    need = cfg.weight_bytes()
    free = shutil.disk_usage(work).free
    res: dict = {"config": dataclasses.asdict(cfg), "weight_bytes": need}
    # The data file is sparse, but a tool that copies it would materialise it: keep 2x free.
    if free < 2 * need + 2**30:
        res["error"] = f"not enough disk in {work}: {free / 2**30:.1f} GB free, want {2 * need / 2**30:.1f} GB"
        return res
    path = os.path.join(work, "llama_big.onnx")
    t = time.perf_counter()
    info = build_llama(path, cfg, attn=args.attn, weights="zeros")
    res.update(build_s=time.perf_counter() - t, nodes=info["nodes"], graph_bytes=info["graph_bytes"],
               data_bytes=info["data_bytes"])
    print(f"[big: {info['data_bytes'] / 2**30:.2f} GB data, {info['nodes']} nodes]", file=sys.stderr, flush=True)

    floor = measure([sys.executable, "-c", FLOOR, path, os.path.join(work, "big_floor.onnx")], 1, args.timeout)
    res["floor"] = dataclasses.asdict(floor)
    res["import_rss_mb"] = import_rss
    if not fuse_cmd:
        res["fuse_attn"] = dataclasses.asdict(Run(error="fuse-attn CLI not installed"))
        return res
    out_dir = os.path.join(work, "fused")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "llama_big_fused.onnx")  # another folder: the data file must follow it
    fa = measure(fuse_cmd + [path, "-o", out, "--link-external-data"], 1, args.timeout)
    res["fuse_attn"] = dataclasses.asdict(fa)
    if fa.error is None:
        res["flashfwd_nodes"] = count_flashfwd(out)
        res["output_dir_bytes_on_disk"] = sum(
            os.stat(os.path.join(out_dir, p)).st_blocks * 512 for p in os.listdir(out_dir)
        )
        res["rss_over_graph_mb"] = fa.rss_mb - info["graph_bytes"] / 2**20 - (import_rss or 0)
        ort = measure([sys.executable, "-c", ORT_RUN, out], 1, args.timeout)
        res["onnxruntime"] = dataclasses.asdict(ort)
    return res


def table(rows: list[dict], mach: dict) -> str:
    head = (
        "| layers | nodes | floor s | fuse-attn s | fuse/floor | fuse/floor CPU | onnxscript s | onnxscript/fuse-attn "
        "| FlashFwd fused | onnxscript attn fused | pass CPU µs/node | fuse-attn peak RSS MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ox = r["onnxscript"] or {}
        fa = r["fuse_attn"]
        lines.append(
            "| {layers} | {nodes} | {floor} | {fa} | {ratio} | {ratio_cpu} | {ox} | {oxr} | {ffn} | {oxn} | {upn} | {rss} |".format(
                layers=r["layers"],
                nodes=r["nodes"],
                floor=fmt(r["floor"]["seconds"]),
                fa=fmt(fa["seconds"]) if fa["error"] is None else ("n/a" if "not installed" in fa["error"] else "error"),
                ratio=fmt(r["fuse_over_floor"], 1, "x"),
                ratio_cpu=fmt(r["fuse_over_floor_cpu"], 1, "x"),
                ox=fmt(ox.get("seconds")) if ox and ox.get("error") is None else ("n/a" if not ox else ox["error"][:40]),
                oxr=fmt(r["onnxscript_over_fuse"], 0, "x"),
                ffn="n/a" if r["flashfwd_nodes"] is None else r["flashfwd_nodes"],
                oxn="n/a" if r["onnxscript_attention_nodes"] is None else r["onnxscript_attention_nodes"],
                upn=fmt(r["fuse_us_per_node"], 0),
                rss=fmt(fa.get("rss_mb"), 0),
            )
        )
    for r in rows:
        for tool in ("floor", "fuse_attn", "onnxscript"):
            err = (r.get(tool) or {}).get("error")
            if err and "not installed" not in err:
                lines.append(f"\n{r['layers']} layers, {tool}: {err}")
    ok = [r for r in rows if r["fuse_api"] and r["fuse_api"].get("result")]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        cpu = lambda r: r["fuse_api"]["result"]["warm"]["cpu_seconds"]
        marginal = (cpu(b) - cpu(a)) / (b["nodes"] - a["nodes"]) * 1e6
        lines.append(f"\nPass CPU µs/node: `fuse()` in-process (load, fuse, no save), second call, CPU time. "
                     f"Marginal cost {a['layers']} -> {b['layers']} layers: {marginal:.0f} µs per added node.")
    v = mach["versions"]
    lines.append("")
    lines.append(
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB RAM, Python {mach['python']}, "
        f"onnx {v['onnx']}, onnx-ir {v['onnx_ir']}, onnxscript {v['onnxscript']}, onnxruntime {v['onnxruntime']}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in mach['load_average_at_start'])}. "
        "Whole processes, best of 3 (onnxscript: one run when a run exceeds 60 s)."
    )
    return "\n".join(lines)


def big_text(big: dict) -> str:
    if "error" in big and "fuse_attn" not in big:
        return f"Big model: skipped ({big['error']})"
    gb = big["data_bytes"] / 2**30
    fa = big.get("fuse_attn") or {}
    lines = [
        f"Big model: {big['config']['layers']} layers at hidden {big['config']['hidden']}, {big['nodes']} nodes, "
        f"graph {big['graph_bytes'] / 1024:.0f} KB, external data {gb:.2f} GiB.",
        f"- floor: {fmt(big['floor']['seconds'])} s, peak RSS {fmt(big['floor']['rss_mb'], 0)} MB",
    ]
    if fa.get("error"):
        lines.append(f"- fuse-attn: {fa['error']}")
    else:
        lines.append(
            f"- fuse-attn: {fmt(fa['seconds'])} s, peak RSS {fmt(fa['rss_mb'], 0)} MB "
            f"(python + `import fuse_attn.commands.cli` alone: {fmt(big.get('import_rss_mb'), 0)} MB; graph {big['graph_bytes'] / 1024:.0f} KB; "
            f"weights {gb * 1024:.0f} MB), {big.get('flashfwd_nodes')} FlashFwd nodes, "
            f"output folder on disk {big.get('output_dir_bytes_on_disk', 0) / 2**20:.1f} MB"
        )
        o = big.get("onnxruntime") or {}
        if o.get("error"):
            lines.append(f"- onnxruntime on the fused model: FAILED {o['error']}")
        elif o.get("result"):
            r = o["result"]
            lines.append(
                f"- onnxruntime on the fused model: loads in {r['load_s']:.1f} s, runs in {r['run_s']:.1f} s, "
                f"output {r['output_shape']}, finite={r['finite']}, peak RSS {fmt(o['rss_mb'], 0)} MB"
            )
    return "\n".join(lines)


def time_fuse_attn(fuse_cmd: list[str] | None, path: str, out: str, args, extra: list[str] = ()) -> dict:
    """The fuse-attn columns of a row: its timing, and how many FlashFwd nodes it wrote."""
    if not fuse_cmd:
        return {"fuse_attn": dataclasses.asdict(Run(error="fuse-attn CLI not installed")), "flashfwd_nodes": None}
    fa = measure(fuse_cmd + [path, "-o", out, *extra], args.repeat, args.timeout)
    return {"fuse_attn": dataclasses.asdict(fa), "flashfwd_nodes": count_flashfwd(out) if fa.error is None else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900.0, help="per process, seconds")
    ap.add_argument("--onnxscript-timeout", type=float, default=900.0)
    ap.add_argument("--slow-after", type=float, default=60.0, help="run onnxscript once when a run exceeds this")
    ap.add_argument("--skip-onnxscript", action="store_true")
    ap.add_argument("--seq-sweep", type=int, nargs="*", default=[2048, 8192, 16384, 32768, 65536, 131072],
                    help="the long-context table's fixed seq lengths (--seq-layers layers); empty to skip the table")
    ap.add_argument("--seq-layers", type=int, default=32)
    ap.add_argument("--big", action="store_true", help="also the >= 3 GB external-data model")
    ap.add_argument("--big-layers", type=int, default=BIG.layers)
    ap.add_argument("--big-seq", type=int, default=128, help="static seq of the big graph (causal: the kernel pads it)")
    ap.add_argument("--workdir", default=None, help="where graphs are built (default: a temp dir, removed after)")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    args = ap.parse_args(argv)

    mach = machine()
    fuse_cmd = fuse_attn_command()
    have_api = has_module("fuse_attn") and subprocess.run(
        [sys.executable, "-c", "from fuse_attn import fuse"], cwd=ROOT, capture_output=True
    ).returncode == 0
    have_onnxscript = has_module("onnxscript.rewriter.ort_fusions")
    imp = measure([sys.executable, "-c", IMPORT_ONLY], args.repeat, args.timeout) if fuse_cmd else Run()

    work = args.workdir or tempfile.mkdtemp(prefix="fuse-attn-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        rows = bench_layers(args, work, fuse_cmd, have_onnxscript, have_api, imp.seconds)
        long_rows = bench_long(args, work, fuse_cmd) if args.seq_sweep else []
        big = bench_big(args, work, fuse_cmd, imp.rss_mb) if args.big else None
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    md = table(rows, mach)
    print(md)
    if fuse_cmd:
        print(f"\nfuse-attn CLI: {' '.join(fuse_cmd[:1])}; python + `import fuse_attn.commands.cli` alone: "
              f"{fmt(imp.seconds)} s, {fmt(imp.rss_mb, 0)} MB")
    if long_rows:
        print()
        print(long_table(long_rows))
    if big is not None:
        print()
        print(big_text(big))
    results = {
        "machine": mach,
        "attn": args.attn,
        "graph": dataclasses.asdict(SMALL) | {"layers": None},
        "fuse_attn_cli": fuse_cmd,
        "import_only": dataclasses.asdict(imp),
        "rows": rows,
        "long_rows": long_rows,
        "big": big,
        "markdown": md,
    }
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.json)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
