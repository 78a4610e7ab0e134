"""Each FlashFwd launch's attention work, fused (flash_fwd) against plain attention ops, with a
time estimate from a NeuronCore-v2's published figures (Inf2/Trn1; flash_fwd-facts.md:
aws-neuron-sdk `nki/guides/architecture/trainium_inferentia2_arch.rst`).

Counted, per launch:
- matmul FLOPs. flash_fwd's follow its tile loop (nki-samples 05c0769 `flash_fwd`,
  `_flash_attention_core`): per q head and 128-query tile, each kv tile it visits (under the
  causal mask, those starting at or left of the q tile), QK^T over the 512-key sub-tiles it
  multiplies and P @ V over the whole kv tile, at the padded seq and the launch's head dim.
  Plain ops multiply the whole (s x s) at the unpadded seq.
- the (s x s) scores and probabilities plain ops materialise, which flash_fwd keeps in SBUF
  and PSUM tile by tile and never writes to HBM.
- HBM traffic. flash_fwd loads each kv tile once per q head (and per `attn_core_tile_size`
  group of 256 q tiles), a q tile per kv tile it visits, and stores o once. Plain ops read q,
  k, v, write o, and write and read back the scores and probabilities when they exceed SBUF
  (24 MiB); smaller ones the compiler can keep on chip, and they are not counted.
The time estimate is max(FLOPs / TensorE throughput, bytes / HBM bandwidth): softmax on
ScalarE/VectorE, DMA overlap and the rest of the graph are not modelled. It is an estimate,
not a measurement (no hardware run here).
"""

from __future__ import annotations

import dataclasses

from fuse_attn.compile.constraints import FlashPlan
from fuse_attn.compile.sbuf import ATTN_CORE_TILE_SIZE, SBUF_BYTES
from fuse_attn.ir import contract

TENSOR_E_FLOPS = {"bf16": 92e12, "fp32": 23e12}  # per NeuronCore-v2, dense matmul
HBM_BYTES_PER_S = 410e9  # per NeuronCore-v2: an Inf2 device's 820 GB/s over its 2 cores
SUB_TILE = 512  # B_F_SIZE: keys per QK^T matmul
# NxD Inference turns its flash kernel on by default at LNC1 (Trn1, Inf2) only from this q length
# (get_flash_attention_strategy; 512-4095 only with attn_kernel_enabled).
NXDI_FLASH_DEFAULT_SEQ = 4096
_BYTES = {"float": 4, "float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class LaunchCost:
    kernel_flops: float  # flash_fwd's matmuls, padding included
    plain_flops: float  # plain ops' matmuls: the unpadded block's whole (s x s), the padding's yardstick
    scores_bytes: float  # the (s x s) scores and probabilities plain ops materialise
    kernel_hbm_bytes: float
    plain_hbm_bytes: float
    scores_in_hbm: bool  # plain ops' scores and probabilities exceed SBUF
    kernel_seconds: float
    plain_seconds: float

    def text(self, plan: FlashPlan) -> list[str]:
        """The launch's lines of the compile report."""
        padded = ""
        if plan.pad:
            padded = (f" (seq {plan.seq} -> {plan.padded_seq}: {self.kernel_flops / self.plain_flops:.1f}x the "
                      f"attention FLOPs of the unpadded block)")
        where = "through HBM, larger than SBUF" if self.scores_in_hbm else "small enough to stay in SBUF"
        rates = (f"one NeuronCore-v2 (TensorE {TENSOR_E_FLOPS['bf16'] / 1e12:.0f} TFLOPS bf16 / "
                 f"{TENSOR_E_FLOPS['fp32'] / 1e12:.0f} fp32, HBM {HBM_BYTES_PER_S / 1e9:.0f} GB/s; matmuls and HBM "
                 "traffic only, not measured)")
        if not plan.kernel:
            return [f"  attention work: plain attention ops {_flops(self.plain_flops)}, (s x s) scores and "
                    f"probabilities {_bytes(self.scores_bytes)} ({where}); estimate, {rates}: "
                    f"{_seconds(self.plain_seconds)} ({_bytes(self.plain_hbm_bytes)} HBM)"]
        lines = [
            f"  attention work: flash_fwd {_flops(self.kernel_flops)}{padded}, plain attention ops "
            f"{_flops(self.plain_flops)}; the (s x s) scores and probabilities flash_fwd never writes to HBM: "
            f"{_bytes(self.scores_bytes)} (plain ops: {where})",
            f"  estimate, {rates}: flash_fwd {_seconds(self.kernel_seconds)} "
            f"({_bytes(self.kernel_hbm_bytes)} HBM), plain ops {_seconds(self.plain_seconds)} "
            f"({_bytes(self.plain_hbm_bytes)} HBM)",
        ]
        if plan.seq < NXDI_FLASH_DEFAULT_SEQ:
            lines.append(f"  seq {plan.seq} is below {NXDI_FLASH_DEFAULT_SEQ}, where NxD Inference turns its own flash "
                         "kernel on by default on NeuronCore-v2 (Trn1, Inf2); --kernel-min-seq N runs launches "
                         "shorter than N as plain attention ops")
        return lines


def _scaled(x: float, units: tuple[tuple[float, str], ...]) -> str:
    """x in the largest unit it reaches, three significant digits."""
    size, name = next(((size, name) for size, name in units if x >= size), units[-1])
    return f"{x / size:.3g} {name}"


def _flops(x: float) -> str:
    return _scaled(x, ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")))


def _bytes(x: float) -> str:
    return _scaled(x, ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")))


def _seconds(x: float) -> str:
    return _scaled(x, ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")))


def kernel_matmul_flops(plan: FlashPlan) -> float:
    """flash_fwd's QK^T and P @ V FLOPs over its tile loop, for every program and q head."""
    n, tile, d = plan.padded_seq, plan.seq_tile_size, plan.launch_head_dim
    q_tile = contract.KERNEL.query_tile
    per_head = 0
    for i in range(n // q_tile):
        q0 = i * q_tile
        for j in range(n // tile):
            k0 = j * tile
            if plan.attrs.use_causal_mask and q0 < k0:
                continue
            sub_tiles = tile // SUB_TILE
            if plan.attrs.use_causal_mask:
                sub_tiles = min(sub_tiles, (q0 - k0) // SUB_TILE + 1)
            per_head += 2 * q_tile * d * sub_tiles * SUB_TILE + 2 * q_tile * tile * d
    return float(per_head) * plan.batch * plan.heads


def _visited_tiles(plan: FlashPlan) -> int:
    """(q tile, kv tile) pairs flash_fwd visits per q head."""
    n, tile, q_tile = plan.padded_seq, plan.seq_tile_size, contract.KERNEL.query_tile
    return sum(1 for i in range(n // q_tile) for j in range(n // tile)
               if not plan.attrs.use_causal_mask or i * q_tile >= j * tile)


def launch_cost(plan: FlashPlan, plain_matmuls_in_bf16: bool) -> LaunchCost:
    """The launch's cost both ways. `plain_matmuls_in_bf16`: whether plain ops' matmuls run at
    TensorE's bf16 rate (16-bit data, or neuronx-cc's --auto-cast casting float32 matmuls)."""
    b, h, kv, s, d = plan.batch, plan.heads, plan.kv_heads, plan.seq, plan.head_dim
    elem = _BYTES[plan.dtype]
    plain_flops = 4.0 * b * h * s * s * d
    scores_bytes = 2.0 * b * h * s * s * elem
    scores_in_hbm = scores_bytes > SBUF_BYTES
    plain_hbm = (2 * b * h * s * d + 2 * b * kv * s * d) * elem + (2 * scores_bytes if scores_in_hbm else 0)
    plain_rate = TENSOR_E_FLOPS["bf16" if plain_matmuls_in_bf16 else "fp32"]
    if not plan.kernel:
        return LaunchCost(0.0, plain_flops, scores_bytes, 0.0, plain_hbm, scores_in_hbm, 0.0,
                          max(plain_flops / plain_rate, plain_hbm / HBM_BYTES_PER_S))
    n, dk = plan.padded_seq, plan.launch_head_dim
    kernel_flops = kernel_matmul_flops(plan)
    q_tiles = n // contract.KERNEL.query_tile
    remat = -(-q_tiles // ATTN_CORE_TILE_SIZE)
    per_head = (remat * 2 * n * dk + _visited_tiles(plan) * contract.KERNEL.query_tile * dk + n * dk) * elem
    kernel_hbm = float(per_head) * b * h
    kernel_bf16 = plan.attrs.mixed_precision or plan.dtype != "float"
    kernel_rate = TENSOR_E_FLOPS["bf16" if kernel_bf16 else "fp32"]
    return LaunchCost(
        kernel_flops, plain_flops, scores_bytes, kernel_hbm, plain_hbm, scores_in_hbm,
        max(kernel_flops / kernel_rate, kernel_hbm / HBM_BYTES_PER_S),
        max(plain_flops / plain_rate, plain_hbm / HBM_BYTES_PER_S),
    )
