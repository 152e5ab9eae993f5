"""The NF4 format: bit-compatibility with bitsandbytes, state dicts both ways, malformed input."""

import copy
import json
import math
import zlib

import pytest
import torch

from lorakern.formats import nf4
from lorakern.formats.nf4 import NF4Weight, QuantStateError

try:  # bitsandbytes is the NF4 oracle; the tests that need it skip without it
    import bitsandbytes.functional as bnb_F
except ImportError:  # pragma: no cover
    bnb_F = None

needs_bnb = pytest.mark.skipif(bnb_F is None, reason="bitsandbytes not installed")

# numel: 1 element, below/at/above one block, not a multiple of 64 or of 256 blocks, large
SHAPES = [(1,), (7, 3), (63,), (64,), (65,), (129, 33), (256 * 64 + 5,), (1000, 17), (512, 1024), (4096, 77)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

DESIGN_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * (0.02 + seed % 5)
    if seed % 3 == 0 and w.numel() > 70:
        w.view(-1)[64:128] = 0  # an all-zero block
    return w.to(dtype)


def test_code_table_is_the_documented_one():
    assert nf4.NF4_CODE.tolist() == pytest.approx(DESIGN_CODE, abs=0)
    assert nf4.NF4_CODE.dtype == torch.float32


@needs_bnb
def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), bnb_F.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_matches_bitsandbytes(shape, dtype, double_quant):
    w = _weight(shape, dtype, seed=zlib.crc32(repr((shape, dtype)).encode()) % 1000)
    q = nf4.quantize(w, 64, double_quant)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ"
    if not double_quant:
        assert torch.equal(q.absmax, state.absmax)
        return
    assert torch.equal(q.offset.reshape(()), state.offset.reshape(()))
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_code, state.state2.code)
    # The uint8 absmax codes: bitsandbytes' native CPU quantizer does not compute
    # the exact nearest code (its bucketed search with approximate arithmetic picks a
    # neighbour for values close to a midpoint, or near zero where the codes are
    # dense); its CUDA and portable kernels, and ours, take the exact nearest code.
    # So: nearly all codes identical, and ours never further from the true value.
    diff = q.absmax != state.absmax
    assert int(diff.sum()) <= 1 + 0.01 * diff.numel()
    # and ours is never further from the true value than bitsandbytes' choice
    raw = torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)[1] - state.offset
    scale = state.state2.absmax.repeat_interleave(256)[: raw.numel()]
    ours = (nf4.dynamic_map()[q.absmax.long()] * scale - raw).abs()
    theirs = (nf4.dynamic_map()[state.absmax.long()] * scale - raw).abs()
    assert bool((ours <= theirs + 1e-12).all())


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bnb_state_bit_exact(shape, dtype, double_quant):
    """Decoding a bitsandbytes-quantized weight gives bitsandbytes' values bit for bit.

    Both decode ``code * absmax`` in float32, then round to the weight's dtype.
    The float32 products must be identical, and ours rounded to nearest-even
    (torch's cast) must equal them cast the same way. bitsandbytes' own
    narrow-dtype output must then be identical too, except for one known defect
    (see :func:`_ties_rounded_away_from_zero`).
    """
    w = _weight(shape, dtype, seed=7)
    packed, state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    sd = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    q = nf4.from_bnb_state_dict(sd, "weight")
    assert q.shape == tuple(shape) and q.dtype == dtype
    ours = nf4.dequantize(q)
    state32 = copy.copy(state)
    state32.dtype = torch.float32
    theirs32 = bnb_F.dequantize_4bit(packed, state32).reshape(ours.shape)
    assert torch.equal(nf4.dequantize(q, torch.float32), theirs32), "float32 products differ"
    assert torch.equal(ours, theirs32.to(dtype)), "rounding to the weight's dtype differs"
    theirs = bnb_F.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype
    theirs = theirs.reshape(ours.shape)
    if torch.equal(ours, theirs):
        return
    ties = _ties_rounded_away_from_zero(theirs32, ours, theirs)
    diff = ours != theirs
    assert bool(ties[diff].all()), f"{int(diff.sum())} values differ, {int((diff & ~ties).sum())} not at a tie"
    pytest.xfail(f"bitsandbytes' CPU {dtype} decode rounds exact float32 ties away from zero, not to even, in "
                 f"{int(diff.sum())} of {diff.numel()} values (the CPU code inside its CUDA-build library, loaded "
                 f"whenever torch sees a GPU); ours rounds to nearest-even like torch and its CPU-only library")


def _ties_rounded_away_from_zero(exact: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Where ``exact`` (float32) lies exactly halfway between ``ours`` and ``theirs`` and ``theirs`` is farther from 0.

    bitsandbytes 0.50.2's CUDA-build library compiles its CPU float16 decode
    with a software float-to-half conversion that adds half an ulp and
    truncates: an exact tie (low 13 mantissa bits 0x1000, about 1 value in 8192
    times 1/2 for an even neighbour) goes away from zero, where IEEE
    round-to-nearest-even keeps the even neighbour. Its CPU-only library
    converts with vcvtps2ph (round to nearest-even) and matches ours exactly.
    """
    e, a, b = exact.double(), ours.double(), theirs.double()
    return (a != b) & ((e - a).abs() == (b - e).abs()) & (b.abs() > a.abs())


def test_tie_detection_accepts_only_ties_rounded_away_from_zero():
    # float16 spacing at 2 is 2^-9; 2 + 2^-10 is a tie between 2 (even) and 2 + 2^-9 (odd)
    # 2 + 3 * 2^-10 is a tie between 2 + 2^-9 (odd) and 2 + 2^-8 (even): nearest-even goes away from 0
    exact = torch.tensor([2 + 2**-10, -(2 + 2**-10), 2 + 2**-11, 2 + 3 * 2**-10, 2.0])
    ours = exact.half()
    assert ours.tolist() == [2.0, -2.0, 2.0, 2 + 2**-8, 2.0]
    theirs = torch.tensor([2 + 2**-9, -(2 + 2**-9), 2 + 2**-9, 2 + 2**-9, 2.0], dtype=torch.float16)
    # tie away from 0 (both signs) | not a tie | tie, but toward 0 | equal
    assert _ties_rounded_away_from_zero(exact, ours, theirs).tolist() == [True, True, False, False, False]


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip_with_bitsandbytes_linear4bit(double_quant):
    bnb_nn = pytest.importorskip("bitsandbytes.nn")
    torch.manual_seed(0)
    w = torch.randn(72, 136)
    q = nf4.quantize(w, 64, double_quant)
    sd = nf4.to_bnb_state_dict(q, "weight")
    # ours -> bitsandbytes
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}
    layer = bnb_nn.Linear4bit(136, 72, bias=False, quant_type="nf4", compress_statistics=double_quant)
    layer.weight = bnb_nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu")
    x = torch.randn(5, 136)
    ref = x @ nf4.dequantize(q, torch.float32).t()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # bitsandbytes -> ours
    back = nf4.from_bnb_state_dict(layer.state_dict(), "weight")
    assert torch.equal(back.packed, q.packed)
    assert torch.equal(back.absmax, q.absmax)
    assert torch.equal(nf4.dequantize(back), nf4.dequantize(q))


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    torch.manual_seed(1)
    q = nf4.quantize(torch.randn(40, 65).bfloat16(), 64, double_quant)
    sd = nf4.to_bnb_state_dict(q, "layer.weight")
    info = json.loads(bytes(sd[f"layer.weight.{nf4.QUANT_STATE_KEY}"].tolist()).decode())
    assert info["shape"] == [40, 65] and info["blocksize"] == 64 and info["dtype"] == "bfloat16"
    back = nf4.from_bnb_state_dict(sd, "layer.weight")
    assert back.shape == q.shape and back.dtype == q.dtype and back.blocksize == 64
    for a, b in zip(back.tensors(), q.tensors()):
        assert torch.equal(a, b)


def test_quality_sqnr():
    """NF4 on Gaussian weights keeps about 20 dB of signal (4 bits, blocks of 64)."""
    w = torch.randn(256, 512)
    err = nf4.dequantize(nf4.quantize(w)) - w
    sqnr = 10 * math.log10(float(w.pow(2).mean() / err.pow(2).mean()))
    assert 18.0 < sqnr < 25.0, sqnr


def test_every_code_round_trips_exactly():
    """A block holding each code value times absmax decodes back to exactly those values."""
    code = nf4.NF4_CODE
    w = torch.cat([code, code.flip(0), code[torch.randperm(16)], code]).reshape(1, 64) * 3.0
    q = nf4.quantize(w, 64, double_quant=False)
    assert torch.equal(nf4.dequantize(q), w)


def test_bits_per_weight():
    q = nf4.quantize(torch.randn(1024, 1024))
    bits = 8 * q.nbytes() / q.numel
    assert 4.12 < bits < 4.14, bits


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_quantize_rejects_non_finite(value):
    w = torch.randn(8, 64)
    w[3, 5] = value
    with pytest.raises(ValueError, match="weight has 1 NaN/inf"):
        nf4.quantize(w)


def test_quantize_rejects_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.empty(0, 4))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        nf4.quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4.quantize(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize([1.0, 2.0])


def _good_sd():
    return nf4.to_bnb_state_dict(nf4.quantize(torch.randn(10, 70)), "w")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda sd: sd.pop("w.absmax"), "missing key 'w.absmax'"),
        (lambda sd: sd.__setitem__("w", sd["w"][:-1]), "packed bytes, expected 350"),
        (lambda sd: sd.__setitem__("w.absmax", sd["w.absmax"][:-1]), "absmax has 10 values, expected 11"),
        (lambda sd: sd.__setitem__("w.nested_absmax", torch.ones(3)), "nested_absmax has 3 values"),
        (lambda sd: sd.__setitem__("w.nested_quant_map", torch.ones(255)), "256 values"),
        (lambda sd: sd.__setitem__("w.quant_map", torch.zeros(16)), "not the NF4 code table"),
        (lambda sd: sd.__setitem__("w." + nf4.QUANT_STATE_KEY, torch.tensor([255, 0, 1], dtype=torch.uint8)), "not valid UTF-8 JSON"),
        (lambda sd: sd.__setitem__("w." + nf4.QUANT_STATE_KEY, torch.tensor(list(b"[1,2]"), dtype=torch.uint8)), "JSON object"),
        (lambda sd: _edit_info(sd, quant_type="fp4"), "quant_type must be 'nf4'"),
        (lambda sd: _edit_info(sd, blocksize=48), "blocksize must be one of"),
        (lambda sd: _edit_info(sd, shape=[10, -70]), "shape must be a list of positive integers"),
        (lambda sd: _edit_info(sd, shape=[10, 71]), "packed bytes, expected 355"),
        (lambda sd: _edit_info(sd, nested_offset=float("nan")), "nested_offset must be a finite number"),
        (lambda sd: _edit_info(sd, dtype="int8"), "dtype must be one of"),
    ],
)
def test_malformed_state_dict_is_a_clear_error(mutate, match):
    sd = _good_sd()
    mutate(sd)
    with pytest.raises(QuantStateError, match=match):
        nf4.from_bnb_state_dict(sd, "w")


def _edit_info(sd, **changes):
    key = "w." + nf4.QUANT_STATE_KEY
    info = json.loads(bytes(sd[key].tolist()).decode())
    info.update(changes)
    sd[key] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)


def test_validate_catches_inconsistent_weight():
    q = nf4.quantize(torch.randn(8, 64))
    nf4.validate(q)
    with pytest.raises(ValueError, match="packed has 255 bytes, expected 256"):
        nf4.validate(q._replace(packed=q.packed[:-1]))
    with pytest.raises(ValueError, match="absmax has 7 values, expected 8"):
        nf4.validate(q._replace(absmax=q.absmax[:-1]))
    with pytest.raises(TypeError, match="must be an NF4Weight"):
        nf4.validate((q.packed,))
    assert isinstance(q, NF4Weight)
