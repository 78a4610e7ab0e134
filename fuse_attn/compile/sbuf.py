"""What one flash_fwd program keeps in SBUF, from the kernel source's buffer allocations, against
a NeuronCore-v2's SBUF (Inf2/Trn1: 24 MiB = 128 partitions x 192 KiB).

SBUF is addressed per partition: a buffer declared (..., par_dim(128), ...) takes its free size
in every partition, so the budget is 192 KiB per partition. Counted per q head of a program (the
kernel loops over its G q heads), buffers live together at the deepest point of the loop:

2.20 (5d97201): o_buffer (seq/128, seq/tile, 128, d), l_buffer and m_buffer (seq/128, seq/tile,
128, 1), all in the accumulation dtype, for the whole program; the k tile (d, tile) and v tile
(tile/128, 128, d) and the q tile (d, 128) in the kernel dtype; in the attention core qk_res_buf
(128, tile) acc, p_local and its transpose (128, tile) kernel dtype, max_local and p_partial_sum.
2.21 / 2.21-swa (05c0769 on): o_buffer and m_buffer only for min(seq/128, attn_core_tile_size)
q tiles at a time (the rest is recomputed), l_buffer (128, seq/128); the same tiles and core
buffers, plus a (128, 512) fp32 select buffer and o_previous_scaled (128, d).
"""

from __future__ import annotations

import dataclasses

from fuse_attn.compile.kernel_versions import VERSIONS

SBUF_BYTES = 24 * 2**20
PARTITIONS = 128
PARTITION_BYTES = SBUF_BYTES // PARTITIONS  # 192 KiB
ATTN_CORE_TILE_SIZE = 256  # FlashConfig's default from 2.21; the binding leaves it as it is
_BYTES = {"float": 4, "float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class SbufUse:
    per_partition: int  # bytes in each of the 128 partitions
    o_buffer: int  # of which the output accumulator

    @property
    def fits(self) -> bool:
        return self.per_partition <= PARTITION_BYTES

    def describe(self) -> str:
        return (f"SBUF {self.per_partition / 1024:.0f} KiB of {PARTITION_BYTES // 1024} KiB per partition "
                f"({self.per_partition * PARTITIONS / 2**20:.1f} of {SBUF_BYTES // 2**20} MiB)")


def sbuf_use(kernel_version: str, seq: int, seq_tile_size: int, head_dim: int, dtype: str,
             mixed_precision: bool) -> SbufUse:
    """The bytes per partition one program's buffers need at this launch."""
    io = _BYTES[dtype]
    acc = 4 if mixed_precision else io
    kern = 2 if mixed_precision else io
    q_tiles, kv_tiles, tile, d = seq // 128, seq // seq_tile_size, seq_tile_size, head_dim
    reduction = min(2048, tile // 2)
    tiles = tile * kern + (tile // 128) * d * kern + 128 * kern  # k tile, v tile, q tile
    core = tile * acc + 2 * tile * kern + (tile // 512) * acc + (tile // reduction) * acc + d * kern
    if VERSIONS[kernel_version].o_buffer_per_q_tile_and_kv_tile:
        o_buffer = q_tiles * kv_tiles * d * acc
        state = o_buffer + 2 * q_tiles * kv_tiles * acc  # + l_buffer, m_buffer
    else:
        kept = min(q_tiles, ATTN_CORE_TILE_SIZE)
        o_buffer = kept * d * acc
        state = o_buffer + kept * acc + q_tiles * acc  # + m_buffer, l_buffer
        core += 512 * 4 + d * acc  # qk_select_tmp, o_previous_scaled
    return SbufUse(state + tiles + core, o_buffer)


def longest_seq_that_fits(kernel_version: str, seq_tile_size: int, head_dim: int, dtype: str,
                          mixed_precision: bool) -> int:
    """The longest seq (a multiple of seq_tile_size) whose launch fits, 0 when none does."""
    seq = 0
    while sbuf_use(kernel_version, seq + seq_tile_size, seq_tile_size, head_dim, dtype, mixed_precision).fits:
        seq += seq_tile_size
        if seq > 2**22:  # the version's buffers do not grow with seq
            break
    return seq


def sbuf_problem(kernel_version: str, plan) -> str | None:
    """None when the plan's launch fits in SBUF; else the problem with its figure and the fix."""
    use = sbuf_use(kernel_version, plan.padded_seq, plan.seq_tile_size, plan.launch_head_dim, plan.dtype,
                   plan.attrs.mixed_precision)
    if use.fits:
        return None
    fits = longest_seq_that_fits(kernel_version, plan.seq_tile_size, plan.launch_head_dim, plan.dtype,
                                 plan.attrs.mixed_precision)
    fixes = [f"a --shape with seq <= {fits}" if fits else "a shorter --shape"]
    bigger = [t for t in (2048, 1024) if t > plan.seq_tile_size and plan.padded_seq % t == 0 and sbuf_use(
        kernel_version, plan.padded_seq, t, plan.launch_head_dim, plan.dtype, plan.attrs.mixed_precision).fits]
    if bigger:
        fixes.append(f"seq_tile_size {bigger[0]} on the node (2.20's o_buffer shrinks with a larger tile)")
    if VERSIONS[kernel_version].o_buffer_per_q_tile_and_kv_tile:
        fixes.append("an SDK 2.21-2.27, whose kernel tiles o_buffer (attn_core_tile_size)")
    return (f"{plan.node_name}: flash_fwd {kernel_version} needs {use.describe()} at seq {plan.padded_seq}, "
            f"seq_tile_size {plan.seq_tile_size}, d {plan.launch_head_dim} (o_buffer alone {use.o_buffer / 1024:.0f} KiB); "
            f"fix: {', or '.join(fixes)}")
