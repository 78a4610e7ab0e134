"""--verify and `check`: run the original and the fused model in onnxruntime on the same random
inputs, first with every token mask all ones, then with the mask inputs padded.

The padded feeds: right padding, left padding, random real tokens per batch entry, and whole kv
tiles padded. Which inputs are token masks is the report's to say (a block's `key_mask_inputs`,
or the inputs --assume-no-padding took as all ones), never a guess from an input's name. Where a
padded mask leaves a query row with no visible key (a causal block, before an entry's first real
token), the two models may differ there and no real position reads it: outputs laid out
(batch, ..., seq, ...) like the mask are then compared at the real positions only.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import onnx

from fuse_attn.modelio import InputError

# Per dtype: (abs, rel) — allowed |fused - original| <= abs + rel * max|original|.
TOLERANCES = {
    np.dtype(np.float32): (1e-4, 1e-4),
    np.dtype(np.float64): (1e-6, 1e-6),
    np.dtype(np.float16): (1e-2, 1e-2),
}
BF16_TOLERANCE = (3e-2, 2e-2)
SYMBOLIC_BATCH, SYMBOLIC_SEQ = 1, 128
# An input's declared size is data: feeds larger than this (1 GiB of float32) are not made.
MAX_FEED_ELEMENTS = 1 << 28
# A symbolic batch in the padded feeds: two entries, so each gets its own mask (a column shared
# across the batch shows).
PADDED_BATCH = 2
# The kernel's smallest kv tile and its query tile: the "tiles" feed pads whole ones.
KV_TILE, QUERY_TILE = 512, 128

ALL_ONES = "all-ones"
PADDED_FEEDS = ("right", "left", "random", "tiles")


@dataclasses.dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    tolerance: float
    kind: str = "verify"  # what compared: `fuse-attn --verify`, or `compile --simulate`
    feed: str = ALL_ONES  # which inputs: all-ones masks, or one of the padded feeds

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        feed = "" if self.feed == ALL_ONES else f" [{self.feed}]"
        return (f"{self.kind}{feed} {self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} "
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


def random_inputs(model: onnx.ModelProto, seed: int = 0, batch: int = SYMBOLIC_BATCH) -> dict[str, np.ndarray]:
    """Token ids within the vocabulary, all-ones integer masks, normal floats; symbolic dims
    get `batch` (axis 0) and seq 128."""
    rng = np.random.default_rng(seed)
    rows = _gather_rows(model)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else SYMBOLIC_SEQ)
                 for i, d in enumerate(tensor_type.shape.dim)]
        if any(d < 0 for d in shape) or math.prod(shape) > MAX_FEED_ELEMENTS:
            raise InputError(f"input '{value.name}' declares shape {shape}: no feed of that size is made to "
                             f"verify (at most {MAX_FEED_ELEMENTS} elements)")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating) or tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif value.name in rows:
            feeds[value.name] = rng.integers(0, rows[value.name], size=shape).astype(dtype)
        else:
            feeds[value.name] = np.ones(shape, dtype=dtype)
    return feeds


def session_options():
    """onnxruntime's options for a user's model: its own log silenced, which writes node names to
    stderr raw (an escape sequence in a name would reach the terminal); its errors still arrive
    as exceptions, printed escaped in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only
    return options


def _session(proto: onnx.ModelProto, base_dir: str | None):
    import onnxruntime as ort

    options = session_options()
    if base_dir is not None:
        # External data resolves against this folder, as it would beside a model file there:
        # nothing is written next to the user's model (its folder may be read-only).
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.path.abspath(base_dir))
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


# -- padded feeds ------------------------------------------------------------------------------

@dataclasses.dataclass
class Feed:
    """One set of inputs for both models, and what it does to the token masks."""

    name: str  # ALL_ONES or one of PADDED_FEEDS
    inputs: dict[str, np.ndarray]
    # Per padded mask input: (batch, seq) bool, True at the real tokens (keys the mask keeps).
    real: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Some query row sees no real key (a causal block, before an entry's first real token): the
    # outputs are then compared at real positions only.
    rows_without_key: bool = False

    def describe(self) -> str:
        """What this feed pads, in one line."""
        if not self.real:
            return f"feed {self.name}: every token mask all ones"
        parts = []
        for name, real in self.real.items():
            lengths = [int(n) for n in real.sum(axis=1)]
            parts.append(f"'{name}' {_HOW[self.name]}, real tokens per batch entry {lengths} of {real.shape[1]}")
        text = f"feed {self.name}: " + "; ".join(parts)
        if self.rows_without_key:
            text += ("; rows before an entry's first real token see no key under the causal mask, "
                     "so outputs laid out (batch, seq) are compared at real positions only")
        return text


_HOW = {"right": "padded at the end", "left": "padded at the start",
        "random": "real tokens at random positions", "tiles": "whole tiles padded (even entries at the end, odd at the start)"}


def mask_inputs(report) -> list[str]:
    """The graph inputs that are token masks, as the report names them: those a fused block's
    key-bias column is computed from, and those --assume-no-padding took as all ones."""
    names = [n for b in report.blocks if b.fused for n in b.key_mask_inputs]
    names += report.assumed_all_ones
    return list(dict.fromkeys(names))


def fused_mask_inputs(model: onnx.ModelProto) -> tuple[list[str], bool]:
    """The graph inputs that are token masks, read from a fused model alone (compile has no
    report): those whose contents reach a FlashFwd node's key-bias column, k's last head-dim row,
    which the pass writes as the last operand of a Concat on k's head axis (contract.py). Readers
    of a value's type only (Shape, Size, CastLike's second input) do not count. Also: whether a
    node with a column is causal (rows before an entry's first real token then see no key)."""
    from fuse_attn.ir import contract

    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = {v.name for v in model.graph.input} - initializers
    found, causal = [], False
    for node in model.graph.node:
        if node.domain != contract.DOMAIN or node.op_type != contract.OP_TYPE or len(node.input) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        concat = producers.get(node.input[1])
        if not attrs.get("key_bias_column") or concat is None or concat.op_type != "Concat" or not concat.input:
            continue
        causal = causal or bool(attrs.get("use_causal_mask"))
        pending, seen = [concat.input[-1]], set()
        while pending:
            name = pending.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in graph_inputs:
                found.append(name)
            producer = producers.get(name)
            if producer is None or producer.op_type in ("Shape", "Size"):
                continue
            pending += producer.input[:1] if producer.op_type == "CastLike" else producer.input
    order = [v.name for v in model.graph.input]
    return sorted(set(found), key=order.index), causal


def _lengths(feed: str, batch: int, seq: int, rng: np.random.Generator) -> list[int]:
    if feed == "random":
        return [int(n) for n in rng.integers(1, seq + 1, size=batch)]
    if feed == "tiles":
        # Whole kv tiles of 512 padded when there is more than one; else whole 128-query tiles.
        unit = KV_TILE if seq > KV_TILE else QUERY_TILE
        return [min(300, unit - 1) if seq > unit else max(1, seq // 4)] * batch
    # right, left: a quarter, a half, ... padded; every entry keeps a real token.
    return [max(1, seq - (i + 1) * seq // (batch + 2)) for i in range(batch)]


def _real_tokens(feed: str, batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    real = np.zeros((batch, seq), dtype=bool)
    for i, n in enumerate(_lengths(feed, batch, seq, rng)):
        if feed == "right" or (feed == "tiles" and i % 2 == 0):
            real[i, :n] = True
        elif feed in ("left", "tiles"):
            real[i, seq - n:] = True
        else:
            real[i, rng.choice(seq, size=n, replace=False)] = True
    return real


def padded_feeds(model: onnx.ModelProto, masks: list[str], *, causal: bool, seed: int = 0,
                 template: dict[str, np.ndarray] | None = None) -> list[Feed]:
    """The four padded feeds for `model`'s inputs: every input in `masks` of rank >= 2 gets one
    real-token pattern per batch entry over its last axis (broadcast over the axes between),
    in its own dtype; the other inputs are `template`'s (default: as `random_inputs` makes them,
    at PADDED_BATCH when the batch is symbolic). `causal`: some fused block with a key mask is
    causal, so a row before an entry's first real token has no visible key."""
    base = template if template is not None else random_inputs(model, seed, batch=PADDED_BATCH)
    targets = [n for n in masks if n in base and base[n].ndim >= 2 and base[n].shape[-1] > 0]
    if not targets:
        return []
    token_ids = [n for n in _gather_rows(model) if n in base and base[n].ndim >= 2]
    feeds = []
    for number, name in enumerate(PADDED_FEEDS):
        rng = np.random.default_rng([seed, number])
        inputs, real = dict(base), {}
        for mask in targets:
            given = base[mask]
            tokens = _real_tokens(name, given.shape[0], given.shape[-1], rng)
            shape = (given.shape[0],) + (1,) * (given.ndim - 2) + (given.shape[-1],)
            inputs[mask] = np.broadcast_to(tokens.reshape(shape), given.shape).astype(given.dtype)
            real[mask] = tokens
            # As a tokenizer pads: token ids laid out like the mask hold id 0 at its padded
            # positions, so a model that picks a row by token id (CLIP's pooler: the argmax id,
            # its end-of-text token) picks a real one, as it does on real padded requests.
            for ids in token_ids:
                if inputs[ids].shape[0] == tokens.shape[0] and inputs[ids].shape[-1] == tokens.shape[1]:
                    keep = tokens.reshape((tokens.shape[0],) + (1,) * (inputs[ids].ndim - 2) + (tokens.shape[1],))
                    inputs[ids] = np.where(keep, inputs[ids], 0).astype(inputs[ids].dtype)
        without_key = causal and any((~r[:, 0]).any() for r in real.values())
        feeds.append(Feed(name, inputs, real, without_key))
    return feeds


def _real_positions(shape: tuple[int, ...], feed: Feed) -> tuple[int, np.ndarray] | None:
    """(seq axis, (batch, seq) bool) when an output is laid out (batch, ..., seq, ...) like a
    padded mask (axis 1 preferred): the positions to compare. None: compare it whole."""
    for axis in range(1, len(shape)):
        masks = [r for r in feed.real.values() if shape[0] == r.shape[0] and shape[axis] == r.shape[1]]
        if masks:
            return axis, np.logical_and.reduce(masks)
    return None


def _select(array: np.ndarray, where: tuple[int, np.ndarray] | None) -> np.ndarray:
    if where is None:
        return array
    axis, real = where
    return np.moveaxis(array, axis, 1)[real]  # (real positions, the other axes)


def compared_part(array: np.ndarray, feed: Feed) -> np.ndarray:
    """What `compare_outputs` compares of an output: its real positions when the feed has rows
    without a visible key and the output is laid out like the mask, else all of it."""
    array = np.asarray(array)
    return _select(array, _real_positions(array.shape, feed)) if feed.rows_without_key else array


def _check(name: str, want: np.ndarray, got: np.ndarray, feed: str, tolerance: tuple[float, float] | None = None,
           kind: str = "verify") -> OutputCheck:
    want, got = np.asarray(want), np.asarray(got)
    if want.dtype.kind not in "fc":
        diff = np.abs(want.astype(np.int64) - got.astype(np.int64)).max(initial=0)
        return OutputCheck(name, float(diff), 0.0, 0.0, kind=kind, feed=feed)
    atol, rtol = tolerance or TOLERANCES.get(want.dtype, BF16_TOLERANCE)
    want64, got64 = want.astype(np.float64), got.astype(np.float64)
    diff = np.abs(want64 - got64)
    diff[np.isnan(want64) & np.isnan(got64)] = 0.0
    scale = float(np.abs(want64[~np.isnan(want64)]).max(initial=0.0))
    max_abs = float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))
    return OutputCheck(name, max_abs, max_abs / scale if scale else max_abs, atol + rtol * scale, kind=kind, feed=feed)


def compare_outputs(names: list[str], expected, actual, feed: Feed, *, tolerance: tuple[float, float] | None = None,
                    kind: str = "verify") -> FeedResult:
    """Per output: `actual` against `expected` on `feed`, at its real positions when the feed has
    rows without a visible key. `tolerance`: (abs, rel) for every output (default: per dtype)."""
    checks, whole = [], []
    for name, want, got in zip(names, expected, actual):
        where = _real_positions(np.shape(want), feed) if feed.rows_without_key else None
        if feed.rows_without_key and where is None:
            whole.append(name)
        checks.append(_check(name, _select(np.asarray(want), where), _select(np.asarray(got), where), feed.name,
                             tolerance, kind))
    return FeedResult(feed, checks, whole)


def run_feed(original, fused, names: list[str], feed: Feed) -> FeedResult:
    """One feed through both models (sessions given), compared."""
    return compare_outputs(names, original.run(None, feed.inputs), fused.run(None, feed.inputs), feed)


def compare(original: onnx.ModelProto, fused: onnx.ModelProto, feeds: dict[str, np.ndarray] | Feed,
            base_dir: str | None = None) -> list[OutputCheck]:
    """Per output of `original`: the fused model's error on `feeds` (a Feed with rows that see no
    key is compared at its real positions)."""
    feed = feeds if isinstance(feeds, Feed) else Feed(ALL_ONES, feeds)
    names = [o.name for o in original.graph.output]
    return run_feed(_session(original, base_dir), _session(fused, base_dir), names, feed).checks


@dataclasses.dataclass
class FeedResult:
    feed: Feed
    checks: list[OutputCheck]
    compared_whole: list[str] = dataclasses.field(default_factory=list)  # outputs not laid out like the mask

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def compared(self) -> str:
        if not self.feed.rows_without_key:
            return "all positions"
        text = "real positions"
        if self.compared_whole:
            text += f" (whole, not laid out (batch, seq): {', '.join(self.compared_whole)})"
        return text

    @property
    def max_err(self) -> float | None:
        return max((c.max_abs for c in self.checks), default=None)

    def to_json(self) -> dict:
        """Standard JSON: a non-finite error is written as its name ("inf")."""
        def num(x: float | None):
            return x if x is None or np.isfinite(x) else str(x)

        return {"feed": self.feed.name,
                "real_tokens": {n: [int(k) for k in r.sum(axis=1)] for n, r in self.feed.real.items()},
                "compared": self.compared(), "ok": self.ok, "max_err": num(self.max_err),
                "outputs": [{"name": c.name, "max_abs": num(c.max_abs), "max_rel": num(c.max_rel),
                             "tolerance": c.tolerance, "ok": c.ok} for c in self.checks]}


def result_lines(results: list[FeedResult], report=None) -> list[str]:
    """What --verify prints: per feed, what it pads and what was compared, then one line per output."""
    lines = []
    for result in results:
        if result.feed.real:
            whole = f"; compared whole: {', '.join(result.compared_whole)}" if result.compared_whole else ""
            lines.append(result.feed.describe() + whole)
        lines += [c.line() for c in result.checks]
    assumed = report.assumed_all_ones if report is not None else []
    if assumed and any(not r.ok for r in results if r.feed.real):
        lines.append(f"padded feeds fail: {', '.join(repr(n) for n in assumed)} taken as all ones "
                     "(--assume-no-padding), so the fused model lets real tokens attend to padding")
    return lines


def verify_fused(original: onnx.ModelProto, fused: onnx.ModelProto, report, *, shapes_from: onnx.ModelProto | None = None,
                 base_dir: str | None = None, seed: int = 0) -> list[FeedResult]:
    """The fused model against the original on the all-ones feed, then on the padded feeds of
    every token mask the report names. `shapes_from`: the model whose input shapes to feed (the
    fused one when --shape/--dim fixed them; the original by default)."""
    shapes_from = shapes_from if shapes_from is not None else original
    feeds = [Feed(ALL_ONES, random_inputs(shapes_from, seed))]
    causal = any(b.fused and b.causal for b in report.blocks)
    feeds += padded_feeds(shapes_from, mask_inputs(report), causal=causal, seed=seed)
    sessions = _session(original, base_dir), _session(fused, base_dir)
    names = [o.name for o in original.graph.output]
    return [run_feed(*sessions, names, feed) for feed in feeds]
