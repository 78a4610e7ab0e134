"""From a proven attention block to a kernel launch: q/k/v sources, grid, and attributes.

Shared by decomposed attention (`find_attention`) and the ONNX `Attention` op
(`onnx_attention`): both hand over the three operand chains with the kernel-layout target
each must become, plus the read scale and mask; this module checks what the kernel can run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fuse_attn.ir import contract
from fuse_attn.ir.evaluator import Evaluator, Unprovable, dims_text
from fuse_attn.ir.graph import Node, Value
from fuse_attn.passes._graph import NotFused, dtype_name, in_model_dims, memoized
from fuse_attn.passes.layout import (Chain, Source, chain_labels, chain_signature, choose_source, grid_order,
                                     kv_heads_of)
from fuse_attn.passes.key_mask import KeyMask, read_with_key_mask
from fuse_attn.passes.masks import ScoreReading, read_scores


# Masks of symbolic-seq graphs are proven at two lengths; the longer is at most this. A mask that
# is a function of i − j costs O(seq) there (masks.py); one that is not is refused past seq 4096.
MAX_MASK_PROOF_SEQ = 1 << 18


@dataclasses.dataclass
class FusionPlan:
    q: Source
    k: Source
    v: Source
    attrs: contract.FlashFwdAttrs
    output: Value  # the value the kernel's output replaces
    squeeze_heads: bool  # heads were batched (b·h, s, d): the kernel runs them as h = 1
    insert_before: Node
    batch: int | str
    seq: int | str
    head_dim: int
    notes: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    # When the graph shares kv heads in another order than repeat_kv's: the q heads, reordered
    # so that kv head j serves q heads j*G .. j*G+G-1 (the output is put back in graph order).
    q_head_order: tuple[int, ...] | None = None
    # The block's output axes as a permutation of the kernel's (b, h, s, d) (Einsum products).
    output_perm: tuple[int, ...] | None = None
    # (old, new): once the kernel is in, readers of `old` read `new` (an op planned in a canonical form).
    rewire_after: list = dataclasses.field(default_factory=list)
    # The key mask the key-bias column carries (None: no column).
    key_mask: KeyMask | None = None


@dataclasses.dataclass(frozen=True)
class Operand:
    """One of q, k, v: its chain back to the root, and how its labels become the kernel layout."""

    chain: Chain
    to_kernel_layout: object  # labels of the operand -> labels in kernel layout


def _size(value: Value, axis: int, proven: int, evaluator: Evaluator) -> int | str:
    """A dim as the report and attributes should carry it: an int when fixed, else its symbol.

    With no free symbols in the graph every proven size is the real one. Otherwise a dim is
    fixed when it comes out the same with every free symbol bound to another size (an image
    model's 197 tokens, whatever name shape inference gave them); else it is named by the free
    symbol it follows, or called dynamic."""
    if not evaluator.binding:
        return proven
    try:
        again = evaluator.varied().shape_of(value)[axis]
    except Unprovable:
        again = None
    if again == proven:
        return proven
    dim = value.shape[axis] if value.shape is not None and len(value.shape) > abs(axis) else None
    if isinstance(dim, str) and _bound(dim, evaluator) and evaluator.dim(dim) == proven:
        return dim
    moved = evaluator.varied().binding
    named = [s for s, n in evaluator.binding.items() if n == proven and moved[s] == again]
    return named[0] if len(named) == 1 else "dynamic"


def _bound(dim: str, evaluator: Evaluator) -> bool:
    try:
        evaluator.dim(dim)
    except Unprovable:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class LayoutProof:
    """What the index labels proved about one block's q, k, v (independent of value objects)."""

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    seq_q: int
    seq_k: int
    picks: tuple  # (q, k, v) layout.Pick
    batched_heads: bool  # operands were (b·h, s, d)
    q_head_order: tuple[int, ...] | None


_PROBE = (2, 3, 5, 7, 11, 13, 17, 19)


def kernel_axes(op: Operand, evaluator: Evaluator) -> tuple[int | None, ...]:
    """For each axis of the kernel layout, the operand axis it is (None: a new unit axis).
    A layout function only transposes and adds unit axes, so this describes it completely."""
    try:
        rank = len(evaluator.shape_of(op.chain.values[-1]))
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention layout: {exc}") from None
    if rank > len(_PROBE):
        raise NotFused(f"attention operands of rank {rank}")
    moved = op.to_kernel_layout(np.empty(_PROBE[:rank], dtype=np.int8))
    return tuple(_PROBE.index(n) if n > 1 else None for n in moved.shape)


@dataclasses.dataclass(frozen=True)
class _KernelTargets:
    """q, k, v in the kernel's layout under one evaluator; every field is keyed or ordered q, k, v."""

    seq_axis: dict  # name -> the operand's axis that is seq (None: none)
    labels: dict  # name -> the chain's index labels (layout.chain_labels)
    seqs: tuple[int, int, int]  # the real seq lengths
    targets: tuple  # the labels moved to the kernel layout: (b, h, d, s), (b, kv, d, s), (b, kv, s, d)
    kv_heads: tuple  # for k and v: each q head's kv head (layout.kv_heads_of)


def _kernel_targets(q: Operand, k: Operand, v: Operand, evaluator: Evaluator) -> _KernelTargets:
    """The labels of q, k, v, their seq lengths and their kernel-layout targets under `evaluator`."""
    # Seq is axis 3 of the kernel's q and k (b, h, d, s) and axis 2 of its v (b, kv, s, d).
    axes = {name: kernel_axes(op, evaluator) for name, op in (("q", q), ("k", k), ("v", v))}
    seq_axis = {"q": axes["q"][3], "k": axes["k"][3], "v": axes["v"][2]}
    labels = {name: chain_labels(op.chain, evaluator, seq_axis[name]) for name, op in (("q", q), ("k", k), ("v", v))}
    # The real lengths (labels may carry seq shrunk, see chain_labels).
    seqs = tuple(evaluator.shape_of(op.chain.values[-1])[seq_axis[name]] if seq_axis[name] is not None else 1
                 for name, op in (("q", q), ("k", k), ("v", v)))
    q_target = q.to_kernel_layout(labels["q"][-1])
    k_target, k_heads = kv_heads_of(k.to_kernel_layout(labels["k"][-1]), "key")
    v_target, v_heads = kv_heads_of(v.to_kernel_layout(labels["v"][-1]), "value")
    return _KernelTargets(seq_axis, labels, seqs, (q_target, k_target, v_target), (k_heads, v_heads))


def _kernel_shapes(targets, seqs) -> tuple[tuple[int, ...], ...]:
    """q, k, v as the kernel takes them: (b, h, d, s), (b, kv, d, s), (b, kv, s, d), at their real seq."""
    (q_target, k_target, v_target), (seq_q, seq_k, seq_v) = targets, seqs
    return (q_target.shape[:3] + (seq_q,), k_target.shape[:3] + (seq_k,),
            v_target.shape[:2] + (seq_v, v_target.shape[3]))


def _prove_layout(q: Operand, k: Operand, v: Operand, evaluator: Evaluator) -> LayoutProof:
    found = _kernel_targets(q, k, v, evaluator)
    seq_axis, labels, (k_heads, v_heads) = found.seq_axis, found.labels, found.kv_heads
    (q_target, k_target, v_target), (seq_q, seq_k, seq_v) = found.targets, found.seqs
    if k_heads != v_heads:
        raise NotFused("keys and values share kv heads differently across q heads")
    batch, heads, head_dim, _ = q_target.shape
    kv_heads = k_target.shape[1]
    if seq_q != seq_k:
        operands = (q.chain.values[-1], k.chain.values[-1])
        names = in_model_dims(evaluator, lambda ev: tuple(ev.shape_of(value)[seq_axis[name]]
                                                           for value, name in zip(operands, "qk")))
        raise NotFused(f"seq_q {names[0]} != seq_k {names[1]} (cross attention or a KV cache); the kernel needs them equal")
    if (k_target.shape[:3] != (batch, kv_heads, head_dim) or v_target.shape[:2] != (batch, kv_heads)
            or v_target.shape[3] != head_dim or seq_v != seq_k):
        def shapes(ev):
            there = _kernel_targets(q, k, v, ev)
            return tuple(size for shape in _kernel_shapes(there.targets, there.seqs) for size in shape)
        words = in_model_dims(evaluator, shapes)
        raise NotFused(f"q, k, v shapes do not agree: {dims_text(words[:4])}, {dims_text(words[4:8])}, "
                       f"{dims_text(words[8:])}")
    if head_dim > contract.MAX_HEAD_DIM:
        raise NotFused(f"head dim {head_dim} > {contract.MAX_HEAD_DIM}, the kernel's limit")
    picks = (choose_source(labels["q"], q_target), choose_source(labels["k"], k_target),
             choose_source(labels["v"], v_target))
    return LayoutProof(batch, heads, kv_heads, head_dim, seq_q, seq_k, picks, labels["q"][-1].ndim == 3,
                       grid_order(k_heads))


@dataclasses.dataclass(frozen=True)
class ScoresLayout:
    """Where the scores' batch axis is (negative; None when the products do not say) and their rank."""

    batch_axis: int | None
    rank: int


def _read_mask(steps, evaluator: Evaluator, seq_q: int, seq_k: int, layout: ScoresLayout,
               head_dim: int) -> tuple[ScoreReading, KeyMask | None]:
    """The scale and mask of the steps, with a key mask read from an input carried in the column;
    what the column cannot carry is read as before when --assume-no-padding vouches for the input."""
    try:
        reading, key_mask = read_with_key_mask(steps, evaluator, seq_q, seq_k, layout.batch_axis, layout.rank)
        if key_mask is not None and head_dim + 1 > contract.MAX_HEAD_DIM:
            name = key_mask.inputs[0]
            raise NotFused(f"the mask reads graph input '{name}' per key (a padding mask); carrying it in the "
                           f"key-bias column needs head dim {head_dim} + 1 > {contract.MAX_HEAD_DIM}, the kernel's "
                           f"limit: there is no room for the column. --assume-no-padding ('{name}' always all ones, "
                           "unsafe with padded batches) is the only route there")
        return reading, key_mask
    except NotFused:
        if not evaluator.mask_inputs:
            raise
    return read_scores(steps, evaluator, seq_q, seq_k), None


def _check_mask_at_longer_seq(score_steps, query: Value, seq_axis: int, reading: ScoreReading,
                              evaluator: Evaluator, layout: ScoresLayout, head_dim: int,
                              key_mask: KeyMask | None) -> None:
    """A symbolic seq was proven at a small sample size; a mask computed from shapes may change
    with the length (a sliding window is causal up to its window). Prove it again at a length
    past every constant its computation uses."""
    steps = score_steps(evaluator.shape_of(query)[seq_axis], evaluator.shape_of(query)[seq_axis])
    operands = [v for st in steps for v in (st.operand, st.condition) if isinstance(v, Value)]
    reach = max((abs(c) for v in operands for c in evaluator.cone_index_constants(v)), default=0)
    longer = max(reach + 2, 2 * evaluator.shape_of(query)[seq_axis])
    if longer > MAX_MASK_PROOF_SEQ:
        raise NotFused(f"the mask is computed with the constant {reach} (a window?) and cannot be proven "
                       f"for symbolic seq lengths beyond {MAX_MASK_PROOF_SEQ}; export with a fixed seq")
    at_longer = evaluator.at_seq(longer)
    # The free symbol sampled at the query's length, when one is: inferring the query's shape
    # at the new binding would walk every layer before it again.
    sample = evaluator.shape_of(query)[seq_axis]
    symbols = [name for name, size in evaluator.binding.items() if size == sample]
    seq = at_longer.binding[symbols[0]] if len(symbols) == 1 else at_longer.shape_of(query)[seq_axis]
    # Both lengths are the pass's own: say so, with the dim's name, so they read as where it looked.
    (name,) = in_model_dims(evaluator, lambda ev: (ev.shape_of(query)[seq_axis],))
    try:
        again, again_key_mask = _read_mask(score_steps(seq, seq), at_longer, seq, seq, layout, head_dim)
    except (NotFused, Unprovable) as exc:
        if evaluator.admitted_at_seq(longer) is not None:  # past a limit the graph has: again, at the limit
            return _check_mask_at_longer_seq(score_steps, query, seq_axis, reading, evaluator, layout, head_dim,
                                             key_mask)
        if isinstance(exc, Unprovable):
            raise
        raise NotFused(f"with seq {name} at {seq}: {exc.reason}") from None
    if (again_key_mask is None) != (key_mask is None):
        raise NotFused(f"the mask reads an input per key with seq {name} at one of {sample} and {seq} only")
    if again != reading:
        raise NotFused(f"the mask reads as {reading} with seq {name} at {sample} but {again} at {seq}")


def plan_block(
    q: Operand,
    k: Operand,
    v: Operand,
    *,
    evaluator: Evaluator,
    score_steps,  # (seq_q, seq_k) -> the score steps; called once the seq lengths are proven
    output: Value,
    insert_before: Node,
    dropout_p: float = 0.0,
    seed: int = 0,
    output_perm: tuple[int, ...] | None = None,
    scores_follow_q: bool = False,
) -> FusionPlan:
    """`scores_follow_q`: the scores' axes are q's with its head-dim axis (last) holding the keys
    (a MatMul product, no data movement before the score steps); it locates their batch axis."""
    try:
        dtypes = {evaluator.dtype_of(op.chain.values[-1]) for op in (q, k, v)}
        out_dtype = evaluator.dtype_of(output)
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention dtypes: {exc}") from None
    if len(dtypes) != 1:
        raise NotFused(f"q, k and v have different dtypes ({', '.join(sorted(map(dtype_name, dtypes)))})")
    if out_dtype not in dtypes:
        raise NotFused(f"the attention output is {dtype_name(out_dtype)}, not the inputs' {dtype_name(dtypes.pop())}")

    # Keyed by what the proof reads, so that identical layers share it.
    key = ("layout",) + tuple((kernel_axes(op, evaluator), chain_signature(op.chain, evaluator)) for op in (q, k, v))
    proof: LayoutProof = memoized(evaluator.memo, key, lambda: _prove_layout(q, k, v, evaluator))
    # What replaces the block must have the block's shape: a mask or scale that broadcasts the
    # scores to more batch entries or dims would make the original output larger than the kernel's.
    def kernel_output_of(proof: LayoutProof) -> tuple[int, ...]:
        shape = ((proof.batch * proof.heads, proof.seq_q, proof.head_dim) if proof.batched_heads
                 else (proof.batch, proof.heads, proof.seq_q, proof.head_dim))
        return shape if output_perm is None else tuple(shape[i] for i in output_perm)
    kernel_output = kernel_output_of(proof)
    try:
        output_shape = evaluator.shape_of(output)
    except Unprovable as exc:
        raise NotFused(f"cannot prove the attention output's shape: {exc}") from None
    if output_shape != kernel_output:
        def shapes(ev):
            return ev.shape_of(output) + kernel_output_of(_prove_layout(q, k, v, ev))
        words = in_model_dims(evaluator, shapes)
        raise NotFused(f"the attention output has shape {dims_text(words[:len(output_shape)])}, the kernel's would be "
                       f"{dims_text(words[len(output_shape):])} (the mask or scale broadcasts the scores)")
    query = q.chain.values[-1]
    axes = kernel_axes(q, evaluator)  # where the query's batch and seq axes are (an Einsum's operand: anywhere)
    seq = _size(query, axes[3], proof.seq_q, evaluator) if axes[3] is not None else proof.seq_q
    rank = len(evaluator.shape_of(query))
    batch_first = scores_follow_q and axes[0] == 0 and axes[2] == rank - 1 and axes[3] == rank - 2 and rank in (3, 4)
    layout = ScoresLayout(-rank if batch_first and not proof.batched_heads else None, rank)
    try:
        reading, key_mask = _read_mask(score_steps(proof.seq_q, proof.seq_k), evaluator, proof.seq_q, proof.seq_k,
                                       layout, proof.head_dim)
        if isinstance(seq, str):
            _check_mask_at_longer_seq(score_steps, query, axes[3], reading, evaluator, layout, proof.head_dim,
                                      key_mask)
    except Unprovable as exc:
        raise NotFused(f"cannot prove what the mask is: {exc}") from None
    q_src, k_src, v_src = (
        Source(op.chain.values[pick.index], pick.perm, pick.unsqueeze, op.chain.factor_after(pick.index))
        for op, pick in zip((q, k, v), proof.picks)
    )
    scale = reading.scale * q_src.factor * k_src.factor

    notes = []
    if proof.q_head_order is not None:
        notes.append("kv heads are shared in another order than repeat_kv's: q heads reordered for the grid")
    if key_mask is not None:
        dtype = evaluator.dtype_of(output)
        masked = contract.key_bias_masked_value(scale, dtype)
        if masked is None:
            raise NotFused(f"the key mask cannot be carried in the key-bias column: at softmax scale {scale:g} no "
                           f"masked value <= {contract.KEY_BIAS_MASKED_AT_MOST:g} divided by the scale is finite in "
                           f"{dtype_name(dtype)}")
        key_mask = dataclasses.replace(key_mask, masked=masked, dtype=dtype)
        if key_mask.general:
            notes.append(f"an additive term per key, carried as it is in head-dim column {proof.head_dim + 1} "
                         f"(terms at or below {masked:g} as {masked:g}); under mixed precision the kernel's bf16 "
                         "product rounds it to about 2^-8 of its size")
        else:
            notes.append(f"the key mask rides in head-dim column {proof.head_dim + 1} (a masked key's score gets "
                         f"{masked:g})")
        if reading.causal:
            notes.append("query rows with no visible key (left padding, before a sequence's first real token) "
                         "attend over their own padded keys here, where the original's value is an artefact of its "
                         "mask constant; no real position reads them, they are masked keys in every later layer")
    tile = None
    if isinstance(seq, int):  # the padding rule compile applies (contract.seq_padding), said in the report
        padding = contract.seq_padding(seq, causal=reading.causal, key_bias_column=key_mask is not None,
                                       head_dim=proof.head_dim)
        if isinstance(padding, contract.Violation):
            raise NotFused(f"seq {seq} is not a multiple of {contract.KERNEL.pad_multiple}: the kernel cannot run "
                           "it, and padding a non-causal block masks the padded keys in a key-bias column, which "
                           f"needs head dim {proof.head_dim} + 1 <= {contract.MAX_HEAD_DIM}")
        if padding.how == contract.PAD_CAUSAL:
            notes.append(f"compile pads seq {seq} to {padding.padded_seq} (exact under the causal mask)")
        elif padding.how != contract.PAD_NONE:
            notes.append(f"compile pads seq {seq} to {padding.padded_seq} and masks the padded keys in the "
                         "key-bias column")
        tile = padding.seq_tile_size
    attrs = contract.FlashFwdAttrs(
        softmax_scale=float(np.float32(scale)),
        use_causal_mask=reading.causal,
        num_heads=proof.heads,
        num_kv_heads=proof.kv_heads,
        dropout_p=dropout_p,
        seq_tile_size=tile,
        key_bias_column=key_mask is not None,
    )
    return FusionPlan(
        q=q_src, k=k_src, v=v_src, attrs=attrs, output=output,
        squeeze_heads=proof.batched_heads,
        insert_before=insert_before,
        batch=_size(query, axes[0], proof.batch, evaluator) if axes[0] is not None else proof.batch, seq=seq, head_dim=proof.head_dim, notes=notes, seed=seed,
        q_head_order=proof.q_head_order, output_perm=output_perm, key_mask=key_mask,
    )
