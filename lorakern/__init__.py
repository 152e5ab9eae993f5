"""lorakern: fast LoRA and QLoRA fine-tuning for PyTorch.

Importing lorakern is cheap: it loads no native module, initialises no GPU and
compiles nothing. Backends load on first use (``python -m lorakern.env`` says
which are available and why the others are not).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY = {
    "ops": "lorakern.ops",
    "NF4Weight": "lorakern.formats.nf4",
    "nf4_quantize": "lorakern.ops",
    "nf4_dequantize": "lorakern.ops",
    "nf4_matmul": "lorakern.ops",
    "lora_linear": "lorakern.ops",
    "qlora_linear": "lorakern.ops",
    "nn": "lorakern.nn",
    "LoRALinear": "lorakern.nn",
    "QLoRALinear": "lorakern.nn",
    "patch": "lorakern.patch",
    "apply_lora": "lorakern.patch",
    "merge_lora": "lorakern.patch",
    "disable_adapters": "lorakern.patch",
    "save_adapter": "lorakern.patch",
    "load_adapter": "lorakern.patch",
    "lora_modules": "lorakern.patch",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakern' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
