"""The versions of NKI `flash_fwd` whose arithmetic and on-chip buffers differ, read from the
kernel's public source (github aws-neuron/nki-samples, reference attention kernel history).

Which one an SDK ships is read from the installed kernel's signature (binding.py); without the
SDK, `--kernel-version` picks one and DEFAULT is used otherwise.

| version | nki-samples source | signature | QK^T scores | masked scores | row sums of p | o/l/m buffers |
|---|---|---|---|---|---|---|
| 2.20 | `src/reference/attention.py` at 5d97201 (SDK 2.20) | `(q, k, v, seed, o, lse=None, ...)` | copied out of PSUM as the kernel dtype (bf16 under mixed precision) | -9984.0 in the kernel dtype | `nl.sum` of p after rounding to the kernel dtype | o: (seq/128) x (seq/seq_tile_size) x 128 x d, acc dtype |
| 2.21 | `src/nki_samples/reference/attention.py` at 05c0769 (SDK 2.21) | `@nki.jit (q, k, v, seed, logit_bias=None, ...)` returns o | acc dtype (fp32 under mixed precision) | -9984.0 in the acc dtype | `activation_reduce` (ScalarE math in fp32) | o: min(seq/128, attn_core_tile_size) x 128 x d |
| 2.21-swa | same file from 060228e (Jul 2025) on | adds `sliding_window=-1` before `mixed_precision` | acc dtype | `nl.fp32.min` | `activation_reduce` | as 2.21 |
"""

from __future__ import annotations

import dataclasses

import numpy as np

FP32_MIN = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class KernelVersion:
    name: str
    source: str  # where its arithmetic was read
    scores_in_kernel_dtype: bool  # QK^T rounded to the kernel dtype (bf16) before the softmax
    mask_value: float
    row_sums_of_rounded_p: bool  # p's row sums add p after rounding to the kernel dtype
    o_buffer_per_q_tile_and_kv_tile: bool  # 2.20's o/l/m buffers; later ones tile o by attn_core_tile_size

    def describe(self) -> str:
        scores = "bf16 scores" if self.scores_in_kernel_dtype else "fp32 scores"
        mask = "mask -9984" if self.mask_value == -9984.0 else "mask fp32 min"
        return f"flash_fwd {self.name} arithmetic ({scores} under mixed precision, {mask})"


VERSIONS = {
    v.name: v
    for v in (
        KernelVersion("2.20", "nki-samples 5d97201 src/reference/attention.py", True, -9984.0, True, True),
        KernelVersion("2.21", "nki-samples 05c0769 src/nki_samples/reference/attention.py", False, -9984.0, False, False),
        KernelVersion("2.21-swa", "nki-samples 060228e src/nki_samples/reference/attention.py", False, FP32_MIN, False,
                      False),
    )
}

# Without an SDK to read it from: the newest public source of the kernel (nki-samples, July 2025 on).
DEFAULT = "2.21-swa"
