"""Input validation at the op boundary: every bad input is a clear error naming the argument.

These run on every op call, so the checks a layer meets on each forward first
test that everything is in order in one expression and return; only a failing
input walks the checks one by one, in their documented order, to name the first
problem. (A QLoRA call's checks: 7.7 us walked one by one, 5.0 us so, on one
core of the 2-core CI VM; most of the rest is validating the NF4 weight.)
"""

from __future__ import annotations

import numbers

import torch

from ..formats import nf4 as _nf4
from ..formats.nf4 import NF4Weight

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(t, name: str, *, dim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d).removeprefix('torch.') for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to the same device")


def same_dtype(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; cast them to one dtype (or use autocast with the nn modules)")


def input_x(x, name: str = "x") -> None:
    tensor(x, name, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension [..., K], got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); the last dim K must be >= 1")


# The largest |scaling| the ops take, float32's largest value: the backends scale in float32
# (torch's addmm alpha, the kernels' fp32 accumulators), and 1e39 failed inside torch ("value
# cannot be converted to type float without overflow") on the cpu and composite backends.
# The comparisons below spell it as a literal: torch.compile(dynamic=True) traces a module-level
# float as a symbol, and a NaN scaling compared with a symbol fails while tracing, unnamed.
MAX_SCALING = torch.finfo(torch.float32).max  # == 3.4028234663852886e38


def scalars(scaling: float, dropout_p: float) -> None:
    # comparisons, not math.isfinite: torch.compile(dynamic=True) traces the floats as symbols
    if (type(scaling) is float and type(dropout_p) is float
            and -3.4028234663852886e38 <= scaling <= 3.4028234663852886e38 and 0.0 <= dropout_p < 1.0):
        return
    # numbers.Real admits NumPy scalars (hyperparameters read from arrays or configs); a
    # tensor is refused: it would need a device sync here, and the op schema takes a float.
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a real number (float), got {type(scaling).__name__}")
    if not -3.4028234663852886e38 <= scaling <= 3.4028234663852886e38:
        raise ValueError(f"scaling must be a finite number within float32's range (|scaling| <= {MAX_SCALING:.6g}), "
                         f"got {scaling!r}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a real number (float) in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def seed(s, x: torch.Tensor) -> None:
    tensor(s, "seed", dtypes=(torch.int64,))
    if s.numel() != 1:
        raise ValueError(f"seed must hold exactly one int64 value, got shape {tuple(s.shape)}")
    if s.device != x.device:
        raise ValueError(f"seed is on {s.device} but x is on {x.device}")


def bias(b, n: int, x: torch.Tensor) -> None:
    if b is None or (isinstance(b, torch.Tensor) and b.dim() == 1 and b.device == x.device and b.dtype == x.dtype
                     and b.shape[0] == n):
        return
    tensor(b, "bias", dim=1, device=x.device)
    same_dtype(b, "bias", x.dtype)
    if b.shape[0] != n:
        raise ValueError(f"bias must have shape [{n}] (out_features), got {tuple(b.shape)}")


def lora(lora_A, lora_B, n: int, k: int, x: torch.Tensor) -> None:
    if (isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor) and lora_A.dim() == 2
            and lora_B.dim() == 2 and lora_A.dtype == x.dtype and lora_B.dtype == x.dtype):
        device, (r, ka) = x.device, lora_A.shape
        if lora_A.device == device and lora_B.device == device and r >= 1 and ka == k and lora_B.shape == (n, r):
            return
    tensor(lora_A, "lora_A", dim=2, device=x.device)
    tensor(lora_B, "lora_B", dim=2, device=x.device)
    same_dtype(lora_A, "lora_A", x.dtype)
    same_dtype(lora_B, "lora_B", x.dtype)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, {k}] (K = in_features of x), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape [{n}, {r}] ([out_features, r]), got {tuple(lora_B.shape)}")


def dense_weight(weight, x: torch.Tensor) -> tuple[int, int]:
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == x.dtype and weight.device == x.device:
        n, k = weight.shape
        if x.shape[-1] == k:
            return n, k
    tensor(weight, "weight", dim=2, device=x.device)
    same_dtype(weight, "weight", x.dtype)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features (last dim) but weight expects K = {k} (weight shape [N, K] = {tuple(weight.shape)})")
    return n, k


def nf4_weight(q, x: torch.Tensor | None = None, name: str = "qweight") -> tuple[int, int]:
    _nf4.validate(q, name)
    if len(q.shape) != 2:
        raise ValueError(f"{name} must be a 2-D [N, K] weight, got shape {q.shape}")
    packed, absmax, nested_absmax, nested_code, offset = q.tensors()
    if not (packed.is_contiguous() and absmax.is_contiguous() and nested_absmax.is_contiguous()
            and nested_code.is_contiguous() and offset.is_contiguous()):
        for f in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
            if not getattr(q, f).is_contiguous():  # the native kernels index them as flat arrays
                raise ValueError(f"{name}.{f} must be contiguous")
    n, k = q.shape
    if x is not None:
        if q.packed.device != x.device:  # not q.device: torch 2.4's dynamo cannot trace NamedTuple properties
            raise ValueError(f"{name} is on {q.packed.device} but x is on {x.device}; move them to the same device")
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features (last dim) but {name} expects K = {k} ({name} shape [N, K] = {q.shape})")
    return n, k


def as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize) -> NF4Weight:
    return NF4Weight(packed, absmax, nested_absmax, nested_code, offset, tuple(shape), blocksize)
