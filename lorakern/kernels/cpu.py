"""CPU backend: C++ kernels from csrc/cpu (module ``lorakern._C``)."""

from __future__ import annotations

try:
    from lorakern import _C
except ImportError as e:  # not built: the reference backend serves CPU tensors
    _C = None
    _IMPORT_ERROR = str(e)

NAME = "cpu"


def availability() -> tuple[bool, str]:
    if _C is None:
        return False, f"native module lorakern._C not built ({_IMPORT_ERROR})"
    return True, "lorakern._C loaded"
