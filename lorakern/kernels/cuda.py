"""CUDA backend: hand-written kernels from csrc/cuda (module ``lorakern._cuda``)."""

from __future__ import annotations

NAME = "cuda"


def availability() -> tuple[bool, str]:
    try:
        from lorakern import _cuda  # noqa: F401
    except ImportError as e:
        return False, f"native module lorakern._cuda not built ({e})"
    import torch

    if not torch.cuda.is_available():
        return False, "lorakern._cuda built, but torch sees no CUDA device"
    return True, "lorakern._cuda loaded"
