"""Never a wrong rewrite: generated attention graphs are fused exactly or left alone.

Hypothesis draws `AttnSpec`s across every dimension the pass accepts (K transposition, scale
placement and value, mask form, casts around Softmax, the NaN guard, dropout, GQA group sizes
1/2/4/8/h, batch, heads, dtypes, the opset-23 Attention op, symbolic seq) and the near misses that
must be left alone (almost-causal masks, padding, biases, tiled kv heads, softmax over another axis,
a non-scalar scale, a second consumer, transposes, cross attention, head dim > 128, a seq no tile
divides). For every graph:

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
import os

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
    if LEFT_ALONE_POSITIVES:
        lines.append(f"positive specs left alone ({len(LEFT_ALONE_POSITIVES)}), first few:")
        lines += ["  " + s for s in LEFT_ALONE_POSITIVES[:5]]
    return lines


class _FigurePrinter:
    """Registered as a pytest plugin: prints the figure in the terminal summary (no -s needed)."""

    def pytest_terminal_summary(self, terminalreporter):
        if FIGURE["tried"]:
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
    else:
        kw["k_transpose"] = draw(st.sampled_from(["perm0132", "perm0231", "dynamo"]))
        kw["scale_form"] = draw(st.sampled_from(["div", "mul", "sqrt_both", "none"]))
        if kw["scale_form"] != "none" and draw(st.booleans()):
            kw["scale"] = draw(st.sampled_from([0.1, 0.125, 0.25, 0.3, 1.0]))
        if causal:
            forms = ["range", "range_add", "trilu"] + ([] if sym else ["add", "where"])
            kw["mask_form"] = draw(st.sampled_from(forms))
            kw["mask_value"] = draw(st.sampled_from(["-inf", "min", "-1e4", "-1e9"]))
            kw["mask_cmp"] = draw(st.sampled_from(["LessOrEqual", "GreaterOrEqual"]))
        kw["softmax_axis"] = draw(st.sampled_from([-1, 3]))
        kw["softmax_cast"] = dtype != "float32" and draw(st.booleans())
        kw["nan_guard"] = draw(st.booleans())
        kw["dropout"] = draw(st.sampled_from(["none", "none", "identity", "identity_ratio"]))
        kw["extra_consumer"] = draw(st.sampled_from(["none"] * 6 + ["q", "present"]))
        if kw["extra_consumer"] == "present" and kw["k_transpose"] == "perm0231":
            kw["extra_consumer"] = "none"
    kw["blocks"] = draw(st.sampled_from([1, 1, 1, 2]))
    try:
        return AttnSpec(**kw)
    except ValueError:
        assume(False)


NEAR_MISS_KINDS = (
    "mask", "tiled", "axis", "scale_tensor", "consumer", "probs_transpose", "kv_layout", "cross",
    "head_dim", "seq_tile",
)


@st.composite
def near_miss_specs(draw) -> AttnSpec:
    """A block the pass must leave alone: a positive spec with one thing wrong."""
    base = draw(positive_specs())
    kind = draw(st.sampled_from(NEAR_MISS_KINDS))
    r = dataclasses.replace
    dec = dict(form="decomposed", dtype=base.dtype)
    try:
        if kind == "mask":
            mask = draw(st.sampled_from(["padding", "causal_padding", "off_by_one", "shift", "sliding_window",
                                         "alibi", "bias", "bias_shared", "bottom_right"]))
            # at seq 512 the mask is the only cause; at 16 a non-causal block also fails the tile
            seq = draw(st.sampled_from([16, 512]))
            kw = dict(mask=mask, seq=seq, symbolic_seq=False, batch=1, heads=min(base.heads, 2), kv_heads=1,
                      head_dim=4 if seq == 512 else base.head_dim, blocks=1, extra_consumer="none")
            if mask == "bottom_right":
                kw["seq_kv"] = seq * 2
            if base.form == "attention_op" and mask in ("off_by_one", "shift", "sliding_window", "alibi",
                                                         "bias", "bias_shared"):
                kw["mask_form"] = "float" if mask in ("alibi", "bias", "bias_shared") else "bool"
                if mask == "shift" and draw(st.booleans()):
                    kw["mask_form"] = "range"
                return r(base, **kw)
            base = r(base, **dec, k_transpose="perm0132", scale_form="div") if base.form == "attention_op" else base
            if mask in ("shift",):
                kw["mask_form"] = draw(st.sampled_from(["add", "where", "range", "range_add", "trilu"]))
            else:
                kw["mask_form"] = draw(st.sampled_from(["add", "where"]))
            return r(base, **kw)
        if kind == "tiled":
            heads = draw(st.sampled_from([4, 8]))
            return r(base, **dec, k_transpose=draw(st.sampled_from(["perm0132", "dynamo"])),
                     heads=heads, kv_heads=2, kv_repeat=draw(st.sampled_from(["tile", "concat"])),
                     extra_consumer="none", scale_form=base.scale_form if base.form == "decomposed" else "div")
        # the rest are decomposed-only knobs
        if base.form == "attention_op":
            base = r(base, **dec, mask_form="range" if base.causal else "add", k_transpose="perm0132",
                     scale_form="div")
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
    except ValueError:
        assume(False)
    raise AssertionError(kind)


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
        for seed in (1, 2):
            diff = fused_vs_original(built, fused, built.inputs(seed=seed))
            if not diff <= FUSED_TOL:
                wrong.append(f"fused output differs from the original by {diff:.3e}")
                break
    if wrong:
        FIGURE["wrong"] += 1
    elif fused_blocks:
        FIGURE["fused"] += 1
        if not spec.should_fuse:
            FIGURE["near miss fused exactly"] += 1
    else:
        FIGURE["left alone"] += 1
        if spec.should_fuse:
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
