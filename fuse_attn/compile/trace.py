"""The Neuron trace: torch_neuronx.trace(module, example_inputs, compiler_args) + torch.jit.save.

torch-neuronx and neuronx-cc are imported lazily: nothing else in fuse-attn needs them, and they
are only published in the Neuron package repository (the public packages of those names are
empty placeholders).
"""

from __future__ import annotations

import importlib
import os
import tempfile

import torch

SDK_MISSING = (
    "the Neuron SDK is not installed (torch-neuronx, neuronx-cc): on an Inf2 instance install it from the "
    "Neuron package repository, `pip install torch-neuronx neuronx-cc "
    "--extra-index-url=https://pip.repos.neuron.amazonaws.com` (the packages of those names on the public "
    "index are empty placeholders), or pass --simulate to run everything but the Neuron trace on CPU"
)


class NeuronSDKMissing(RuntimeError):
    def __init__(self, detail: str = ""):
        super().__init__(SDK_MISSING + (f" [{detail}]" if detail else ""))


def require_neuron_sdk():
    """torch_neuronx, checked to be the real package (with neuronxcc beside it)."""
    try:
        torch_neuronx = importlib.import_module("torch_neuronx")
        importlib.import_module("neuronxcc")
    except ImportError as e:
        raise NeuronSDKMissing(str(e)) from None
    if not callable(getattr(torch_neuronx, "trace", None)):
        raise NeuronSDKMissing("the torch_neuronx found has no trace(): the public placeholder package?")
    return torch_neuronx


def compiler_args(target: str, auto_cast: str | None = None, auto_cast_type: str | None = None,
                  extra: list[str] | None = None) -> list[str]:
    args = ["--target", target, "--model-type", "transformer"]
    if auto_cast:
        args += ["--auto-cast", auto_cast]
    if auto_cast_type:
        args += ["--auto-cast-type", auto_cast_type]
    return args + list(extra or [])


def trace_and_save(module: torch.nn.Module, example_inputs: tuple, args: list[str], path: str) -> None:
    """Trace, then save to a temp file beside `path` renamed into place: a failed trace or save
    leaves nothing behind."""
    torch_neuronx = require_neuron_sdk()
    traced = torch_neuronx.trace(module, example_inputs, compiler_args=args)
    fd, tmp = tempfile.mkstemp(prefix=".fuse-attn-", suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        torch.jit.save(traced, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
