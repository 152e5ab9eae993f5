"""The NF4 format: code table, packing, double quantization, bitsandbytes state dicts.

Layout (bit-compatible with bitsandbytes' ``quant_type="nf4"``):

* the weight is flattened row-major and cut into blocks of ``blocksize`` (64)
  consecutive values; each block keeps its absolute maximum (fp32);
* each value maps to the nearest of the 16 NF4 codes of ``value / absmax``;
  two codes per byte, the FIRST value in the HIGH nibble;
* double quantization (default): ``offset = mean(absmax)`` and
  ``absmax - offset`` is itself quantized blockwise (256 per block) to uint8
  codes of bitsandbytes' signed 8-bit dynamic map, one fp32 scale per block.
  About 4.127 bits per weight.

Decoding one weight ``i``::

    a = absmax[i // bs]                                   # no double quant
    a = dynamic_map[absmax[b]] * nested_absmax[b // 256] + offset   # double quant, b = i // bs
    w = NF4_CODE[nibble(i)] * a

This module holds the format only: pure torch, any device. The kernels that
decode it live in ``lorakern.kernels`` and take an :class:`NF4Weight`.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "dynamic_map",
    "quantize",
    "dequantize",
    "decode_absmax",
    "to_bnb_state_dict",
    "from_bnb_state_dict",
    "QUANT_STATE_KEY",
]

# The 16 NF4 values (quantiles of N(0, 1) normalised to [-1, 1]), index 0..15.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_CODE = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4Weight(NamedTuple):
    """An NF4-quantized tensor: the packed codes and everything needed to decode them.

    packed:        uint8 ``[ceil(numel / 2)]``, first value in the high nibble.
    absmax:        uint8 ``[nblocks]`` (double quant) or float32 ``[nblocks]``.
    nested_absmax: float32 ``[ceil(nblocks / 256)]``; empty without double quant.
    nested_code:   float32 ``[256]`` dynamic map; empty without double quant.
    offset:        float32 ``[1]``; zero without double quant.
    shape:         the original shape (``(N, K)`` for a linear weight).
    blocksize:     values per absmax block (64 by default).
    dtype:         the dtype the weight had before quantization (dequantize default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor
    nested_code: torch.Tensor
    offset: torch.Tensor
    shape: tuple
    blocksize: int = 64
    dtype: torch.dtype = torch.float32

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The five tensors, in the order the ops take them."""
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset)

    def to(self, device) -> "NF4Weight":
        return self._replace(**{f: getattr(self, f).to(device) for f in ("packed", "absmax", "nested_absmax", "nested_code", "offset")})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class CheckedNF4Weight(NF4Weight):
    """An :class:`NF4Weight` that :func:`validate` accepted within the current op call.

    ``lorakern.ops`` validates every weight it is given, then hands it to the
    backend as this type so the backend's own :func:`validate` (kept for direct
    calls) does not run a second time on the same tuple. Made only right after
    validating and dropped when the call returns: autograd keeps the plain
    weight for backward, which is validated again there, so nothing that
    happens to its tensors between two calls (``resize_``, ``.data =``, a
    storage swap) can slip past a check. Editing it (``_replace``, ``to``)
    gives a plain, unchecked :class:`NF4Weight`.
    """

    __slots__ = ()

    def _replace(self, **changes) -> NF4Weight:
        return NF4Weight(*self)._replace(**changes)


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted float32 values).

    Construction: for exponent e = 0..6, 2**e + 1 float32 points evenly spaced on
    [0.1, 1]; the midpoints of neighbouring points scaled by 10**(e - 6), with
    both signs (254 values); plus 0 and 1; sorted.
    """
    values: list[float] = []
    for e in range(7):
        pts = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (pts[:-1] + pts[1:]) / 2.0
        scale = 10.0 ** (e - 6)  # applied in float32, as bitsandbytes does
        values += (mids * scale).tolist() + (mids * -scale).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _is_int(v) -> bool:
    """A Python (or symbolic, under torch.compile) int; bool is not one here (True would read as 1)."""
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not _is_int(blocksize) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")


def quantize_options(blocksize, double_quant) -> tuple[int, bool]:
    """``(blocksize, double_quant)`` of a quantize call, checked, as a Python int and bool.

    NumPy integers (hyperparameters read from arrays) are accepted; a double_quant
    that is not a boolean ("no", 2) is refused rather than read as true.
    """
    if isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, (bool, torch.SymInt)):
        blocksize = int(blocksize)
    _check_blocksize(blocksize)
    if not isinstance(double_quant, (bool, numbers.Integral, np.bool_)) or double_quant not in (True, False):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    return blocksize, bool(double_quant)


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax per block and the values scaled into [-1, 1], as bitsandbytes computes them.

    Full blocks multiply by ``1 / absmax``; a trailing partial block divides by
    its absmax. The asymmetry is bitsandbytes' and is kept for bit-exactness.
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code``: above a midpoint goes up."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization with a sorted code table (the nested absmax).

    Same arithmetic as bitsandbytes' CUDA and portable kernels: multiply by
    ``1 / absmax``, nearest code. (bitsandbytes' AVX-512 CPU kernel uses an
    approximate reciprocal and picks the neighbouring code for about 0.2% of
    values near a midpoint; both decode within one code step.)
    """
    flat = x.reshape(-1).float()
    _, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    # the stored absmax is the raw block maximum (an all-zero block stores 0, not the clamp)
    nblocks = -(-flat.numel() // blocksize)
    absmax = torch.nn.functional.pad(flat.abs(), (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize).amax(1)
    idx = _nearest_code(scaled, code)
    # an all-zero block decodes to 0 whatever its codes; store index 0 there, as bitsandbytes does
    idx = torch.where(absmax.repeat_interleave(blocksize)[: idx.numel()] == 0, torch.zeros_like(idx), idx)
    return idx, absmax


def _empty_f32(device) -> torch.Tensor:
    # a fresh tensor per field: the ops must never return two aliases of one tensor
    return torch.empty(0, dtype=torch.float32, device=device)


def check_weight_for_quantize(w: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 to quantize, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}): nothing to quantize")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} has {bad} NaN/inf value(s); NF4 cannot represent them")


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize any float tensor to NF4 (pure torch; bit-exact with bitsandbytes)."""
    check_weight_for_quantize(w, "weight")
    blocksize, double_quant = quantize_options(blocksize, double_quant)
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = _nearest_code(scaled, NF4_CODE.to(w.device))
    packed = (idx[0::2] << 4) | idx[1::2]
    return assemble(packed, absmax, tuple(w.shape), blocksize, w.dtype, double_quant)


def assemble(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple, blocksize: int, dtype: torch.dtype,
             double_quant: bool) -> NF4Weight:
    """The :class:`NF4Weight` of packed codes and their fp32 block absmax, double-quantizing the absmax if asked.

    Shared by every backend's quantizer: the double quant is O(numel / 64) torch work,
    and doing it with these exact ops keeps every backend bit-identical.
    """
    dev = packed.device
    if double_quant:
        offset = absmax.mean()
        # float32 mean, as bitsandbytes computes it: it overflows once the block maxima sum past
        # 3.4e38 (three blocks of 2e38, or 2.6e5 blocks of 1.3e33), and every weight would decode to inf
        if dev.type != "meta" and not bool(torch.isfinite(offset)):
            raise ValueError(f"cannot double-quantize: the mean of the {absmax.numel()} block absmax values overflows "
                             f"float32 (largest {absmax.max().item():.3g}); quantize with double_quant=False")
        code = dynamic_map(dev)
        qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
        return NF4Weight(packed, qabsmax, nested_absmax, code, offset.reshape(1), shape, blocksize, dtype)
    return NF4Weight(packed, absmax, _empty_f32(dev), _empty_f32(dev), torch.zeros(1, device=dev), shape, blocksize, dtype)


def decode_absmax(q: NF4Weight) -> torch.Tensor:
    """The fp32 absmax of every block (double quant decoded)."""
    validate(q, "q")
    return _decode_absmax(q)


def _decode_absmax(q: NF4Weight) -> torch.Tensor:
    if not q.double_quant:
        return q.absmax.float()
    scale = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: q.absmax.numel()]
    return q.nested_code[q.absmax.long()] * scale + q.offset


def dequantize(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode to a dense tensor of ``q.shape`` (fp32 math, then cast to ``dtype``, a floating dtype)."""
    validate(q, "q")
    dtype = q.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    n = q.numel
    idx = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(q.device)[idx]
    absmax = _decode_absmax(q).repeat_interleave(q.blocksize)[:n]
    return (values * absmax).to(dtype).reshape(q.shape)


# --------------------------------------------------------------------------- state dicts


def to_bnb_state_dict(q: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes writes for a ``Linear4bit`` weight, keyed ``{prefix}...``."""
    validate(q, "q")  # an inconsistent q would be written silently and fail only when loaded
    out = {prefix: q.packed.reshape(-1, 1)}
    info = {
        "quant_type": "nf4",
        "blocksize": q.blocksize,
        "dtype": str(q.dtype).removeprefix("torch."),
        "shape": list(q.shape),
    }
    out[f"{prefix}.absmax"] = q.absmax
    # a copy per layer: the shared constant made every layer's entry one tensor, which safetensors
    # (save_pretrained) refuses to save ("shared tensors"), and handed callers the module's table
    out[f"{prefix}.quant_map"] = NF4_CODE.to(q.device, copy=True)
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = q.nested_absmax
        out[f"{prefix}.nested_quant_map"] = q.nested_code
        # a meta weight (no data) gets the keys with meta tensors, the blob sized for an offset of 0.0
        offset = 0.0 if q.offset.is_meta else float(q.offset.item())
        info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
    blob = list(json.dumps(info).encode("utf-8"))
    out[f"{prefix}.{QUANT_STATE_KEY}"] = (torch.empty(len(blob), dtype=torch.uint8, device="meta") if q.device.type == "meta"
                                           else torch.tensor(blob, dtype=torch.uint8))
    return out


class QuantStateError(ValueError):
    """A malformed or inconsistent NF4 quant state (checkpoint from an untrusted source)."""


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise QuantStateError(f"missing key {key!r} in the NF4 state dict")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise QuantStateError(f"{key!r} must be a tensor, got {type(t).__name__}")
    return t


_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def from_bnb_state_dict(sd: dict, prefix: str = "weight") -> NF4Weight:
    """Read an NF4 weight written by bitsandbytes (or :func:`to_bnb_state_dict`).

    Every size is checked against the shape the quant state declares, so a
    truncated or inconsistent checkpoint is a :class:`QuantStateError`, never an
    out-of-bounds read later in a kernel.
    """
    raw = _need(sd, f"{prefix}.{QUANT_STATE_KEY}")
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise QuantStateError(f"{prefix}.{QUANT_STATE_KEY} must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        info = json.loads(bytes(raw.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantStateError(f"{prefix}.{QUANT_STATE_KEY} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(info, dict):
        raise QuantStateError(f"{prefix}.{QUANT_STATE_KEY} must hold a JSON object")
    if info.get("quant_type") != "nf4":
        raise QuantStateError(f"{prefix}: quant_type must be 'nf4', got {info.get('quant_type')!r}")
    blocksize = info.get("blocksize")
    if not _is_int(blocksize) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise QuantStateError(f"{prefix}: blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    shape = info.get("shape")
    if not (isinstance(shape, list) and shape and all(_is_int(s) and s > 0 for s in shape)):
        raise QuantStateError(f"{prefix}: shape must be a list of positive integers, got {shape!r}")
    dtype = _DTYPE_NAMES.get(str(info.get("dtype", "float32")).removeprefix("torch."))
    if dtype is None:
        raise QuantStateError(f"{prefix}: dtype must be one of {list(_DTYPE_NAMES)}, got {info.get('dtype')!r}")
    numel = math.prod(shape)
    nblocks = -(-numel // blocksize)

    packed = _need(sd, prefix)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)  # bnb allows other quant_storage dtypes
    packed = packed.reshape(-1)
    if packed.numel() != (numel + 1) // 2:
        raise QuantStateError(f"{prefix}: {packed.numel()} packed bytes, expected {(numel + 1) // 2} for shape {shape}")
    quant_map = _need(sd, f"{prefix}.quant_map") if f"{prefix}.quant_map" in sd else None
    if quant_map is not None and not (quant_map.is_floating_point() and torch.equal(quant_map.float().cpu(), NF4_CODE)):
        raise QuantStateError(f"{prefix}.quant_map is not the NF4 code table")

    absmax = _need(sd, f"{prefix}.absmax")
    if absmax.dim() == 2 and len(shape) == 2 and absmax.shape == (shape[1] // blocksize, shape[0]) \
            and shape[1] % blocksize == 0:
        # bitsandbytes' CPU inference repacks a layer for its kernel, the absmax transposed to
        # [K / blocksize, N] (and rounded to bf16); its state_dict() restores the row-major block
        # order only with double quantization. Read row-major, the blocks were 41% off.
        absmax = absmax.t().float()
    elif absmax.dim() != 1:
        raise QuantStateError(f"{prefix}.absmax must be 1-D (one value per block), got shape {tuple(absmax.shape)}")
    absmax = absmax.reshape(-1)
    if absmax.numel() != nblocks:
        raise QuantStateError(f"{prefix}.absmax has {absmax.numel()} values, expected {nblocks}")
    dev = packed.device
    if f"{prefix}.nested_absmax" in sd:
        if absmax.dtype != torch.uint8:
            raise QuantStateError(f"{prefix}.absmax must be uint8 with double quantization, got {absmax.dtype}")
        nested = _need(sd, f"{prefix}.nested_absmax").reshape(-1)
        if not nested.is_floating_point():
            raise QuantStateError(f"{prefix}.nested_absmax must be floating point, got {nested.dtype}")
        nested = nested.float()
        nested_bs = info.get("nested_blocksize", NESTED_BLOCKSIZE)
        if nested_bs != NESTED_BLOCKSIZE:
            raise QuantStateError(f"{prefix}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {nested_bs!r}")
        if nested.numel() != -(-nblocks // NESTED_BLOCKSIZE):
            raise QuantStateError(f"{prefix}.nested_absmax has {nested.numel()} values, expected {-(-nblocks // NESTED_BLOCKSIZE)}")
        code = _need(sd, f"{prefix}.nested_quant_map").reshape(-1)
        if not code.is_floating_point():
            raise QuantStateError(f"{prefix}.nested_quant_map must be floating point, got {code.dtype}")
        code = code.float()
        if code.numel() != 256:
            raise QuantStateError(f"{prefix}.nested_quant_map must have 256 values, got {code.numel()}")
        offset = info.get("nested_offset")
        if not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise QuantStateError(f"{prefix}: nested_offset must be a finite number, got {offset!r}")
        offset_t = torch.tensor([float(offset)], dtype=torch.float32, device=dev)
        return NF4Weight(packed, absmax.to(dev), nested.to(dev), code.to(dev), offset_t, tuple(shape), blocksize, dtype)
    if not absmax.is_floating_point():
        raise QuantStateError(f"{prefix}.absmax must be float32 without double quantization, got {absmax.dtype}")
    return NF4Weight(packed, absmax.float().to(dev), _empty_f32(dev), _empty_f32(dev), torch.zeros(1, device=dev), tuple(shape), blocksize, dtype)


_TENSOR_FIELDS = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


def _is_shape(shape) -> bool:
    """A tuple / list / torch.Size of positive ints (bool is no int here)."""
    if not isinstance(shape, (tuple, list, torch.Size)):
        return False
    for s in shape:
        if type(s) is int:  # the common case, without _is_int's call
            if s <= 0:
                return False
        elif not (_is_int(s) and s > 0):
            return False
    return True


def validate(q: NF4Weight, name: str = "qweight") -> None:
    """Check that the tensors of ``q`` are consistent with its shape (before any kernel reads them).

    Runs on every op call (the ops validate every weight they are given), so the
    checks read the fields once into locals: 2.4 us per call instead of 3.5 us
    (one core of the 2-core CI VM), in the same order and with the same messages.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"{name} must be an NF4Weight, got {type(q).__name__}")
    # Fields only, no properties: torch 2.4's dynamo cannot trace a NamedTuple's properties
    # (torch.compile(fullgraph=True) of a QLoRA layer validates its weight here).
    packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype = q
    Tensor = torch.Tensor
    if not (isinstance(packed, Tensor) and isinstance(absmax, Tensor) and isinstance(nested_absmax, Tensor)
            and isinstance(nested_code, Tensor) and isinstance(offset, Tensor)):
        for f in _TENSOR_FIELDS:
            if not isinstance(getattr(q, f), Tensor):
                raise TypeError(f"{name}.{f} must be a torch.Tensor, got {type(getattr(q, f)).__name__}")
    if not _is_shape(shape):
        raise ValueError(f"{name}.shape must be a tuple of positive ints, got {shape!r}")
    if type(blocksize) is not int or blocksize not in SUPPORTED_BLOCKSIZES:
        _check_blocksize(blocksize, f"{name}.blocksize")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name}.dtype (the dtype before quantization) must be a floating torch.dtype, got {dtype!r}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"{name}.packed must be a 1-D uint8 tensor, got {packed.dtype} "
                         f"with shape {tuple(packed.shape)}")
    numel = math.prod(shape)
    nblocks = -(-numel // blocksize)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{name}.packed has {packed.numel()} bytes, expected {(numel + 1) // 2} for shape {shape}")
    if absmax.numel() != nblocks:
        raise ValueError(f"{name}.absmax has {absmax.numel()} values, expected {nblocks}")
    if absmax.dtype == torch.uint8:  # double quantization
        want = -(-nblocks // NESTED_BLOCKSIZE)
        if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != want:
            raise ValueError(f"{name}.nested_absmax must be float32 with {want} values, "
                             f"got {nested_absmax.dtype} {nested_absmax.numel()}")
        if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
            raise ValueError(f"{name}.nested_code must be 256 float32 values")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"{name}.absmax must be uint8 (double quant) or float32, got {absmax.dtype}")
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError(f"{name}.offset must be a float32 tensor with one value")
    device = packed.device
    for f in _TENSOR_FIELDS[1:]:
        t = getattr(q, f)
        if t.numel() and t.device != device:
            raise ValueError(f"{name}.{f} is on {t.device} but {name}.packed is on {device}")
