"""The two products of an attention block, as einsum letters: MatMul is one case of Einsum.

QK:  scores[B.., q, k] = sum_d Q[.. q .. d ..] K[.. k .. d ..]   (MatMul: "Bqd,Bdk->Bqk")
PV:  out[.. q .. d ..]  = sum_k P[B.., q, k] V[.. k .. d ..]      (MatMul: "Bqk,Bkd->Bqd")

The letters say where batch/head (B), query, key and head-dim axes sit in every operand, which
is all the layout proof needs: each operand's index labels are permuted into the kernel's
layout, and the kernel's output (B.., q, d) into the block's output order.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from fuse_attn.ir.graph import Node
from fuse_attn.passes._graph import NotFused, describe, is_op


@dataclasses.dataclass(frozen=True)
class Product:
    """A two-operand product: einsum letters, or None for MatMul (letters follow the rank)."""

    node: Node
    equation: tuple[str, str, str] | None

    def letters(self, rank: int, pv: bool) -> tuple[str, str, str]:
        if self.equation is not None:
            return self.equation
        batch = string.ascii_lowercase[:rank - 2]  # MatMul: leading axes are batch axes
        return (batch + "qk", batch + "kd", batch + "qd") if pv else (batch + "qd", batch + "dk", batch + "qk")


def product_of(node: Node | None) -> Product | None:
    """`node` as a product of two tensors, or None if it is not one."""
    if is_op(node, "MatMul"):
        return Product(node, None)
    if not is_op(node, "Einsum") or len(node.inputs) != 2:
        return None
    equation = node.attr("equation", "").replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    operands, out = equation.split("->")
    parts = operands.split(",")
    if len(parts) != 2 or any(len(set(p)) != len(p) for p in (*parts, out)):
        return None  # repeated letters take diagonals: not a plain product
    return Product(node, (parts[0], parts[1], out))


def _one(letters: set[str], what: str, node: Node) -> str:
    if len(letters) != 1:
        raise NotFused(f"{describe(node)} is not an attention product: {len(letters)} {what} axes", node)
    return next(iter(letters))


@dataclasses.dataclass(frozen=True)
class Roles:
    """Axis letters of the scores as the QK product writes them: batch (.., heads), query, key."""

    batch: str
    q: str
    k: str


def qk_roles(product: Product, rank: int) -> tuple[Roles, str, str]:
    """Roles of the score axes, and the letters of Q and K (whose contraction letter is d)."""
    a, b, out = product.letters(rank, pv=False)
    d = _one(set(a) & set(b) - set(out), "contracted", product.node)
    q = _one(set(a) - set(b), "query", product.node)
    k = _one(set(b) - set(a), "key", product.node)
    batch = out[:-2]
    if out[-2:] != q + k or set(a) != set(batch) | {q, d} or set(b) != set(batch) | {k, d}:
        raise NotFused(f"{describe(product.node)} does not give scores as (.., query, key)", product.node)
    if len(batch) not in (1, 2):
        raise NotFused(f"attention scores of rank {len(out)}; the kernel takes (b, h, s, s)", product.node)
    return Roles(batch, q, k), a, b


def _to_kernel(labels: np.ndarray, letters: str, order: str, batch: str) -> np.ndarray:
    """Labels of an operand written in `letters`, permuted to `order`; one batch axis gets h = 1."""
    if labels.ndim != len(letters):
        raise NotFused(f"an attention operand has rank {labels.ndim}, its product reads {len(letters)} axes")
    moved = labels.transpose([letters.index(x) for x in order])
    return moved[:, None] if len(batch) == 1 else moved


def q_and_k_layouts(product: Product):
    """Functions from Q's and K's labels to the kernel's q (b, h, d, s) and k (b, kv, d, s)."""
    def q_layout(labels):
        roles, a, _ = qk_roles(product, labels.ndim)
        return _to_kernel(labels, a, roles.batch + (set(a) - set(roles.batch) - {roles.q}).pop() + roles.q, roles.batch)

    def k_layout(labels):
        roles, a, b = qk_roles(product, labels.ndim)
        d = (set(a) & set(b) - set(roles.batch)).pop()
        return _to_kernel(labels, b, roles.batch + d + roles.k, roles.batch)

    return q_layout, k_layout


@dataclasses.dataclass(frozen=True)
class PvLayout:
    p: str  # the probabilities' letters in the PV product
    v: str
    out: str
    batch: str  # the batch letters, in the scores' order, in the PV product's naming
    q: str
    k: str
    d: str

    def v_layout(self, labels: np.ndarray) -> np.ndarray:
        """V's labels -> the kernel's v (b, kv, s, d)."""
        return _to_kernel(labels, self.v, self.batch + self.k + self.d, self.batch)

    @property
    def output_perm(self) -> tuple[int, ...] | None:
        """How the kernel's output (batch.., q, d) is permuted into the block's output; None if not."""
        kernel = self.batch + self.q + self.d
        perm = tuple(kernel.index(x) for x in self.out)
        return None if perm == tuple(range(len(perm))) else perm


def pv_layout(qk: Product, pv: Product, rank: int) -> PvLayout:
    """Read the PV product against the scores' roles (P's axes are the scores' axes, in order)."""
    roles, _, _ = qk_roles(qk, rank)
    _, _, scores = qk.letters(rank, pv=False)
    p, v, out = pv.letters(rank, pv=True)
    if len(p) != len(scores):
        raise NotFused(f"{describe(pv.node)} reads the probabilities with {len(p)} axes, the scores have {len(scores)}")
    role_of = dict(zip(p, scores))  # PV letter -> QK letter
    as_pv = {qk_letter: pv_letter for pv_letter, qk_letter in role_of.items()}
    batch, q, k = "".join(as_pv[x] for x in roles.batch), as_pv[roles.q], as_pv[roles.k]
    d = _one(set(v) - set(p), "value", pv.node)
    if set(p) - set(out) != {k} or set(v) != set(batch) | {k, d} or set(out) != set(batch) | {q, d}:
        raise NotFused(f"{describe(pv.node)} is not probabilities times values over the key axis", pv.node)
    return PvLayout(p, v, out, batch, q, k, d)
