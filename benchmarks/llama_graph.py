"""Build LLaMA-shaped ONNX graphs with the layer structure torch's dynamo exporter emits.

Mirrors `torch.onnx.export(..., dynamo=True)` (torch 2.13, transformers 5.24) of a
`LlamaForCausalLM` run as `model(input_ids=ids, use_cache=False).logits`, node for node:

* constants folded by the exporter stay initializers: the causal mask (`le`, `eq` bool
  (1, 1, s, s), combined with `And` and turned additive with `Where`; above seq 512 the exporter
  stops folding and computes them with LessOrEqual / Equal from (1, 1, s, 1) and (1, 1, 1, s)
  index tensors), the rotary angle table `mul` (1, s, d/2), projection weights pre-transposed
  to (in, out);
* RMSNorm as Pow / ReduceMean / Add(eps) / Sqrt / Reciprocal / Mul / Mul(weight) (the exporter
  writes rsqrt as Sqrt + Reciprocal, not Div);
* q/k/v MatMul -> Reshape (1, s, -1, d) -> Transpose (b, h, s, d); rotary embedding as
  Mul(cos) + Mul(Concat(Neg(Slice), Slice), sin); GQA repeat_kv as Unsqueeze -> Expand -> Reshape;
* attention, two variants (`attn=`):
  - "sdpa" (the HF default): torchlib's decomposition of scaled_dot_product_attention with GQA:
    k is transposed through Reshape/Transpose/Reshape, q and k^T are each scaled by sqrt(scale),
    MatMul -> Add(mask) -> Softmax -> Where(IsNaN, 0, .) -> MatMul.  64 nodes per layer.
  - "eager": MatMul(q, Transpose(k)) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul.  60 nodes.
* o_proj, residual Adds, SiLU-gated MLP (MatMul, Sigmoid, Mul, MatMul, Mul, MatMul), final norm,
  lm_head.  Globals add 17 nodes: 2 layers -> 145 (sdpa) / 137 (eager), as the real exports.

Every initializer larger than 256 bytes goes to ONE external data file next to the model
(`<model>.onnx.data`, the layout `onnx_ir.save` / torch's exporter use), so the .onnx file holds
only the graph.  Weights are either seeded random values, or zeros that are never materialised:
the data file is written with seek/truncate (a sparse file reads back as zeros), so a 4 GB model
builds in about a second without holding its weights in memory.

Tensor names follow the HF state dict (`model.layers.3.self_attn.q_proj.weight_t` for the
transposed weight) so that a real model's weights can be substituted (`weights=callable`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Callable, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 20  # what torch 2.13's dynamo exporter writes
EXTERNAL_THRESHOLD = 256  # bytes; onnx_ir.save's default, used by the exporter
# The exporter's constant folding (onnxscript optimizer) folds outputs up to 512 * 512 elements:
# at seq <= 512 the causal mask pieces are bool constants, above it LessOrEqual/Equal over
# position-index initializers.
FOLD_LIMIT = 512 * 512
ALIGN = 4096
BIG_ALIGN = 65536  # onnxruntime can mmap tensors aligned to the allocation granularity


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    layers: int = 2
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    vocab: int = 1000
    seq: int = 512
    batch: int = 1
    rope_theta: float = 10000.0
    eps: float = 1e-6
    dtype: str = "float32"  # or "float16"
    # symbolic: seq is the input's dim "seq"; shapes, rotary angles and the mask are computed
    # from Shape(input_ids) as a dynamic-shape export does. window: keys older than this many
    # positions are masked too (Mistral's sliding window).
    symbolic: bool = False
    window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def weight_bytes(self) -> int:
        """Bytes of the learned weights (what dominates the data file)."""
        h, kvd, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        per_layer = 2 * h * h + 2 * h * kvd + 3 * h * i + 2 * h
        total = self.layers * per_layer + 2 * self.vocab * h + h
        return total * np.dtype(self.dtype).itemsize


SMALL = LlamaShape()
# LLaMA-2-7B / LLaMA-3-8B dimensions (GQA with 8 kv heads); at 4 layers in fp32 that is 3.9 GB
# of weights, above protobuf's 2 GB limit, while onnxruntime can still run it on a 16 GB box.
BIG = LlamaShape(layers=4, hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=32000, seq=512)

WeightSource = Union[str, Callable[[str, tuple], np.ndarray]]


class _Builder:
    def __init__(self, cfg: LlamaShape, attn: str, weights: WeightSource, seed: int):
        self.cfg = cfg
        self.attn = attn
        self.weights = weights
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inline: list[onnx.TensorProto] = []
        # name -> (TensorProto dtype, shape, payload bytes or None for zeros)
        self.external: list[tuple[str, int, tuple, bytes | None]] = []
        self._n = 0
        self.np_dtype = np.dtype(cfg.dtype)
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.np_dtype)

    # --- initializers -------------------------------------------------------------------------
    def const(self, name: str, array: np.ndarray) -> str:
        """A non-learned constant; inline when small, external otherwise (as the exporter does)."""
        array = np.asarray(array)
        if array.nbytes > EXTERNAL_THRESHOLD:
            dt = helper.np_dtype_to_tensor_dtype(array.dtype)
            self.external.append((name, dt, tuple(array.shape), array.tobytes()))
        else:
            self.inline.append(onnx.numpy_helper.from_array(array, name))
        return name

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=self.np_dtype))

    def ints(self, name: str, values) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def weight(self, name: str, shape: tuple, kind: str) -> str:
        """A learned weight. kind: 'matrix' | 'norm' | 'embed'."""
        src = self.weights
        if callable(src):
            payload = np.ascontiguousarray(src(name, shape), dtype=self.np_dtype).tobytes()
        elif src == "zeros":
            payload = None
        elif src == "random":
            if kind == "norm":
                arr = 1.0 + 0.1 * self.rng.standard_normal(shape)
            else:
                arr = self.rng.standard_normal(shape) * (0.02 if kind == "embed" else 1.0 / math.sqrt(shape[0]))
            payload = arr.astype(self.np_dtype).tobytes()
        else:
            raise ValueError(f"weights must be 'zeros', 'random' or a callable, got {src!r}")
        self.external.append((name, self.onnx_dtype, tuple(shape), payload))
        return name

    # --- nodes --------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        self._n += 1
        output = output or f"val_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"node_{output}", **attrs))
        return output

    def rms_norm(self, x: str, weight: str, tag: str) -> str:
        c = self.consts
        p = self.node("Pow", [x, c["two"]], f"{tag}_pow")
        m = self.node("ReduceMean", [p, c["axis_m1"]], f"{tag}_mean", keepdims=1, noop_with_empty_axes=0)
        a = self.node("Add", [m, c["eps"]], f"{tag}_add")
        s = self.node("Sqrt", [a], f"{tag}_sqrt")
        r = self.node("Reciprocal", [s], f"{tag}_rsqrt")
        y = self.node("Mul", [x, r], f"{tag}_mul")
        return self.node("Mul", [weight, y], f"{tag}_out")

    def rotate(self, x: str, tag: str) -> str:
        c = self.consts
        a = self.node("Mul", [x, c["cos_u"]], f"{tag}_cos")
        lo = self.node("Slice", [x, c["zero_1d"], c["half_1d"], c["axis3"], c["one_1d"]], f"{tag}_x1")
        hi = self.node("Slice", [x, c["half_1d"], c["int64_max"], c["axis3"], c["one_1d"]], f"{tag}_x2")
        n = self.node("Neg", [hi], f"{tag}_neg")
        cat = self.node("Concat", [n, lo], f"{tag}_cat", axis=-1)
        b = self.node("Mul", [cat, c["sin_u"]], f"{tag}_sin")
        return self.node("Add", [a, b], f"{tag}_out")

    def repeat_kv(self, x: str, tag: str, reshape: bool) -> str:
        c = self.consts
        u = self.node("Unsqueeze", [x, c["axis2"]], f"{tag}_unsq")
        e = self.node("Expand", [u, c["expand_shape"]], f"{tag}_expand")
        if not reshape:
            return e
        return self.node("Reshape", [e, c["bhsd"]], f"{tag}_rep", allowzero=self.allowzero)

    def build(self) -> onnx.ModelProto:
        cfg = self.cfg
        b, s, h, d = cfg.batch, cfg.seq, cfg.hidden, cfg.head_dim
        kvd = cfg.kv_heads * d
        # A symbolic seq: shape operands copy it (0) or infer it (-1), so allowzero must be 0.
        sym = cfg.symbolic
        self.allowzero = 0 if sym else 1
        fmin = float(np.finfo(self.np_dtype).min)
        c = self.consts = {
            "two": self.scalar("pow_two", 2.0),
            "axis_m1": self.ints("axis_m1", [-1]),
            "eps": self.scalar("rms_eps", cfg.eps),
            "zero_1d": self.ints("slice_zero", [0]),
            "half_1d": self.ints("slice_half", [d // 2]),
            "int64_max": self.ints("slice_end", [np.iinfo(np.int64).max]),
            "axis3": self.ints("axis3", [3]),
            "one_1d": self.ints("axis1", [1]),
            "axis2": self.ints("axis2", [2]),
            "expand_shape": self.ints("expand_shape", [b, cfg.kv_heads, cfg.group, 1 if sym else s, d]),
            "bhsd": self.ints("bhsd_shape", [b, cfg.heads, -1 if sym else s, d]),
            "view_shape": self.ints("view_shape", [b, 0 if sym else s, -1, d]),
            "merge_shape": self.ints("merge_shape", [b, 0 if sym else s, -1]),
        }
        # Constants the exporter folded: causal mask pieces and the rotary angle table.
        c["new_ones"] = self.const("new_ones", np.array(True))
        folded = not sym and s * s <= FOLD_LIMIT
        ids = "input_ids"
        if sym:  # positions from Shape(input_ids), as torch.arange(seq) exports
            seq_1d = self.node("Shape", [ids], "seq_1d", start=1, end=2)
            pos = self.node("Range", [self.ints("range_start", 0), self.node("Squeeze", [seq_1d], "seq_len"),
                                      self.ints("range_step", 1)], "positions")
            c["index"] = self.node("Unsqueeze", [pos, self.ints("axes_013", [0, 1, 3])], "index")
            c["index_1"] = self.node("Unsqueeze", [pos, self.ints("axes_012", [0, 1, 2])], "index_1")
        if folded:
            c["le"] = self.const("le", np.tril(np.ones((s, s), dtype=bool))[None, None])
            c["eq"] = self.const("eq", np.ones((1, 1, s, s), dtype=bool))
        elif not sym:
            pos = np.arange(s, dtype=np.int64)
            c["index"] = self.const("index", pos.reshape(1, 1, s, 1))
            c["index_1"] = self.const("index_1", pos.reshape(1, 1, 1, s))
            c["index_2"] = self.const("index_2", np.zeros((1, 1, s, 1), dtype=np.int64))
            c["index_3"] = self.const("index_3", np.zeros((1, 1, 1, s), dtype=np.int64))
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
        if sym:
            pos_f = self.node("Unsqueeze", [self.node("Cast", [pos], "positions_f", to=TensorProto.FLOAT),
                                            self.ints("axes_02", [0, 2])], "positions_f3")
            c["angles"] = self.node("Mul", [pos_f, self.const("inv_freq", inv_freq[None, None, :])], "mul")
        else:
            angles = np.arange(s, dtype=np.float32)[None, :, None] * inv_freq[None, None, :]
            c["angles"] = self.const("mul", angles.astype(np.float32))
        embed = self.weight("model.embed_tokens.weight", (cfg.vocab, h), "embed")
        x = self.node("Gather", [embed, ids], "embedding", axis=0)
        if not folded:
            c["le"] = self.node("LessOrEqual", [c["index_1"], c["index"]], "le")
        m = self.node("And", [c["new_ones"], c["le"]], "bitwise_and")
        if sym:
            pass  # no batch-position term: the mask is (1, 1, seq, seq) from positions alone
        else:
            if not folded:
                c["eq"] = self.node("Equal", [c["index_2"], c["index_3"]], "eq")
            m = self.node("And", [m, c["eq"]], "bitwise_and_1")
        if cfg.window is not None:  # and key > query - window
            oldest = self.node("Sub", [c["index"], self.ints("sliding_window", cfg.window)], "oldest")
            m = self.node("And", [m, self.node("Greater", [c["index_1"], oldest], "inside_window")], "windowed")
        if self.attn == "eager":
            zero = self.scalar("zeros", 0.0)
            c["mask_add"] = self.node("Where", [m, zero, self.scalar("mask_min", fmin)], "where")
        cat = self.node("Concat", [c["angles"], c["angles"]], "cat_1", axis=-1)
        cos = self.node("Cos", [cat], "cos")
        sin = self.node("Sin", [cat], "sin")
        if self.np_dtype != np.float32:
            cos = self.node("Cast", [cos], "cos_cast", to=self.onnx_dtype)
            sin = self.node("Cast", [sin], "sin_cast", to=self.onnx_dtype)

        for i in range(cfg.layers):
            L = f"model.layers.{i}"
            t = f"l{i}"
            xn = self.rms_norm(x, self.weight(f"{L}.input_layernorm.weight", (h,), "norm"), f"{t}_in_norm")
            q, k, v = (
                self.node(
                    "Transpose",
                    [
                        self.node(
                            "Reshape",
                            [
                                self.node(
                                    "MatMul",
                                    [xn, self.weight(f"{L}.self_attn.{p}_proj.weight_t", (h, n_out), "matrix")],
                                    f"{t}_{p}_proj",
                                ),
                                c["view_shape"],
                            ],
                            f"{t}_{p}_view",
                            allowzero=self.allowzero,
                        )
                    ],
                    f"{t}_{p}_bhsd",
                    perm=[0, 2, 1, 3],
                )
                for p, n_out in (("q", h), ("k", kvd), ("v", kvd))
            )
            if i == 0:  # the exporter emits these inside the first layer
                c["cos_u"] = self.node("Unsqueeze", [cos, c["one_1d"]], "unsqueeze_cos")
                c["sin_u"] = self.node("Unsqueeze", [sin, c["one_1d"]], "unsqueeze_sin")
            q = self.rotate(q, f"{t}_q_rope")
            k = self.rotate(k, f"{t}_k_rope")
            if self.attn == "sdpa":
                k_e = self.repeat_kv(k, f"{t}_k", reshape=False)
                v_r = self.repeat_kv(v, f"{t}_v", reshape=True)
                if i == 0:
                    c["bh_s_d"] = self.ints("bh_s_d", [b * cfg.heads, -1 if sym else s, d])
                    c["bhds"] = self.ints("bhds_shape", [b, cfg.heads, d, -1 if sym else s])
                    c["sqrt_scale"] = self.scalar("sqrt_scale", math.sqrt(1.0 / math.sqrt(d)))
                    c["zero_f"] = self.scalar("sdpa_zero", 0.0)
                    c["min_f"] = self.scalar("sdpa_min", fmin)
                k3 = self.node("Reshape", [k_e, c["bh_s_d"]], f"{t}_k_3d")
                kt = self.node("Transpose", [k3], f"{t}_k_t", perm=[0, 2, 1])
                kt = self.node("Reshape", [kt, c["bhds"]], f"{t}_k_t4", allowzero=0)
                qs = self.node("Mul", [q, c["sqrt_scale"]], f"{t}_q_scaled")
                ks = self.node("Mul", [kt, c["sqrt_scale"]], f"{t}_k_scaled")
                if i == 0:
                    c["mask_add"] = self.node("Where", [m, c["zero_f"], c["min_f"]], "sdpa_mask")
                sc = self.node("MatMul", [qs, ks], f"{t}_scores")
                sc = self.node("Add", [sc, c["mask_add"]], f"{t}_masked")
                pr = self.node("Softmax", [sc], f"{t}_probs", axis=-1)
                nan = self.node("IsNaN", [pr], f"{t}_isnan")
                pr = self.node("Where", [nan, c["zero_f"], pr], f"{t}_probs_clean")
                o = self.node("MatMul", [pr, v_r], f"{t}_sdpa")
            elif self.attn == "eager":
                k_r = self.repeat_kv(k, f"{t}_k", reshape=True)
                v_r = self.repeat_kv(v, f"{t}_v", reshape=True)
                if i == 0:
                    c["scale"] = self.scalar("attn_scale", 1.0 / math.sqrt(d))
                kt = self.node("Transpose", [k_r], f"{t}_k_t", perm=[0, 1, 3, 2])
                sc = self.node("MatMul", [q, kt], f"{t}_scores")
                sc = self.node("Mul", [sc, c["scale"]], f"{t}_scaled")
                sc = self.node("Add", [sc, c["mask_add"]], f"{t}_masked")
                pr = self.node("Softmax", [sc], f"{t}_probs", axis=-1)
                o = self.node("MatMul", [pr, v_r], f"{t}_attn")
            else:
                raise ValueError(f"attn must be 'sdpa' or 'eager', got {self.attn!r}")
            o = self.node("Transpose", [o], f"{t}_o_bshd", perm=[0, 2, 1, 3])
            o = self.node("Reshape", [o, c["merge_shape"]], f"{t}_o_merge", allowzero=self.allowzero)
            o = self.node("MatMul", [o, self.weight(f"{L}.self_attn.o_proj.weight_t", (h, h), "matrix")], f"{t}_o_proj")
            x = self.node("Add", [x, o], f"{t}_attn_residual")
            xn = self.rms_norm(x, self.weight(f"{L}.post_attention_layernorm.weight", (h,), "norm"), f"{t}_post_norm")
            g = self.node("MatMul", [xn, self.weight(f"{L}.mlp.gate_proj.weight_t", (h, cfg.intermediate), "matrix")], f"{t}_gate")
            sg = self.node("Sigmoid", [g], f"{t}_sigmoid")
            g = self.node("Mul", [g, sg], f"{t}_silu")
            u = self.node("MatMul", [xn, self.weight(f"{L}.mlp.up_proj.weight_t", (h, cfg.intermediate), "matrix")], f"{t}_up")
            g = self.node("Mul", [g, u], f"{t}_gated")
            dn = self.node("MatMul", [g, self.weight(f"{L}.mlp.down_proj.weight_t", (cfg.intermediate, h), "matrix")], f"{t}_down")
            x = self.node("Add", [x, dn], f"{t}_mlp_residual")

        xn = self.rms_norm(x, self.weight("model.norm.weight", (h,), "norm"), "final_norm")
        self.node("MatMul", [xn, self.weight("lm_head.weight_t", (h, cfg.vocab), "matrix")], "logits")

        graph = helper.make_graph(
            self.nodes,
            "main_graph",
            [helper.make_tensor_value_info(ids, TensorProto.INT64, [b, "seq" if sym else s])],
            [helper.make_tensor_value_info("logits", self.onnx_dtype, [b, "seq" if sym else s, cfg.vocab])],
            initializer=self.inline,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
        model.producer_name = "fuse-attn benchmarks (mirrors pytorch 2.13 dynamo export)"
        return model


def build_llama(
    path: str | os.PathLike,
    cfg: LlamaShape = SMALL,
    *,
    attn: str = "sdpa",
    weights: WeightSource = "zeros",
    seed: int = 0,
    data_name: str | None = None,
    value_info: bool = True,
) -> dict:
    """Write `path` (graph) and `<path>.data` (every initializer above 256 bytes).

    weights: "zeros" (sparse, never materialised), "random" (seeded), or a callable
    (name, shape) -> array returning the weight in the graph's (in, out) layout.
    Returns a summary: node count, graph bytes, data bytes, data path.
    """
    path = os.fspath(path)
    builder = _Builder(cfg, attn, weights, seed)
    model = builder.build()
    data_name = data_name or os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path) or ".", data_name)

    offset = 0
    with open(data_path, "wb") as f:
        for name, dt, shape, payload in builder.external:
            nbytes = int(np.prod(shape, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(dt).itemsize
            align = BIG_ALIGN if nbytes >= BIG_ALIGN else ALIGN
            offset = -(-offset // align) * align
            tensor = TensorProto(name=name, data_type=dt, dims=list(shape))
            tensor.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, val
            model.graph.initializer.append(tensor)
            if payload is not None:
                f.seek(offset)
                f.write(payload)
            offset += nbytes
        f.truncate(offset)  # zeros weights: holes in a sparse file, read back as zeros

    if value_info:
        # Shape inference reads only dims and the inline shape constants, never the weights.
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    blob = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(blob)
    return {
        "path": path,
        "data_path": data_path,
        "layers": cfg.layers,
        "nodes": len(model.graph.node),
        "graph_bytes": len(blob),
        "data_bytes": offset,
        "attn": attn,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .onnx path (weights go to OUT.data)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--weights", choices=["zeros", "random"], default="zeros")
    ap.add_argument("--big", action="store_true", help="LLaMA-7B dimensions (hidden 4096, 32 heads, 8 kv heads)")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--symbolic", action="store_true", help="seq is the input's symbolic dim 'seq'")
    ap.add_argument("--window", type=int, default=None, help="a sliding window of this many keys")
    args = ap.parse_args(argv)
    cfg = BIG if args.big else SMALL
    cfg = dataclasses.replace(cfg, layers=args.layers, symbolic=args.symbolic, window=args.window,
                              **({"seq": args.seq} if args.seq else {}))
    info = build_llama(args.out, cfg, attn=args.attn, weights=args.weights)
    print(info)


if __name__ == "__main__":
    main()
