"""Image models: the token count is fixed by the graph (patches of a fixed image, or the position
table a symbolic-size image must match), whatever name shape inference gives it. Such a seq is
checked as the number it is, never fused as a symbolic seq, and a refusal gives the real reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from attention_graphs import flash_nodes, mutate_flashfwd, node_attrs
from exporter_graphs import max_diff, run, vit
from fuse_attn import fuse

TOL = 1e-4


@pytest.mark.parametrize("image", [224, "symbolic"])
@pytest.mark.parametrize("patch, tokens", [(16, 197), (14, 257), (32, 50)])  # ViT-B/16, ViT-S/14, CLIP B/32
def test_fixed_token_count_fuses_as_the_number_it_is(image, patch, tokens):
    """No tile divides the token count: the block fuses at that number, and compile pads it to the
    tile, masking the padded keys in the key-bias column (the report says so)."""
    model = vit(image=image, patch=patch)
    # Shape inference names the token dim with a made-up symbol: it is not a free dim.
    probs = next(v for v in model.graph.value_info if v.name.startswith("probs"))
    assert probs.type.tensor_type.shape.dim[2].dim_param.startswith("unk__")
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.seq == tokens and not block.causal and block.seq_tile_size == 512, block
    assert f"compile pads seq {tokens} to 512 and masks the padded keys in the key-bias column" in block.notes
    size = 224 if image == "symbolic" else image
    feeds = {"pixel_values": np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)}
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL


@pytest.mark.parametrize("image", [512, "symbolic"])
def test_fixed_token_count_the_kernel_runs_fuses(image):
    """SigLIP-style (no class token) at 512 px, patch 16: 1024 tokens, fixed by the graph even
    with symbolic height and width (the position table has 1024 rows)."""
    model = vit(image=image, cls_token=False, side=512)
    fused, report = fuse(model)
    (block,) = report.blocks
    assert block.fused and block.seq == 1024 and block.batch == "batch_size" and not block.causal, block
    (node,) = flash_nodes(fused)
    assert node_attrs(node)["seq_tile_size"] == 1024
    onnx.checker.check_model(fused, full_check=True)
    feeds = {"pixel_values": np.random.default_rng(0).normal(size=(2, 3, 512, 512)).astype(np.float32)}
    assert max_diff(run(model, feeds), run(fused, feeds)) <= TOL
    assert max_diff(run(model, feeds), run(mutate_flashfwd(fused, scale_factor=1.05), feeds)) > 100 * TOL
