"""Triton backend: GPU kernels (also runnable on CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

NAME = "triton"


def availability() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not installed ({e})"
    import torch

    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
