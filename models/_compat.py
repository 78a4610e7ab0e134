"""Environment fixes the zoo needs before torch-side libraries are imported.

torchvision from PyPI is a CUDA build; beside the CPU torch this project pins, its `_C`
extension cannot load, and `import torchvision` then dies in `_meta_registrations` with
"operator torchvision::nms does not exist". transformers imports torchvision whenever it is
installed, and timm needs it (`torchvision.ops.misc.FrozenBatchNorm2d`), so one broken wheel
takes both down. The zoo never calls a torchvision op: when the real import fails this way we
define the two op schemas the meta registrations look up (no kernels) and import again.
"""

from __future__ import annotations

import os
import sys

_TORCHVISION_SHIM = None  # keeps the torch.library fragment alive (it is undone when collected)


def prepare() -> None:
    """Offline hub, and an importable torchvision. Idempotent."""
    global _TORCHVISION_SHIM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if _TORCHVISION_SHIM is not None:
        return
    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM = lib
        import torchvision  # noqa: F401
    else:
        _TORCHVISION_SHIM = False
