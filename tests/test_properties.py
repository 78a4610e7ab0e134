"""Never a wrong rewrite: generated attention graphs are fused exactly or left alone.

Hypothesis draws `AttnSpec`s across every dimension the pass accepts (K transposition, scale
placement and value, mask form, casts around Softmax, the NaN guard, dropout, GQA group sizes
1/2/4/8/h, batch, heads, dtypes, the opset-23 Attention op, symbolic seq) and the near misses that
must be left alone (almost-causal masks, padding, biases, tiled kv heads, softmax over another axis,
a non-scalar scale, a second consumer, transposes, cross attention, head dim > 128, a seq no tile
divides), plus the classes found by hand after the first suite missed them: a mask or size-1 scale
that broadcasts the scores to a larger shape (more batch entries, higher rank; batched-heads rank-3
scores), a sliding window computed from shapes under a symbolic seq (causal up to its window, so
fused models of symbolic seq are also run past it), a computed bottom-right mask, V scaled before
MatMul(P, V), a positive bias on kept scores, the diagonal masked too, the causal mask flipped,
swapped Where branches, training-mode dropout, and masks built from Shape(input_ids) (shape only:
must fuse). For every graph:

- a fused block's model equals the original in onnxruntime (float32 <= 1e-4; float16 and bfloat16
  models compared upcast to float32, see `attention_graphs.as_float32`), and
- a near miss is not fused (except the ones a pass may fuse exactly, `AttnSpec.may_fuse_exactly`,
  which must then match).

CI runs ~200 examples (profile "ci", deterministic). Long mode:

    FUSE_ATTN_PROPERTY_EXAMPLES=5000 pytest tests/test_properties.py

prints the figure: examples tried, fused, left alone, wrong (must be 0).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os

import numpy as np

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attention_graphs import (
    FUSED_TOL,
    AttnSpec,
    build,
    describe,
    flash_nodes,
    fuse_model,
    fused_vs_original,
    node_attrs,
)

EXAMPLES = int(os.environ.get("FUSE_ATTN_PROPERTY_EXAMPLES", "0"))
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=160, derandomize=True, database=None, **_common)
# long mode: EXAMPLES in all, four fifths mixed, one fifth near misses only (CI: 160 + 40)
settings.register_profile("long", max_examples=max(EXAMPLES * 4 // 5, 1), derandomize=False, database=None,
                          **_common)
PROFILE = "long" if EXAMPLES else os.environ.get("FUSE_ATTN_PROPERTY_PROFILE", "ci")
NEAR_MISS_EXAMPLES = 40 if not EXAMPLES else max(EXAMPLES // 5, 1)

FIGURE: collections.Counter = collections.Counter()
LEFT_ALONE_POSITIVES: list[str] = []


def figure_lines() -> list[str]:
    lines = [
        f"property suite ({PROFILE}): examples tried {FIGURE['tried']}, fused {FIGURE['fused']}, "
        f"left alone {FIGURE['left alone']} (near misses {FIGURE['near miss']}, of them fused exactly "
        f"{FIGURE['near miss fused exactly']}), wrong {FIGURE['wrong']} (must be 0)",
    ]
    if FIGURE["key masks tried"] or FIGURE["key mask near misses"]:
        lines.append(f"key masks: tried {FIGURE['key masks tried']}, fused and equal under random padding "
                     f"{FIGURE['key masks fused']}; near misses {FIGURE['key mask near misses']}; per-key "
                     f"additive terms fused {FIGURE['additive key terms fused']}")
    if LEFT_ALONE_POSITIVES:
        lines.append(f"positive specs with a block left alone ({len(LEFT_ALONE_POSITIVES)}), first few:")
        lines += ["  " + s for s in LEFT_ALONE_POSITIVES[:5]]
    return lines


class _FigurePrinter:
    """Registered as a pytest plugin: prints the figure in the terminal summary (no -s needed)."""

    def pytest_terminal_summary(self, terminalreporter):
        if FIGURE["tried"] or FIGURE["key masks tried"] or FIGURE["key mask near misses"]:
            terminalreporter.section("fuse-attn property figure")
            for line in figure_lines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _register_figure_printer(request):
    printer = _FigurePrinter()
    if not request.config.pluginmanager.is_registered(printer):
        request.config.pluginmanager.register(printer, "fuse-attn-property-figure")
    yield


# --- strategies --------------------------------------------------------------------------------------


@st.composite
def positive_specs(draw) -> AttnSpec:
    """A block the pass accepts. Tiny: causal blocks at seq 8/16/24, non-causal at a symbolic seq
    (run at 16) or, sometimes, a static seq of 512."""
    form = draw(st.sampled_from(["decomposed"] * 3 + ["attention_op"]))
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "bfloat16"]))
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))  # G in 1, 2, 4, 8, h
    head_dim = draw(st.sampled_from([4, 8, 16]))
    batch = draw(st.sampled_from([1, 1, 2]))
    causal = draw(st.booleans())
    kw: dict = dict(batch=batch, heads=heads, kv_heads=kv, head_dim=head_dim, dtype=dtype, form=form,
                    seed=draw(st.integers(0, 2**16)),
                    target_score_std=draw(st.sampled_from([2.0, 4.0, 6.0])))
    if causal:
        kw.update(mask="causal", seq=draw(st.sampled_from([8, 16, 24])),
                  symbolic_seq=draw(st.booleans()))
    else:
        big = draw(st.integers(0, 9)) == 0  # a static seq of 512 now and then
        kw.update(mask="none", seq=512 if big else 16, symbolic_seq=not big)
        if big:
            kw.update(heads=min(heads, 2), kv_heads=min(kv, 2) if heads % min(kv, 2) == 0 else 1,
                      head_dim=4, batch=1)
    sym = kw["symbolic_seq"]
    if form == "attention_op":
        if causal:
            kw["mask_form"] = draw(st.sampled_from(["attr", "range", "bool"] if not sym else ["attr", "range"]))
        else:
            kw["mask_form"] = draw(st.sampled_from(["attr", "all_true"]))
        kw["mask_cmp"] = draw(st.sampled_from(["LessOrEqual", "GreaterOrEqual"]))
        if draw(st.booleans()):
            kw["scale"] = draw(st.sampled_from([0.1, 0.25, 0.3, 1.0]))
        if draw(st.integers(0, 3)) == 0:
            kw["extra_consumer"] = "out"
    else:
        kw["k_transpose"] = draw(st.sampled_from(["perm0132", "perm0231", "dynamo"]))
        kw["scale_form"] = draw(st.sampled_from(["div", "mul", "sqrt_both", "none"]))
        if kw["scale_form"] != "none" and draw(st.booleans()):
            kw["scale"] = draw(st.sampled_from([0.1, 0.125, 0.25, 0.3, 1.0]))
        if causal:
            forms = ["range", "range_add", "trilu", "range_offset"] + ([] if sym else ["add", "where", "where_not"])
            kw["mask_form"] = draw(st.sampled_from(forms))
            kw["mask_value"] = draw(st.sampled_from(["-inf", "min", "-1e4", "-1e9"]))
            kw["mask_cmp"] = draw(st.sampled_from(["LessOrEqual", "GreaterOrEqual"]))
        kw["softmax_axis"] = draw(st.sampled_from([-1, 3]))
        kw["softmax_cast"] = dtype != "float32" and draw(st.booleans())
        kw["nan_guard"] = draw(st.booleans())
        kw["dropout"] = draw(st.sampled_from(["none", "none", "identity", "identity_ratio"]))
        kw["extra_consumer"] = draw(st.sampled_from(["none"] * 6 + ["q", "present", "out"]))
        if kw["extra_consumer"] == "present" and kw["k_transpose"] == "perm0231":
            kw["extra_consumer"] = "none"
        _draw_added_positive(draw, kw)
    if kw.get("mask_form") in ("range", "all_true", "range_add", "trilu", "range_offset") and \
            draw(st.integers(0, 3)) == 0:
        kw["mask_src"] = "input_ids"  # the mask's length read from Shape(input_ids): shape only
    kw["blocks"] = draw(st.sampled_from([1, 1, 1, 2]))
    try:
        return AttnSpec(**kw)
    except ValueError:
        assume(False)


def _draw_added_positive(draw, kw: dict) -> None:
    """The added positive dimensions of a decomposed spec (each exact, so each must fuse):
    a constant mask with the batch's own leading dim, batched heads (rank-3 scores), a size-1
    scale of rank <= the scores', V multiplied by 1, training-mode dropout of ratio 0."""
    if kw.get("mask_form") in ("add", "where", "where_not") and kw["batch"] > 1 and draw(st.booleans()):
        kw["mask_batch"] = kw["batch"]
    elif draw(st.integers(0, 3)) == 0:
        kw.update(batched_heads=True, softmax_axis=-1)
    rank = 3 if kw.get("batched_heads") else 4
    if kw["scale_form"] in ("div", "mul") and draw(st.integers(0, 3)) == 0:
        kw["scale_rank"] = draw(st.integers(1, rank))
    if draw(st.integers(0, 7)) == 0:
        kw["v_scale"] = 1.0
    if draw(st.integers(0, 7)) == 0:
        kw["dropout"] = "training_zero"
    _draw_exporter_forms(draw, kw)


def _draw_exporter_forms(draw, kw: dict) -> None:
    """What other exporters emit (issue 11), each exact: scales computed from constants and shapes,
    repeat_kv with a computed Expand shape, masks sliced "to the end", multiplicative masks
    (tf2onnx), renormalised softmax (jax2onnx), and the product in 3D around a 4D softmax."""
    # float32 only: the comparison runs low-precision models upcast, which drops the graph's own Cast of
    # a computed scale to float16 (the kernel's scale is that rounded value: right in the real model)
    if draw(st.integers(0, 3)) == 0 and kw.get("scale") is None and not kw.get("scale_rank") \
            and kw["dtype"] == "float32":
        kw["scale_form"] = draw(st.sampled_from(["computed", "shape_pow", "castlike", "sdpa_shape"]
                                                + ([] if kw["symbolic_seq"] else ["seq_shape"])))
    if 1 < kw["kv_heads"] < kw["heads"] and draw(st.booleans()):
        kw["kv_repeat"] = "repeat_kv_where"
    if kw["mask"] == "causal" and draw(st.integers(0, 3)) == 0:
        form = draw(st.sampled_from(["mul_const", "mul_range", "renorm", "renorm_plain"]))
        if form == "mul_const" and kw["symbolic_seq"]:
            form = "mul_range"
        kw["mask_form"] = form
        if form.startswith("mul") and (kw.get("mask_value") == "-inf" or kw["dtype"] == "float16"):
            kw["mask_value"] = "min"
        if form.startswith("renorm"):
            kw.update(nan_guard=False, softmax_cast=False, batched_heads=False, softmax_axis=-1)
    if kw.get("mask_form") in ("range", "range_add", "mul_range", "renorm", "renorm_plain") and draw(st.booleans()):
        kw["to_the_end"] = True
    if not kw.get("batched_heads") and kw["softmax_axis"] == -1 and draw(st.integers(0, 4)) == 0:
        kw["score_moves"] = True
        if kw["extra_consumer"] == "out":
            kw["extra_consumer"] = "none"


NEAR_MISS_KINDS = (
    "mask", "tiled", "axis", "scale_tensor", "consumer", "probs_transpose", "kv_layout", "cross",
    "head_dim", "seq_tile",
    # added after wrong rewrites the generator missed (tests/test_fuse_broadcasts.py, test_symbolic_seq.py)
    "broadcast", "window_symbolic", "bottom_right_computed", "v_scale", "dropout_training",
    # exporters' forms (issue 11): a window next to "to the end" slices, a scale that changes with the
    # seq, a multiplicative mask without its additive part or with the wrong positions, a softmax
    # multiplied by a mask and not renormalised, renormalised with weights, or over the wrong keys
    "exporter_forms",
)


@st.composite
def near_miss_specs(draw) -> AttnSpec:
    """A block the pass must leave alone: a positive spec with one thing wrong."""
    base = draw(positive_specs())
    kind = draw(st.sampled_from(NEAR_MISS_KINDS))
    r = dataclasses.replace
    dec = dict(form="decomposed", dtype=base.dtype)
    # the added positive dimensions that the older kinds' changes would make invalid
    base = r(base, mask_batch=1, mask_src="x")
    if base.batched_heads and kind in ("axis", "scale_tensor", "consumer", "probs_transpose", "kv_layout", "mask"):
        base = r(base, batched_heads=False, scale_rank=min(base.scale_rank, 4))
    try:
        if kind == "mask":
            mask = draw(st.sampled_from(["padding", "causal_padding", "off_by_one", "shift", "sliding_window",
                                         "alibi", "bias", "bias_shared", "bottom_right",
                                         "boost", "strict", "anti_causal"]))
            # at seq 512 the mask is the only cause; at 16 a non-causal block also fails the tile
            seq = draw(st.sampled_from([16, 512]))
            kw = dict(mask=mask, seq=seq, symbolic_seq=False, batch=1, heads=min(base.heads, 2), kv_heads=1,
                      head_dim=4 if seq == 512 else base.head_dim, blocks=1, extra_consumer="none")
            if mask == "bottom_right":
                kw["seq_kv"] = seq * 2
            if mask == "strict":  # query 0 sees nothing: built with -inf and the NaN guard
                kw.update(mask_value="-inf", nan_guard=True)
            if base.form == "attention_op" and mask in ("off_by_one", "shift", "sliding_window", "alibi",
                                                         "bias", "bias_shared", "boost", "anti_causal"):
                kw["mask_form"] = "float" if mask in ("alibi", "bias", "bias_shared", "boost") else "bool"
                if mask == "shift" and draw(st.booleans()):
                    kw["mask_form"] = "range"
                return r(base, **kw)
            base = r(base, **dec, k_transpose="perm0132", scale_form="div") if base.form == "attention_op" else base
            if mask in ("shift", "strict"):
                kw["mask_form"] = draw(st.sampled_from(["add", "where", "where_not", "range", "range_add", "trilu"]))
            else:
                kw["mask_form"] = draw(st.sampled_from(["add", "where", "where_not"]))
            if mask == "bottom_right" and draw(st.booleans()):
                kw["mask_form"] = "range_offset"
            return r(base, **kw)
        if kind == "broadcast":
            return _broadcast_near_miss(draw, base)
        if kind == "window_symbolic":
            # a sliding window computed from shapes under a symbolic seq, window an int64 constant;
            # most past the pass's first sample length (96): causal at every length up to it
            window = draw(st.sampled_from([3, 17, 97, 120, 200, 300]))
            if base.form == "attention_op":
                return r(base, mask="sliding_window", mask_form="range", window=window, symbolic_seq=True,
                         seq=16, blocks=1, scale=None)
            return r(base, mask="sliding_window", mask_form=draw(st.sampled_from(["range", "range_add"])),
                     window=window, symbolic_seq=True, seq=16, mask_value="-inf" if base.causal else "min",
                     extra_consumer="none", blocks=1)
        if kind == "bottom_right_computed":  # k_pos <= q_pos + len(k) - len(q), from shapes
            sym = draw(st.booleans())
            return r(base, **dec, mask="bottom_right", mask_form="range_offset", seq=16, seq_kv=32,
                     symbolic_seq=sym, k_transpose="perm0132", scale_form="div", scale=None, blocks=1,
                     extra_consumer="none", batched_heads=False, mask_batch=1, scale_rank=0, mask_src="x")
        if kind == "dropout_training":
            if base.form == "attention_op":
                base = r(base, **dec, mask_form="range" if base.causal else "add", k_transpose="perm0132",
                         scale_form="div", extra_consumer="none")
            return r(base, dropout="training")
        if kind == "exporter_forms":
            return _exporter_near_miss(draw, base)
        if kind == "tiled":
            heads = draw(st.sampled_from([4, 8]))
            return r(base, **dec, k_transpose=draw(st.sampled_from(["perm0132", "dynamo"])),
                     heads=heads, kv_heads=2, kv_repeat=draw(st.sampled_from(["tile", "concat"])),
                     extra_consumer="none", scale_form=base.scale_form if base.form == "decomposed" else "div")
        # the rest are decomposed-only knobs
        if base.form == "attention_op":
            base = r(base, **dec, mask_form="range" if base.causal else "add", k_transpose="perm0132",
                     scale_form="div", extra_consumer="none")
        if kind == "axis":
            return r(base, softmax_axis=draw(st.sampled_from([2, -2])))
        if kind == "scale_tensor":
            return r(base, scale_form="tensor", scale=None, heads=max(base.heads, 2),
                     kv_heads=max(base.heads, 2) if base.kv == base.heads else base.kv)
        if kind == "consumer":
            return r(base, extra_consumer=draw(st.sampled_from(["probs", "scores"])))
        if kind == "probs_transpose":
            return r(base, probs_transpose=True, extra_consumer="none")
        if kind == "kv_layout":  # exact-or-left-alone: seq == head_dim
            which = draw(st.sampled_from(["k", "v"]))
            return r(base, seq=16, head_dim=16, symbolic_seq=False, mask="causal", mask_form="add",
                     extra_consumer="none", k_transpose="untransposed" if which == "k" else base.k_transpose,
                     v_transpose="perm0231" if which == "v" else "perm0213")
        if kind == "cross":
            return r(base, mask="none", seq=512, seq_kv=draw(st.sampled_from([1024, 256])), symbolic_seq=False,
                     batch=1, heads=1, kv_heads=1, head_dim=4, blocks=1, extra_consumer="none",
                     mask_form="add")
        if kind == "head_dim":
            return r(base, heads=1, kv_heads=1, head_dim=draw(st.sampled_from([136, 160, 256])),
                     extra_consumer="none")
        if kind == "seq_tile":
            return r(base, mask="none", symbolic_seq=False, seq=draw(st.sampled_from([16, 128, 640])),
                     heads=1, kv_heads=1, blocks=1)
        if kind == "v_scale":
            return r(base, v_scale=draw(st.sampled_from([0.5, 2.0, 0.125])))
    except ValueError:
        assume(False)
    raise AssertionError(kind)


def _exporter_near_miss(draw, base: AttnSpec) -> AttnSpec:
    r = dataclasses.replace
    common = dict(form="decomposed", dtype=base.dtype, k_transpose=draw(st.sampled_from(["perm0132", "dynamo"])),
                  blocks=1, extra_consumer="none", softmax_axis=-1, softmax_cast=False, nan_guard=False,
                  batched_heads=False, mask_batch=1, scale_rank=0, scale=None, probs_transpose=False,
                  mask_src="x", score_moves=draw(st.booleans()), kv_repeat="repeat_kv", seq_kv=None,
                  scale_form=draw(st.sampled_from(["div", "computed", "castlike"] if base.dtype == "float32"
                                                  else ["div"])))
    which = draw(st.sampled_from(["window", "seq_scale", "mul_only", "mul_mask", "renorm_nodiv", "renorm_weighted",
                                  "renorm_mask"]))
    if which == "window":
        return r(base, **common, mask="sliding_window", mask_form=draw(st.sampled_from(["range", "mul_range", "renorm"])),
                 window=draw(st.sampled_from([5, 97, 120, 300])), symbolic_seq=True, seq=16, to_the_end=True,
                 mask_value="min")
    if which == "seq_scale":
        return r(base, **{**common, "scale_form": "seq_shape", "dtype": "float32"}, mask="causal", symbolic_seq=True, seq=16,
                 mask_form=draw(st.sampled_from(["range", "mul_range"])), mask_value="min")
    seq = draw(st.sampled_from([16, 512]))
    small = dict(seq=seq, symbolic_seq=False, batch=1, heads=min(base.heads, 2), kv_heads=1,
                 head_dim=4 if seq == 512 else base.head_dim, mask_value="min")
    if which == "mul_only":
        return r(base, **common, **small, mask="causal", mask_form="mul_only")
    if which == "mul_mask":
        return r(base, **common, **small, mask=draw(st.sampled_from(["off_by_one", "anti_causal", "shift"])),
                 mask_form="mul_const")
    if which == "renorm_mask":
        return r(base, **common, **small, mask="shift", mask_form="renorm")
    return r(base, **common, **small, mask="causal", mask_form=which)


def _broadcast_near_miss(draw, base: AttnSpec) -> AttnSpec:
    """The mask or scale broadcasts the scores to a larger shape: a constant mask with more batch
    entries than q/k/v (must be left alone), or a size-1 scale of higher rank than the scores
    (the output only gains leading 1s: left alone, or fused exactly; with the PV output returned
    its shape is observable, so left alone)."""
    r = dataclasses.replace
    common = dict(form="decomposed", dtype=base.dtype, k_transpose=draw(st.sampled_from(["perm0132", "dynamo"])),
                  blocks=1, symbolic_seq=False, softmax_cast=False, mask_src="x", score_moves=False)
    if draw(st.booleans()):
        return r(base, **common, batch=1, mask_batch=draw(st.sampled_from([2, 3])), mask="causal",
                 mask_form=draw(st.sampled_from(["add", "where", "where_not"])), mask_value="-inf",
                 seq=draw(st.sampled_from([8, 16])), batched_heads=False, scale_form="div", scale_rank=0,
                 extra_consumer=draw(st.sampled_from(["none", "out"])))
    batched = draw(st.booleans())
    return r(base, **common, batched_heads=batched, softmax_axis=-1, probs_transpose=False, mask_batch=1,
             mask="causal", mask_form=draw(st.sampled_from(["add", "where", "range"])), mask_value="min",
             seq=16, scale_form=draw(st.sampled_from(["div", "mul"])),
             scale_rank=draw(st.sampled_from([4, 5])) if batched else 5,
             extra_consumer=draw(st.sampled_from(["none", "out"])))


# --- the property ------------------------------------------------------------------------------------


def _check(spec: AttnSpec) -> None:
    assume(spec is not None)
    built = build(spec)
    fused, report = fuse_model(built.model)
    FIGURE["tried"] += 1
    fused_blocks = [b for b in report.blocks if b.fused]
    n_flash = len(flash_nodes(fused))
    must_not = not spec.should_fuse and not spec.may_fuse_exactly
    wrong = []
    if n_flash != len(fused_blocks):
        wrong.append(f"{n_flash} FlashFwd nodes but {len(fused_blocks)} blocks reported fused")
    if must_not and fused_blocks:
        wrong.append(f"a near miss ({', '.join(spec.near_miss_causes())}) was fused")
    if fused_blocks or n_flash:
        runs = [built.inputs(seed=seed) for seed in (1, 2)]
        if spec.symbolic_seq:  # and at a length past every constant of a computed mask (a window)
            runs.append(built.inputs(seed=3, seq=spec.seq + spec.window + 24))
        for feeds in runs:
            try:
                diff = fused_vs_original(built, fused, feeds)
            except AssertionError as exc:  # output shapes differ
                wrong.append(f"fused outputs have other shapes than the original's: {exc}")
                break
            if not diff <= FUSED_TOL:
                wrong.append(f"fused output differs from the original by {diff:.3e}"
                             f" (at seq {feeds['x'].shape[1]})")
                break
        # onnxruntime ignores training mode, so the numbers cannot tell: the node must carry the ratio
        want_p = float(np.float32(0.1)) if spec.dropout == "training" else 0.0
        for node in flash_nodes(fused):
            got_p = node_attrs(node).get("dropout_p", 0.0)
            if not math.isclose(got_p, want_p, abs_tol=1e-7):
                wrong.append(f"FlashFwd dropout_p {got_p} but the graph's dropout is {want_p}")
    if wrong:
        FIGURE["wrong"] += 1
    elif fused_blocks:
        FIGURE["fused"] += 1
        if not spec.should_fuse:
            FIGURE["near miss fused exactly"] += 1
    else:
        FIGURE["left alone"] += 1
    if not wrong and spec.should_fuse and not all(b.fused for b in report.blocks):
        # informational: a positive block left alone is a missed fusion, never a wrong one (a
        # two-block model whose second block is left alone still counts as fused above)
        LEFT_ALONE_POSITIVES.append(f"{describe(spec)}: {[b.reason for b in report.blocks]}")
    if not spec.should_fuse:
        FIGURE["near miss"] += 1
    assert not wrong, f"{describe(spec)}: {'; '.join(wrong)}; report: {report.blocks}"


@settings(settings.get_profile(PROFILE))
@given(positive_specs() | near_miss_specs())
def test_fused_equals_original_or_left_alone(spec):
    _check(spec)


@settings(settings.get_profile(PROFILE), max_examples=NEAR_MISS_EXAMPLES)
@given(near_miss_specs())
def test_near_misses_left_alone(spec):
    _check(spec)


# --- long fixed seq lengths: the mask proof must not grow with seq² -------------------------------
# Near misses at up to 131,072 (a window, an off-by-one diagonal, a shift, padding keys or rows,
# one entry flipped anywhere, the last row included), judged against the spec's own oracle: the
# graphs are too long for onnxruntime, and only the mask differs from what the suite runs above.

@st.composite
def long_mask_specs(draw):
    from long_masks import FORMS, MaskSpec

    seq = draw(st.sampled_from([16_384, 32_768, 65_536, 131_072]))
    form = draw(st.sampled_from(FORMS))
    param = draw(st.integers(1, seq - 1))
    if form == "shifted":
        param = draw(st.sampled_from([-1, 1, 2, -param, param]))
    row = draw(st.sampled_from([seq - 1, draw(st.integers(0, seq - 1))]))
    col = draw(st.integers(0, seq - 1))
    return MaskSpec(seq, form, param=param, row=row, col=col)


@settings(settings.get_profile(PROFILE), max_examples=40 if not EXAMPLES else max(EXAMPLES // 10, 1))
@given(long_mask_specs())
def test_long_masks_fused_only_when_exactly_causal(spec):
    from long_masks import build as build_long

    from fuse_attn import fuse

    _, report = fuse(build_long(spec))
    (block,) = report.blocks
    if spec.expected == "alone":
        assert not block.fused, f"{spec}: fused a near miss"
    else:
        assert block.fused and block.causal == (spec.expected == "causal"), f"{spec}: {block.reason}"


# --- key masks (issue 17): a padding mask from an input rides in the key-bias column ------------------
# A (b, s) attention_mask added as (1 - m)·min, alone or on the causal mask, must fuse with its column
# and equal the original under random padded masks (real positions only where a row sees no key);
# its near misses (a query-side mask, one mask per query row, masks that differ between the q heads
# of a GQA group, ALiBi on top, head dim 128) must be left alone, each with its reason. A general
# per-key additive term (a float input added as it is) is fused exactly or left alone with a reason.

KEY_MASK_EXAMPLES = 40 if not EXAMPLES else max(EXAMPLES // 10, 1)


@st.composite
def key_mask_specs(draw) -> AttnSpec:
    causal = draw(st.booleans())
    heads = draw(st.sampled_from([1, 2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))
    kw: dict = dict(mask="causal_padding" if causal else "padding", batch=draw(st.sampled_from([1, 2, 3])),
                    heads=heads, kv_heads=kv, head_dim=draw(st.sampled_from([4, 8, 16, 64])),
                    dtype=draw(st.sampled_from(["float32", "float32", "float16"])),
                    seq=draw(st.sampled_from([8, 16, 24, 40] + ([] if causal else [512]))),
                    scale_form=draw(st.sampled_from(["div", "mul", "sqrt_both"])),
                    mask_value=draw(st.sampled_from(["-inf", "min", "-1e4"])),
                    seed=draw(st.integers(0, 2**16)), target_score_std=draw(st.sampled_from([2.0, 4.0, 6.0])))
    if kw["seq"] == 512:
        kw.update(heads=min(heads, 2), kv_heads=1, head_dim=8)
    return AttnSpec(**kw)


@st.composite
def real_tokens(draw, batch: int, seq: int) -> np.ndarray:
    """(batch, seq) bool: each entry right or left padded to a drawn length, or real tokens at drawn
    positions; at least one real token per entry."""
    real = np.zeros((batch, seq), dtype=bool)
    for i in range(batch):
        how = draw(st.sampled_from(["right", "left", "scattered", "full"]))
        n = draw(st.integers(1, seq))
        if how == "right":
            real[i, :n] = True
        elif how == "left":
            real[i, seq - n:] = True
        elif how == "scattered":
            real[i, draw(st.lists(st.integers(0, seq - 1), min_size=1, max_size=seq, unique=True))] = True
        else:
            real[i] = True
    return real


def _key_mask_errors(km, fused, real: np.ndarray, seed: int):
    """The fused model against the original on one padded feed, as `fuse-attn --verify` compares."""
    from fuse_attn import verify
    from key_mask_graphs import mask_feed

    rows_without_key = km.spec.mask == "causal_padding" and bool((~real[:, 0]).any())
    feed = verify.Feed("drawn", mask_feed(km, real, np.random.default_rng(seed)),
                       {"attention_mask": real}, rows_without_key)
    sessions = (verify._session(km.model, None), verify._session(fused, None))
    return verify.run_feed(*sessions, [o.name for o in km.model.graph.output], feed).checks


@settings(settings.get_profile(PROFILE), max_examples=KEY_MASK_EXAMPLES)
@given(st.data())
def test_key_masks_fuse_and_match_under_random_padding(data):
    from key_mask_graphs import key_mask_model

    spec = data.draw(key_mask_specs())
    km = key_mask_model(spec, "padding")
    fused, report = fuse_model(km.model)
    (block,) = report.blocks
    FIGURE["key masks tried"] += 1
    assert block.fused, f"{spec.short_id()}: {block.reason}"
    assert block.key_mask_inputs == ["attention_mask"] and report.assumed_all_ones == []
    assert all(node_attrs(n).get("key_bias_column") == 1 for n in flash_nodes(fused))
    for draw_index in range(3):
        real = data.draw(real_tokens(spec.batch, spec.seq), label=f"real tokens {draw_index}")
        for check in _key_mask_errors(km, fused, real, spec.seed + draw_index):
            if not check.ok:
                FIGURE["wrong"] += 1
            assert check.ok, f"{spec.short_id()}: {check.line()} with real tokens {real.astype(int).tolist()}"
    FIGURE["key masks fused"] += 1


@settings(settings.get_profile(PROFILE), max_examples=KEY_MASK_EXAMPLES)
@given(st.data())
def test_key_mask_near_misses_left_alone_with_their_reason(data):
    from key_mask_graphs import NEAR_MISSES, REASON_WORDS, key_mask_model

    spec = data.draw(key_mask_specs())
    form = data.draw(st.sampled_from(NEAR_MISSES))
    if form == "alibi":
        assume(spec.dtype == "float32")  # the slopes' bias is a float32 constant
    km = key_mask_model(spec, form)
    fused, report = fuse_model(km.model)
    (block,) = report.blocks
    FIGURE["key mask near misses"] += 1
    # One key mask per q head is a near miss inside a GQA group; with one q head per kv head the
    # column could carry it, so there it may fuse, exactly.
    if block.fused and form == "per_head" and spec.kv == spec.heads:
        real = data.draw(real_tokens(spec.batch, spec.seq))
        assert all(c.ok for c in _key_mask_errors(km, fused, real, spec.seed)), spec.short_id()
        return
    assert not block.fused, f"{form} {spec.short_id()}: fused a near miss"
    words = REASON_WORDS[form]
    assert any(w in block.reason.lower() for w in words), f"{form}: reason {block.reason!r} has none of {words}"
    assert "attention_mask" in block.reason or form == "alibi" and "bias" in block.reason, block.reason


@settings(settings.get_profile(PROFILE), max_examples=KEY_MASK_EXAMPLES // 2)
@given(st.data())
def test_per_key_additive_terms_fused_exactly_or_left_alone(data):
    from key_mask_graphs import key_mask_model

    spec = data.draw(key_mask_specs().filter(lambda s: s.dtype == "float32"))
    km = key_mask_model(spec, "additive")
    fused, report = fuse_model(km.model)
    (block,) = report.blocks
    if not block.fused:
        assert "attention_mask" in block.reason, block.reason
        return
    FIGURE["additive key terms fused"] += 1
    real = data.draw(real_tokens(spec.batch, spec.seq))
    for check in _key_mask_errors(km, fused, real, spec.seed):
        assert check.ok, f"{spec.short_id()}: {check.line()}"


# The first examples the two key-mask properties above found wrong (fused, and different from the
# original): a per-key term from the input beside a constant that is not per key (the causal
# triangle, ALiBi's per-head distance bias) must keep that constant, or be left alone.
@pytest.mark.parametrize("mask, form, heads", [("causal_padding", "additive", 1), ("padding", "alibi", 2)])
def test_a_constant_beside_a_key_term_is_kept_or_the_block_left_alone(mask, form, heads):
    from key_mask_graphs import key_mask_model

    spec = AttnSpec(seq=8, heads=heads, kv_heads=heads, head_dim=4, mask=mask, target_score_std=2.0)
    km = key_mask_model(spec, form)
    fused, report = fuse_model(km.model)
    (block,) = report.blocks
    if block.fused:
        real = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=bool)
        errors = [c for c in _key_mask_errors(km, fused, real, 0) if not c.ok]
        assert not errors, f"{form} on {mask}: fused as {report.blocks[0].line()!r}, {errors[0].line()}"
