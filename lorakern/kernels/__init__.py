"""Backends: one module per backend, each exposing the functions of ``lorakern.reference``.

``cpu`` (C++ in csrc/cpu, module ``lorakern._C``), ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``) and ``cuda`` (csrc/cuda, module ``lorakern._cuda``).
Importing this package imports no backend: :func:`load` imports one on first use
(``lorakern.ops`` chooses among them; the composite backend picks its parts with it).
"""

import importlib
from types import ModuleType

BACKENDS = ("cuda", "composite", "triton", "cpu", "reference")
_MODULES = {
    "reference": "lorakern.reference",
    "cpu": "lorakern.kernels.cpu",
    "triton": "lorakern.kernels.triton",
    "cuda": "lorakern.kernels.cuda",
    "composite": "lorakern.kernels.composite",
}
_loaded: dict[str, tuple[ModuleType | None, str]] = {}


def load(name: str) -> tuple[ModuleType | None, str]:
    """Import backend ``name``; return (module or None, reason). Cached; never raises."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            ok, reason = mod.availability()
            _loaded[name] = (mod if ok else None, reason)
        except Exception as e:  # a broken optional backend must not break import lorakern
            _loaded[name] = (None, f"import failed: {type(e).__name__}: {e}")
    return _loaded[name]


def unsupported(mod: ModuleType, op: str, args: tuple) -> str | None:
    """None when backend ``mod`` can run ``op(*args)``, else why not."""
    if not hasattr(mod, op):
        return f"does not implement {op}"
    check = getattr(mod, "supports", None)
    return check(op, *args) if check is not None else None
