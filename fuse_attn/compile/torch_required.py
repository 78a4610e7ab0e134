"""The torch that compile lowers to is the one the user's Neuron SDK pins, never one fuse-attn installs.

torch-neuronx pins torch (2.1, 2.5, 2.7, 2.8 or 2.9 by SDK release) and torch-xla is built against
exactly that torch: installing another breaks both. So the `compile` extra names no torch, and
its absence (or a torch older than any torch-neuronx pins) is reported here in one line.
"""

from __future__ import annotations

import importlib
import re

OLDEST = (2, 1)
WHERE = ("on an Inf2 instance run fuse-attn inside the Neuron venv (source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate), "
         "whose torch belongs to torch-neuronx; elsewhere, for --simulate, pip install torch")


class TorchUnavailable(RuntimeError):
    pass


def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def require_torch():
    """The torch module; TorchUnavailable (one line naming the install) if it is missing or too old."""
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise TorchUnavailable(f"compile needs PyTorch, which is not installed here: {WHERE}") from None
    version = getattr(torch, "__version__", "0")
    if _release(version) < OLDEST:
        raise TorchUnavailable(f"compile needs PyTorch 2.1 or later (the oldest torch-neuronx for Inf2 pins 2.1), "
                               f"found torch {version}: {WHERE}")
    return torch
