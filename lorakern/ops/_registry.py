"""Backend registry: which implementation runs an op, chosen by device and availability.

Order of preference per device type (first available backend that implements
the op, supports the arguments and does not decline them wins)::

    cuda tensors: cuda, composite, triton, reference
    cpu tensors:  cpu, reference

A backend's ``supports(op, *args)`` says whether it *can* run a call; its
optional ``declines(op, *args)`` says that another backend measured faster for
it (the reason names the measurement), which the automatic choice respects and
a forced backend ignores. ``lorakern.kernels.composite`` explains the CUDA order.

``LORAKERN_BACKEND=<name>`` forces one backend for every op; if it is not
available, lacks the op or rejects the arguments, the call raises
:class:`BackendUnavailable` instead of falling back. The one exception is
``nf4_quantize`` (:data:`STORAGE_OPS`): a storage conversion, not a compute kernel
under test, bit-identical on every backend that has it (tests check each against
``lorakern.formats.nf4``). A forced backend without it (Triton) hands it to the
automatic choice, so ``LORAKERN_BACKEND=triton`` can build the QLoRA model its
kernels then run. The Triton backend runs on CPU tensors only when asked for
explicitly (it then needs ``TRITON_INTERPRET=1``, set before triton is imported).
"""

from __future__ import annotations

import os
from types import ModuleType

from ..kernels import _MODULES, BACKENDS, _loaded, load  # noqa: F401 (re-exported: the backend table)
from ..kernels import unsupported as _supports

PREFERENCE = {
    "cuda": ("cuda", "composite", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
ENV_VAR = "LORAKERN_BACKEND"
# Ops a forced backend that cannot run them leaves to the automatic choice (see the module docstring).
STORAGE_OPS = frozenset({"nf4_quantize"})


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op."""


def status() -> dict[str, tuple[bool, str]]:
    """Availability of every backend with the reason, for ``python -m lorakern.env``."""
    return {name: (load(name)[0] is not None, load(name)[1]) for name in BACKENDS}


def requested() -> str | None:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in _MODULES:
        raise BackendUnavailable(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return name


def _declines(mod: ModuleType, op: str, args: tuple) -> str | None:
    """None when the automatic choice should give ``op(*args)`` to ``mod``, else why not."""
    check = getattr(mod, "declines", None)
    return check(op, *args) if check is not None else None


def pick(op: str, device_type: str, args: tuple) -> ModuleType:
    """The backend module that runs ``op`` for tensors on ``device_type``."""
    forced = requested()
    if forced is not None:
        mod, reason = load(forced)
        if mod is None:
            raise BackendUnavailable(f"{ENV_VAR}={forced}: backend not available ({reason})")
        if forced == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise BackendUnavailable(f"{ENV_VAR}=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if forced == "cuda" and device_type != "cuda":
            raise BackendUnavailable(f"{ENV_VAR}=cuda cannot run {op} on {device_type} tensors")
        why = _supports(mod, op, args)
        if why is None:
            return mod
        if op not in STORAGE_OPS:
            raise BackendUnavailable(f"{ENV_VAR}={forced}: {op} not supported here: {why}")
    for name in PREFERENCE.get(device_type, ("reference",)):
        mod, _ = load(name)
        if mod is not None and _supports(mod, op, args) is None and _declines(mod, op, args) is None:
            return mod
    return load("reference")[0]
