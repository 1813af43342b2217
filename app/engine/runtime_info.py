"""What the serving machine runs: library versions and the accelerator, for /health and records."""

from __future__ import annotations

import functools
import platform
from typing import Any


@functools.cache
def runtime_info() -> dict[str, Any]:
    """Computed once: none of it changes while the process lives."""
    import numpy
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }


def gpu_memory() -> tuple[int, int] | None:
    """(allocated, reserved) bytes of torch's CUDA allocator; None when CUDA is not in use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
