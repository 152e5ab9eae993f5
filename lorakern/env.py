"""``python -m lorakern.env``: versions, CPU features, and which backends loaded (and why not)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_features() -> dict[str, bool]:
    """AVX2 / AVX-512 / AVX-512-BF16 as this CPU reports them (from /proc/cpuinfo on Linux)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "avx2": "avx2" in flags and "fma" in flags,
        "avx512f": "avx512f" in flags,
        "avx512bw": "avx512bw" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
    }


def report() -> str:
    import torch

    from .ops._registry import ENV_VAR, PREFERENCE, requested, status

    lines = [
        f"lorakern {_version('lorakern')}",
        f"python {sys.version.split()[0]} on {platform.platform()}",
        f"torch {torch.__version__} (cuda build: {torch.version.cuda or 'no'}, cuda available: {torch.cuda.is_available()})",
        f"triton {_version('triton')}, numpy {_version('numpy')}, transformers {_version('transformers')}",
        f"peft {_version('peft')}, bitsandbytes {_version('bitsandbytes')}",
        "cpu features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_features().items()),
        f"{ENV_VAR}={requested() or 'auto'}",
        "backends:",
    ]
    for name, (ok, reason) in status().items():
        lines.append(f"  {name:<10} {'available' if ok else 'unavailable'}: {reason}")
    lines.append("automatic order (first that supports and does not decline a call):")
    for device, order in PREFERENCE.items():
        lines.append(f"  {device} tensors: {' -> '.join(order)}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
