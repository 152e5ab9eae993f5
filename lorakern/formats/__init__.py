"""Storage formats (NF4)."""

from .nf4 import NF4Weight

__all__ = ["NF4Weight"]
