"""The kernel's limits as contract's structured values, compile's advice keyed by their kind, each
launch's numbers fused against plain, and --kernel-min-seq."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from fuse_attn.commands.cli import main as cli_main
from fuse_attn.compile import constraints, launch_cost, shapes
from fuse_attn.compile.constraints import FlashPlan
from fuse_attn.ir import contract
from test_compile_cli import peaked
from test_compile_lower import fused_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- limits and padding, one place -----------------------------------------------------------------


def test_violations_are_structured_and_every_kind_has_advice():
    violations = contract.kernel_violations(batch=0, heads=6, kv_heads=4, head_dim=129, seq=640, seq_tile_size=None,
                                            dropout_p=0.1, dtypes={"float", "float16"})
    assert [v.kind for v in violations] == ["head_dim", "heads", "seq_tile", "dropout", "dtypes", "batch"]
    head_dim = violations[0]
    assert (head_dim.value, head_dim.limit) == (129, contract.KERNEL.max_head_dim)
    (query,) = contract.kernel_violations(batch=1, heads=1, kv_heads=1, head_dim=64, seq=576, seq_tile_size=576,
                                          dropout_p=0.0, dtypes={"float"})[1:]
    assert (query.kind, query.limit) == ("query_tile", contract.KERNEL.query_tile)
    no_room = contract.seq_padding(300, causal=False, key_bias_column=False, head_dim=128)
    kinds = {v.kind for v in violations} | {query.kind, no_room.kind, "seq_tile"}
    # compile's advice is keyed by kind (no message text is matched), for every kind contract emits.
    assert kinds <= set(constraints._FIXES)
    assert contract.KERNEL_SHAPE_KINDS <= set(constraints._FIXES)


@pytest.mark.parametrize("seq,causal,column,d,expected", [
    (1024, False, False, 64, (1024, 1024, contract.PAD_NONE, 64)),
    (1536, False, False, 64, (1536, 512, contract.PAD_NONE, 64)),
    (197, False, False, 64, (512, 512, contract.PAD_APPEND_COLUMN, 65)),
    (197, False, True, 65, (512, 512, contract.PAD_EXTEND_COLUMN, 65)),
    (1500, False, False, 127, (1536, 512, contract.PAD_APPEND_COLUMN, 128)),  # Whisper's encoder: d + 1 = 128 fits
    (300, True, False, 128, (512, 512, contract.PAD_CAUSAL, 128)),
    (640, True, True, 65, (1024, 1024, contract.PAD_CAUSAL, 65)),  # causal padding stays as it is
])
def test_the_padding_rule(seq, causal, column, d, expected):
    padding = contract.seq_padding(seq, causal=causal, key_bias_column=column, head_dim=d)
    assert (padding.padded_seq, padding.seq_tile_size, padding.how, padding.head_dim) == expected
    assert not contract.kernel_violations(batch=1, heads=1, kv_heads=1, head_dim=padding.head_dim,
                                          seq=padding.padded_seq, seq_tile_size=padding.seq_tile_size,
                                          dropout_p=0.0, dtypes={"float"})


def test_the_nodes_own_tile_is_kept_when_it_divides():
    assert contract.seq_padding(2048, causal=True, key_bias_column=False, head_dim=64, preferred_tile=1024).seq_tile_size == 1024
    assert contract.seq_padding(1536, causal=True, key_bias_column=False, head_dim=64, preferred_tile=1024).seq_tile_size == 512


# --- the numbers of each launch -----------------------------------------------------------------------


def plan(seq, padded, tile, causal=False, d=64, padding=contract.PAD_NONE, kernel=True, dtype="float", h=12, kv=12,
         b=1):
    attrs = contract.FlashFwdAttrs(0.125, causal, h, kv)
    return FlashPlan("n", ("q", "k", "v"), "o", attrs, b, h, kv, d, seq, padded, tile, dtype, padding, kernel)


def test_flops_follow_the_tile_loop():
    b, h, d, n = 2, 4, 64, 2048
    # Non-causal: every (q tile, kv tile), both matmuls over the whole tile: the dense count.
    assert launch_cost.kernel_matmul_flops(plan(n, n, 512, d=d, h=h, kv=h, b=b)) == 4 * b * h * n * n * d
    # Causal, one 2048 tile: q tile i multiplies QK^T sub-tiles 0..i*128//512, P @ V the whole tile.
    qk = sum(2 * 128 * d * 512 * (i * 128 // 512 + 1) for i in range(n // 128))
    pv = (n // 128) * 2 * 128 * n * d
    assert launch_cost.kernel_matmul_flops(plan(n, n, 2048, causal=True, d=d, h=h, kv=h, b=b)) == b * h * (qk + pv)
    # Causal, 512 tiles: kv tiles right of the q tile are skipped, fewer FLOPs than one big tile.
    assert launch_cost.kernel_matmul_flops(plan(n, n, 512, causal=True, d=d, h=h, kv=h, b=b)) < b * h * (qk + pv)


def test_padded_work_scores_bytes_and_estimate():
    vit = plan(197, 512, 512, d=64, padding=contract.PAD_APPEND_COLUMN)  # ViT-B/16: 12 heads, d 64, seq 197
    cost = launch_cost.launch_cost(vit, plain_matmuls_in_bf16=True)
    assert cost.plain_flops == 4 * 12 * 197 * 197 * 64
    assert cost.kernel_flops == 4 * 12 * 512 * 512 * 65  # padded, with the appended column
    assert round(cost.kernel_flops / cost.plain_flops, 1) == 6.9
    assert cost.scores_bytes == 2 * 12 * 197 * 197 * 4 and not cost.scores_in_hbm
    assert cost.plain_seconds == max(cost.plain_flops / 92e12, cost.plain_hbm_bytes / 410e9)
    text = "\n".join(cost.text(vit))
    assert "seq 197 -> 512: 6.9x the attention FLOPs of the unpadded block" in text
    assert "estimate, one NeuronCore-v2" in text and "not measured" in text
    assert "below 4096, where NxD Inference turns its own flash kernel on by default" in text
    # At 8192 tokens the (s x s) scores exceed SBUF: plain ops write and read them through HBM, and
    # the kernel's estimate is the shorter one.
    long = plan(8192, 8192, 2048, causal=True, d=128, dtype="bfloat16", h=32, kv=8)
    cost = launch_cost.launch_cost(long, plain_matmuls_in_bf16=True)
    assert cost.scores_in_hbm and cost.scores_bytes == 2 * 32 * 8192 * 8192 * 2
    assert cost.plain_hbm_bytes > 2 * cost.scores_bytes and cost.kernel_seconds < cost.plain_seconds
    assert "NxD Inference" not in "\n".join(cost.text(long))
    # float32 matmuls without mixed precision run at TensorE's fp32 rate.
    fp32 = launch_cost.launch_cost(dataclasses.replace(long, dtype="float", attrs=dataclasses.replace(
        long.attrs, mixed_precision=False)), plain_matmuls_in_bf16=False)
    assert fp32.kernel_seconds >= fp32.kernel_flops / 23e12


def test_each_launch_states_its_numbers(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_model(layers=1, causal=False), path)
    assert cli_main(["compile", str(path), "--simulate", "--shape", "x=1x300x64"]) == 0
    out = capsys.readouterr().out
    assert ("l0_flash: flash_fwd[1, 2] q heads 4, d 17, seq 300, seq_tile_size 512, non-causal, float, "
            "mixed_precision=True, seq padded 300 -> 512 (padded keys masked in an appended key-bias column, "
            "head dim 16 -> 17)") in out
    assert "seq 300 -> 512: 3.1x the attention FLOPs of the unpadded block" in out
    assert "the (s x s) scores and probabilities flash_fwd never writes to HBM: 2.75 MiB" in out  # 2*4*300^2*4 B


# --- --kernel-min-seq ---------------------------------------------------------------------------------


def test_kernel_min_seq_runs_short_launches_as_plain_ops(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(peaked(fused_model(layers=2)), path)
    assert cli_main(["compile", str(path), "--simulate", "--shape", "x=1x512x64", "--kernel-min-seq", "1024"]) == 0
    out = capsys.readouterr().out
    assert out.count("plain attention ops (no flash_fwd)") == 2 and "seq 512 < --kernel-min-seq 1024" in out
    assert "flash_fwd[" not in out
    # No kernel arithmetic: the plain ops match onnxruntime to float32 precision, mixed precision or not.
    assert float(out.split("simulate y: max abs ")[1].split(",")[0]) < 1e-4
    # At or above N the kernel runs, as by default.
    assert cli_main(["compile", str(path), "--simulate", "--shape", "x=1x512x64", "--kernel-min-seq", "512"]) == 0
    out = capsys.readouterr().out
    assert out.count("flash_fwd[1, 2]") == 2 and "plain attention ops (no flash_fwd)" not in out
    assert float(out.split("simulate y: max abs ")[1].split(",")[0]) > 1e-4  # bf16 kernel arithmetic


def test_kernel_min_seq_lowers_what_the_kernel_cannot_run():
    """d 128, non-causal, seq 300: no room for the padding column, so no flash_fwd launch; as plain
    ops it lowers and matches onnxruntime on the fused model."""
    from fuse_attn.compile.run import attention_fn, compare_with_onnxruntime
    from fuse_attn.compile.lower import lower

    model = shapes.fix_input_shapes(fused_model(hidden=128, heads=1, kv_heads=1, causal=False), {"x": (1, 300, 128)})
    _, problems = constraints.plan_model(model)
    assert any("head dim 128 + 1 > 128" in p for p in problems)
    plans, problems = constraints.plan_model(model, kernel_min_seq=512)
    assert problems == [] and [p.kernel for p in plans] == [False]
    module = lower(model, plans, attention_fn(simulate=True)[0])
    feeds = shapes.example_feeds(model)
    ((_, abs_err, _),) = compare_with_onnxruntime(model, module, feeds)
    assert abs_err < 1e-4


@pytest.mark.parametrize("bad", ["0", "-3", "many"])
def test_kernel_min_seq_must_be_positive(bad, tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    onnx.save(fused_model(), path)
    assert cli_main(["compile", str(path), "--simulate", "--shape", "x=1x512x64", "--kernel-min-seq", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a usage error: argparse's usage, then the one error line
    assert err[-1] == f"fuse-attn: error: argument --kernel-min-seq: expected a positive number of tokens, got {bad!r}"
    assert "Traceback" not in "\n".join(err)


def test_plain_launch_ignores_kernel_only_limits_but_not_the_others():
    """d 128, non-causal, seq 300, dropout 0.5: the kernel has no room for the padding column and
    asserts no dropout; plain ops need no column, but drop no dropout either."""
    model = shapes.fix_input_shapes(fused_model(hidden=128, heads=1, kv_heads=1, causal=False, dropout_p=0.5),
                                    {"x": (1, 300, 128)})
    _, problems = constraints.plan_model(model)
    assert len(problems) == 2 and "head dim 128 + 1 > 128" in problems[0] and "dropout_p 0.5 != 0" in problems[1]
    _, problems = constraints.plan_model(model, kernel_min_seq=4096)
    assert len(problems) == 1 and "dropout_p 0.5 != 0" in problems[0]
