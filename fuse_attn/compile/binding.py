"""Finding NKI `flash_fwd` in the installed Neuron SDK, and launching it from PyTorch.

Which SDK generation is installed is read from what imports and from the kernel's signature,
never from a version string (release notes: aws-neuron/aws-neuron-sdk; kernel source history:
aws-neuron/nki-samples):

| generation | found | flash_fwd | launched as |
|---|---|---|---|
| 2.20 | `o` among flash_fwd's parameters | plain function `(q, k, v, seed, o, lse=None, ...)` | `torch_neuronx.xla_impl.ops.nki_jit()(flash_fwd)[b, kv](q, k, v, None, o, ...)`, o allocated here |
| 2.21-2.23 | `@nki.jit` kernel, `torch_neuronx.xla_impl.ops.nki_jit` still there (deprecated) | `(q, k, v, seed, logit_bias=None, ...)`, returns o | `flash_fwd[b, kv](q, k, v, None, ...)` |
| 2.24-2.27 | `@nki.jit` kernel, nki_jit gone (unsupported from 2.24) | same, later with `sliding_window` before `mixed_precision` | `flash_fwd[b, kv](...)` directly on the XLA tensors |
| 2.28+ | the `nki` package in its 2.28 layout (`nki.meta`), or `nki` without neuronxcc's kernel | none documented for Inf2 | refused, one line |

Everything after `seed` goes by keyword: later kernels insert parameters (`logit_bias`,
`sliding_window`) after it. `seed` is None and `training=False`: the kernel asserts both in
inference, and `lse` is neither passed nor returned.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import torch

from fuse_attn.ir.contract import FlashFwdAttrs

KERNEL_MODULE = "neuronxcc.nki.kernels.attention"
NKI_JIT_MODULE = "torch_neuronx.xla_impl.ops"
SUPPORTED_RELEASES = "Neuron SDK 2.20 to 2.27 (neuronxcc.nki.kernels.attention.flash_fwd)"
INSTALL_HINT = ("pip install torch-neuronx neuronx-cc --extra-index-url=https://pip.repos.neuron.amazonaws.com "
                "(from an SDK release 2.20-2.27), or pass --simulate")
# The parameters every generation's flash_fwd has, whatever it inserted between them.
_COMMON_PARAMETERS = ("q", "k", "v", "seed", "softmax_scale", "use_causal_mask", "mixed_precision", "dropout_p", "config")


class SDKUnusable(RuntimeError):
    """The Neuron SDK is missing or cannot run flash_fwd here; the message is one line saying what was found."""


@dataclasses.dataclass(frozen=True)
class KernelAPI:
    generation: str  # "2.20", "2.21-2.23", "2.24-2.27"
    kernel_version: str  # kernel_versions.VERSIONS key: the arithmetic and buffers of the installed kernel
    kernel: Any  # launchable as kernel[b, kv](...)
    flash_config: Callable[..., Any]  # FlashConfig
    caller_allocates_output: bool  # 2.20: o is passed in
    parameters: tuple[str, ...]

    @property
    def call_style(self) -> str:
        if self.caller_allocates_output:
            return "nki_jit()(flash_fwd)[b, kv](q, k, v, None, o, ...), o allocated by the caller"
        return "@nki.jit flash_fwd[b, kv](q, k, v, None, ...) returns o"

    def describe(self) -> str:
        return f"NKI flash_fwd of SDK {self.generation}: {self.call_style}; kernel arithmetic {self.kernel_version}"


def _try_import(name: str) -> tuple[Any, BaseException | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError (OSError, undefined symbols)
        return None, exc


def _parameters(fn: Any) -> tuple[str, ...] | None:
    """The parameter names of the kernel function, looking through jit wrappers."""
    for candidate in (fn, getattr(fn, "func", None), getattr(fn, "__wrapped__", None), getattr(fn, "kernel", None)):
        if candidate is None:
            continue
        try:
            return tuple(inspect.signature(candidate).parameters)
        except (TypeError, ValueError):
            continue
    return None


def _version_of(module: Any) -> str:
    version = getattr(module, "__version__", None)
    return f" {version}" if isinstance(version, str) else ""


def _refuse(found: str) -> SDKUnusable:
    return SDKUnusable(f"{found}; flash_fwd runs on Inf2 with {SUPPORTED_RELEASES}: {INSTALL_HINT}")


def detect_kernel_api() -> KernelAPI:
    """The installed flash_fwd and how to launch it; SDKUnusable (one line) when there is none to launch."""
    nki_package, _ = _try_import("nki")
    nki_2_28, _ = _try_import("nki.meta") if nki_package is not None else (None, None)
    attention, attention_error = _try_import(KERNEL_MODULE)
    if nki_2_28 is not None:
        still = f", beside a deprecated {KERNEL_MODULE}" if attention is not None else ""
        raise _refuse(f"found the nki package{_version_of(nki_package)} of Neuron SDK 2.28 or later (nki.meta){still}: "
                      "Neuron documents no flash_fwd for Inf2 there (its kernel library is for Trn2/Trn3, and "
                      "kernel[...] sets the LNC degree, not the [b, kv] grid)")
    if attention is None:
        neuronxcc, neuronxcc_error = _try_import("neuronxcc")
        if neuronxcc is None and nki_package is None:
            raise SDKUnusable(f"the Neuron SDK is not installed (no neuronxcc: {neuronxcc_error}); on an Inf2 instance "
                              "install it from the Neuron package repository (the packages of those names on the "
                              f"public index are empty placeholders): {INSTALL_HINT}")
        if neuronxcc is None:
            raise _refuse(f"found the nki package{_version_of(nki_package)} but no neuronxcc, which holds flash_fwd")
        raise _refuse(f"neuronxcc{_version_of(neuronxcc)} imports but {KERNEL_MODULE} does not "
                      f"({type(attention_error).__name__}: {attention_error})")
    flash_fwd, flash_config = getattr(attention, "flash_fwd", None), getattr(attention, "FlashConfig", None)
    if flash_fwd is None or flash_config is None:
        missing = " and ".join(n for n, x in (("flash_fwd", flash_fwd), ("FlashConfig", flash_config)) if x is None)
        raise _refuse(f"{KERNEL_MODULE} imports but has no {missing}")
    params = _parameters(flash_fwd)
    if params is None or not set(_COMMON_PARAMETERS) <= set(params):
        raise _refuse(f"{KERNEL_MODULE}.flash_fwd has parameters {params}, not those of any known flash_fwd")
    ops, _ = _try_import(NKI_JIT_MODULE)
    nki_jit = getattr(ops, "nki_jit", None)
    if "o" in params:  # 2.20: a plain function, launched through torch-neuronx's nki_jit
        if nki_jit is None:
            raise _refuse(f"{KERNEL_MODULE}.flash_fwd takes o (the SDK 2.20 kernel) but {NKI_JIT_MODULE}.nki_jit, "
                          "which launches it from PyTorch, is missing")
        return KernelAPI("2.20", "2.20", nki_jit()(flash_fwd), flash_config, True, params)
    kernel = flash_fwd
    if not callable(getattr(type(kernel), "__getitem__", None)):  # the 2.21+ signature undecorated: jit it here
        nki, nki_error = _try_import("neuronxcc.nki")
        if nki is None or not callable(getattr(nki, "jit", None)):
            raise _refuse(f"{KERNEL_MODULE}.flash_fwd is not launchable as flash_fwd[b, kv] and neuronxcc.nki.jit "
                          f"is missing ({nki_error})")
        kernel = nki.jit(flash_fwd)
    generation = "2.21-2.23" if nki_jit is not None else "2.24-2.27"
    kernel_version = "2.21-swa" if "sliding_window" in params else "2.21"
    return KernelAPI(generation, kernel_version, kernel, flash_config, False, params)


def launch_flash_fwd(
    api: KernelAPI, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attrs: FlashFwdAttrs, seq_tile_size: int
) -> torch.Tensor:
    """o (b, h, s, d) = flash_fwd[b, kv](q (b, h, d, s), k (b, kv, d, s), v (b, kv, s, d)), inference mode."""
    b, h, d, s = q.shape
    kv = k.shape[1]
    kwargs = dict(
        softmax_scale=float(attrs.softmax_scale),
        use_causal_mask=bool(attrs.use_causal_mask),
        mixed_precision=bool(attrs.mixed_precision),
        dropout_p=float(attrs.dropout_p),
        config=api.flash_config(seq_tile_size=seq_tile_size, training=False),
    )
    seed = None  # inference: the kernel asserts seed is None (and lse is None)
    if api.caller_allocates_output:
        o = torch.zeros((b, h, s, d), dtype=q.dtype, device=q.device)
        api.kernel[b, kv](q, k, v, seed, o, **kwargs)
        return o
    return api.kernel[b, kv](q, k, v, seed, **kwargs)
