"""The CUDA backend (csrc/cuda, lorakern.kernels.cuda).

Without a GPU:
* tests/host/nf4_host.cpp runs the ``__host__ __device__`` code of the kernels
  on the CPU (built with g++ under ASan/UBSan): NF4 codes and nibbles, absmax
  decode, mix32 / dropout, fp32 -> bf16 / fp16 rounding, and the dequantize,
  LoRA down-projection and GEMV kernel bodies under a loop emulation of the
  grid. Its outputs are compared here with lorakern.formats / lorakern.reference.
* every csrc/cuda/*.cu compiles for sm_80 and sm_90a with warnings and spills as
  errors (.ci/cuda_check.sh), when nvcc is present;
* the built module imports without a driver and its first call says why CUDA is unusable.

With a GPU (``pytest -m gpu``): the real kernels against the reference at model
shapes (4096 x 4096, 4096 x 14336) and odd ones.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakern.formats import nf4
from lorakern.reference import dropout as ref_dropout

ROOT = Path(__file__).resolve().parents[1]
HOST_SRC = ROOT / "tests" / "host" / "nf4_host.cpp"
INCLUDE = ROOT / "csrc" / "include"
HOST_FLAGS = ["-std=c++17", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# --------------------------------------------------------------------------- host program


def _host_sources_digest() -> str:
    h = hashlib.sha1(" ".join(HOST_FLAGS).encode())
    for p in [HOST_SRC, *sorted(INCLUDE.glob("lorakern/*.h"))]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def host_bin() -> Path:
    """tests/host/nf4_host.cpp built with sanitizers (cached in build/ by source hash)."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        pytest.skip("g++ not found: host tests of the CUDA kernel code need a C++17 compiler")
    out = ROOT / "build" / "host_tests" / _host_sources_digest() / "nf4_host"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        r = subprocess.run([gxx, *HOST_FLAGS, f"-I{INCLUDE}", str(HOST_SRC), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"building {HOST_SRC.name} failed:\n{r.stderr[-4000:]}")
        tmp.rename(out)
    return out


def run_host(binary: Path, cmd: str, d: Path, *args) -> None:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = subprocess.run([str(binary), cmd, str(d), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"nf4_host {cmd} {args} exited with {r.returncode}:\n{r.stderr[-4000:]}"


def write(d: Path, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tofile(d / name)


def read(d: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    np_dtype = {torch.uint8: np.uint8, torch.int32: np.int32, torch.int16: np.int16, torch.float32: np.float32}
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(np.fromfile(d / name, dtype=np.int16)).view(dtype)
    return torch.from_numpy(np.fromfile(d / name, dtype=np_dtype[dtype]))


def write_weight(d: Path, q: nf4.NF4Weight) -> None:
    write(d, "packed.u8", q.packed)
    if q.double_quant:
        write(d, "absmax.u8", q.absmax)
        write(d, "nested.f32", q.nested_absmax)
        write(d, "code.f32", q.nested_code)
        write(d, "offset.f32", q.offset)
    else:
        write(d, "absmax.f32", q.absmax)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    g, w = got.view(INT_VIEW[got.dtype]), want.view(INT_VIEW[want.dtype])
    bad = (g != w).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {g.numel()} elements differ; first at {bad[:5].tolist()}: "
                              f"got {got[bad[:5]].tolist()} want {want[bad[:5]].tolist()}")


# ----------------------------------------------------------------------- device math


def test_host_codes_match_the_nf4_table(host_bin, tmp_path):
    run_host(host_bin, "codes", tmp_path)
    assert_bits_equal(read(tmp_path, "codes.u32", torch.int32).view(torch.float32), nf4.NF4_CODE, "nf4_code")


def test_host_nibbles_of_every_byte(host_bin, tmp_path):
    # Every byte value, in an order where each 32-bit word mixes them.
    packed = torch.cat([torch.arange(256, dtype=torch.uint8), torch.randperm(256).to(torch.uint8)])
    write(tmp_path, "packed.u8", packed)
    run_host(host_bin, "nibbles", tmp_path)
    want = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)  # the format: first value in the high nibble
    assert torch.equal(read(tmp_path, "nib.u8", torch.uint8), want)
    assert torch.equal(read(tmp_path, "word_nib.u8", torch.uint8), want)


def test_host_absmax_decode_is_bit_exact(host_bin, tmp_path):
    # 1000 blocks: three full nested blocks of 256 and a partial one.
    q = nf4.quantize(torch.randn(1000 * 64) * torch.rand(1000).repeat_interleave(64) * 3, 64, True)
    write_weight(tmp_path, q)
    run_host(host_bin, "absmax", tmp_path, q.nblocks)
    assert_bits_equal(read(tmp_path, "absmax.f32", torch.float32), nf4.decode_absmax(q), "absmax")


def test_host_mix32_matches_reference(host_bin, tmp_path):
    edge = torch.tensor([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF], dtype=torch.int64)
    x = torch.cat([edge, torch.randint(0, 2**32, (5000,), dtype=torch.int64)])
    x.numpy().astype(np.uint32).tofile(tmp_path / "in.u32")
    run_host(host_bin, "mix32", tmp_path)
    got = read(tmp_path, "out.u32", torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, ref_dropout.mix32(x))


@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**31 - 1, -5, 2**40 + 7])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_host_dropout_mask_matches_reference(host_bin, tmp_path, seed, p):
    rows, cols = 7, 65
    run_host(host_bin, "dropout", tmp_path, seed, repr(p), rows, cols)
    want = ref_dropout.dropout_mask(torch.tensor([seed], dtype=torch.int64), rows, cols, p)
    got = read(tmp_path, "keep.u8", torch.uint8).reshape(rows, cols).bool()
    assert torch.equal(got, want), f"{int((got != want).sum())} of {rows * cols} mask bits differ"


def test_host_float_rounding_matches_torch(host_bin, tmp_path):
    # Random bit patterns (every exponent, subnormals, inf) plus rounding ties and fp16 edges.
    bits = torch.randint(-(2**31), 2**31, (200000,), dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08,
                          2.9802326e-08, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
                          float("inf"), -float("inf"), 3.4028235e38], dtype=torch.float32)
    x = torch.cat([bits.view(torch.float32), edges])
    x = x[~torch.isnan(x)]
    write(tmp_path, "in.f32", x)
    write(tmp_path, "h.u16", torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16))
    run_host(host_bin, "convert", tmp_path)
    assert_bits_equal(read(tmp_path, "bf16.u16", torch.bfloat16), x.to(torch.bfloat16), "float -> bfloat16")
    assert_bits_equal(read(tmp_path, "f16.u16", torch.float16), x.to(torch.float16), "float -> float16")
    halves = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    got, want = read(tmp_path, "h2f.f32", torch.float32), halves.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert_bits_equal(got[~nan], want[~nan], "float16 -> float")


# -------------------------------------------------------------------- emulated kernels


def _weight(numel: int, blocksize: int, double_quant: bool, device="cpu") -> nf4.NF4Weight:
    w = torch.randn(numel, device=device) * (1.0 + torch.rand(numel, device=device))
    return nf4.quantize(w, blocksize, double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel,blocksize,double_quant,shift_in,shift_out", [
    (1, 64, True, 0, 0),
    (63, 64, True, 0, 0),
    (65, 64, False, 0, 0),
    (8191, 64, True, 0, 0),          # one value short of a full 8192-value tile
    (8192 + 64 * 3 + 5, 64, True, 0, 0),
    (64 * 600 + 33, 64, True, 1, 3),  # misaligned packed bytes and output: the scalar paths
    (4096 * 5 + 17, 128, True, 0, 0),
    (4096 * 3, 4096, False, 0, 1),
])
def test_host_dequantize_kernel_is_bit_exact(host_bin, tmp_path, dtype, numel, blocksize, double_quant, shift_in, shift_out):
    q = _weight(numel, blocksize, double_quant)
    write_weight(tmp_path, q)
    run_host(host_bin, "dequant", tmp_path, numel, blocksize, int(double_quant), DTYPE_CODE[dtype], shift_in, shift_out)
    assert_bits_equal(read(tmp_path, "out.bin", dtype), nf4.dequantize(q, dtype).reshape(-1), "dequantize")


def test_host_dequantize_decodes_every_byte(host_bin, tmp_path):
    # Packed bytes need not come from quantize: every (high, low) nibble pair, many times.
    q = _weight(64 * 300, 64, True)
    q = q._replace(packed=torch.arange(q.packed.numel(), dtype=torch.int64).mul(7).remainder(256).to(torch.uint8))
    write_weight(tmp_path, q)
    run_host(host_bin, "dequant", tmp_path, q.numel, 64, 1, 0, 0, 0)
    assert_bits_equal(read(tmp_path, "out.bin", torch.float32), nf4.dequantize(q, torch.float32).reshape(-1), "dequantize")


# Relative error bound per dtype, applied to sum |terms|. fp32: ~80 ulp, the
# worst case of the kernels' summation (64-value block sums, up to ~10 block sums
# per lane at K = 14336, a 5-level lane tree). fp16 / bf16: 2 ulp, from rounding
# y, and xa before it meets B, to the dtype (accumulation is fp32).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _gemv_inputs(m, n, k, r, dtype, bias, blocksize=64, double_quant=True, device="cpu"):
    q = _weight(n * k, blocksize, double_quant, device)._replace(shape=(n, k))
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    lora_a = (torch.randn(r, k, device=device) / k**0.5).to(dtype) if r else None
    lora_b = torch.randn(n, r, device=device).to(dtype) if r else None
    return q, x, b, lora_a, lora_b


def _expected(q, x, bias, lora_a, lora_b, scaling, p, seed):
    """Reference (y, xa) in float64 from the dtype inputs, and error scales sum |terms| for each (on x's device)."""
    w = nf4.dequantize(q, torch.float64)
    xd = x.double()
    y, mag = xd @ w.t(), xd.abs() @ w.abs().t()
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    xa = xa_mag = None
    if lora_a is not None:
        xdrop = ref_dropout.apply_dropout(x, torch.tensor([seed], device=x.device), p).double()  # the mask, in x's dtype, as the reference
        xa, xa_mag = xdrop @ lora_a.double().t(), xdrop.abs() @ lora_a.double().abs().t()
        y = y + scaling * (xa @ lora_b.double().t())
        mag = mag + abs(scaling) * ((xa.abs() + xa_mag * TOL[x.dtype]) @ lora_b.double().abs().t())
    return y, mag, xa, xa_mag


def _assert_close(got, want, mag, dtype, what):
    err = (got.double() - want).abs()
    bound = TOL[dtype] * mag + 1e-30
    bad = (err > bound) | ~torch.isfinite(got.double())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {got.numel()} elements off; worst at "
                           f"{divmod(int((err / bound).argmax()), got.shape[-1])}: got {got.flatten()[(err / bound).argmax()].item()} "
                           f"want {want.flatten()[(err / bound).argmax()].item()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,r,bias,p,vec,blocksize,double_quant", [
    (1, 9, 4096, 16, True, 0.0, True, 64, True),
    (1, 33, 64, 0, False, 0.0, True, 64, True),
    (2, 17, 128, 5, True, 0.25, True, 64, True),
    (3, 5, 192, 8, False, 0.0, False, 64, True),   # K % 64 == 0 but the nibble-at-a-time path
    (4, 3, 320, 2, True, 0.0, True, 128, False),   # a 128-value absmax block spans rows
    (7, 13, 63, 4, True, 0.1, False, 64, True),    # odd K: rows start mid-byte
    (16, 6, 65, 33, True, 0.5, False, 256, True),
    (5, 7, 1088, 3, False, 0.0, True, 64, False),  # M -> the 16-row kernel, 17 blocks per row
    # x staged in shared memory (vec = 2): even and odd block counts (the padded stride), 1-16 rows
    (1, 9, 4096, 16, True, 0.0, 2, 64, True),
    (2, 17, 1088, 5, True, 0.25, 2, 64, True),
    (4, 3, 320, 2, True, 0.0, 2, 128, False),
    (11, 5, 128, 7, False, 0.5, 2, 64, True),
    (1, 3, 64, 0, False, 0.0, 2, 64, False),
])
def test_host_gemv_kernel_matches_reference(host_bin, tmp_path, dtype, m, n, k, r, bias, p, vec, blocksize, double_quant):
    q, x, b, lora_a, lora_b = _gemv_inputs(m, n, k, r, dtype, bias, blocksize, double_quant)
    scaling, seed = 0.75, 2024 + m
    write_weight(tmp_path, q)
    write(tmp_path, "x.bin", x)
    if b is not None:
        write(tmp_path, "bias.bin", b)
    if r:
        write(tmp_path, "lora_a.bin", lora_a)
        write(tmp_path, "lora_b.bin", lora_b)
    run_host(host_bin, "gemv", tmp_path, m, n, k, r, blocksize, int(double_quant), DTYPE_CODE[dtype], int(bias),
             repr(scaling), repr(p), seed, int(vec))
    y_want, mag, xa_want, xa_mag = _expected(q, x, b, lora_a, lora_b, scaling, p, seed)
    _assert_close(read(tmp_path, "y.bin", dtype).reshape(m, n), y_want, mag, dtype, "y")
    if r:
        _assert_close(read(tmp_path, "xa.bin", dtype).reshape(m, r), xa_want, xa_mag, dtype, "xa")


# ------------------------------------------------------------------------ CUDA build


def _nvcc() -> str | None:
    for c in (os.environ.get("LORAKERN_NVCC"), os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
              shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@pytest.mark.slow  # 50-90 s on the 2-core CI machine (user time ~23 s; 2 archs x 2 files + bindings)
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_cuda_sources_compile_without_warnings_or_spills():
    r = subprocess.run(["bash", str(ROOT / ".ci" / "cuda_check.sh"), "compile"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, f".ci/cuda_check.sh compile failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _built_module():
    try:
        from lorakern import _cuda
    except ImportError as e:
        pytest.skip(f"lorakern._cuda not built ({e})")
    return _cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA driver")
def test_module_imports_without_driver_and_first_call_says_why():
    _cuda = _built_module()
    with pytest.raises(RuntimeError, match="CUDA is not usable here: cudaGetDeviceCount"):
        _cuda.nf4_dequantize(packed=16, absmax=16, nested_absmax=16, nested_code=16, offset=16, double_quant=True,
                             numel=64, blocksize=64, out=16, out_dtype=0, device=0, stream=0)


def test_module_checks_arguments_before_touching_the_device():
    _cuda = _built_module()
    base = dict(packed=16, absmax=16, nested_absmax=16, nested_code=16, offset=16, double_quant=True, numel=64,
                blocksize=64, out=16, out_dtype=2, device=0, stream=0)
    for change, message in [(dict(blocksize=32), "blocksize must be a power of two in \\[64, 4096\\], got 32"),
                            (dict(numel=0), "numel must be positive"), (dict(out_dtype=5), "out_dtype must be a dtype code"),
                            (dict(nested_code=0), "nested_code is a null pointer"),
                            (dict(offset=18), "offset .* is not aligned to 4 bytes")]:
        with pytest.raises(ValueError, match=message):
            _cuda.nf4_dequantize(**{**base, **change})
    gemv = dict(x=16, x_dtype=2, m=1, n=4, k=64, packed=16, absmax=16, nested_absmax=16, nested_code=16, offset=16,
                double_quant=True, blocksize=64, bias=0, y=16, r=0, lora_a=0, lora_b=0, scaling=1.0, dropout_p=0.0,
                seed=0, xa_out=0, workspace=0, device=0, stream=0)
    for change, message in [(dict(m=17), "M \\(rows of x\\) must be in \\[1, 16\\], got 17"), (dict(m=0), "M \\(rows"),
                            (dict(r=300), "r \\(LoRA rank\\) must be in \\[0, 256\\]"),
                            (dict(r=4, lora_b=16, lora_a=16, seed=16, xa_out=16, workspace=16, dropout_p=1.0), "dropout_p"),
                            (dict(r=4, lora_b=16, seed=16, xa_out=16, workspace=16), "lora_a is a null pointer")]:
        with pytest.raises(ValueError, match=message):
            _cuda.nf4_gemv(**{**gemv, **change})
    assert _cuda.lora_workspace_floats(1, 4096, 16) > 0 and _cuda.lora_workspace_floats(4, 4096, 0) == 0


def test_scaling_zero_hands_the_gemv_a_zero_lora_B(monkeypatch):
    # No GPU needed: what the wrapper passes to the kernel launch. At scaling 0 (no LoRA term;
    # the wide-output path's "base GEMM and xa" call) the kernel must not read a B that may
    # hold inf (0 * inf = NaN), yet still write xa in the same launch.
    from lorakern.kernels import cuda as backend

    seen = []
    monkeypatch.setattr(backend, "_gemv", lambda x, q, bias, a, b, *rest: seen.append(b))
    q = nf4.quantize(torch.randn(40, 64))
    x, lora_a = torch.randn(2, 64), torch.randn(4, 64)
    lora_b = torch.full((40, 4), float("inf"))
    seed = torch.zeros(1, dtype=torch.int64)
    backend.qlora_linear_fwd(x, q, None, lora_a, lora_b, 0.0, 0.0, seed)
    backend.qlora_linear_fwd(x, q, None, lora_a, lora_b, 0.5, 0.0, seed)
    assert seen[0].shape == (40, 4) and not seen[0].any() and seen[1] is lora_b


def test_supports_declines_what_the_kernels_do_not_run():
    from lorakern.kernels import cuda as backend

    q = nf4.quantize(torch.randn(8, 64))
    assert "CUDA tensors" in backend.supports("nf4_dequantize", q, torch.bfloat16)
    ok, reason = backend.availability()
    assert ok == (backend._cuda is not None and torch.cuda.is_available()) and reason


# --------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_backend():
    from lorakern.kernels import cuda as backend

    ok, reason = backend.availability()
    if not ok:
        pytest.fail(f"CUDA backend unavailable on a GPU machine: {reason}")
    return backend


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN bytes in the blocks the caching allocator hands out next, so unwritten outputs show."""
    junk = torch.full((nbytes // 4 + 64,), float("nan"), device="cuda")
    del junk


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((4096, 4096), 64, True), ((4096, 14336), 64, True), ((14336, 4096), 64, False),
    ((1, 63), 64, True), ((33, 65), 64, False), ((4097, 17), 128, True), ((3, 5, 7), 64, True),
])
def test_gpu_dequantize_bit_exact(dtype, shape, blocksize, double_quant):
    backend = _cuda_backend()
    q = nf4.quantize(torch.randn(shape, device="cuda"), blocksize, double_quant)
    _poison_allocator(q.numel * dtype.itemsize)
    got = backend.nf4_dequantize(q, dtype)
    torch.cuda.synchronize()
    assert got.shape == torch.Size(shape) and got.dtype == dtype
    assert_bits_equal(got.reshape(-1).cpu(), nf4.dequantize(q, dtype).reshape(-1).cpu(), "dequantize")


@pytest.mark.gpu
@needs_gpu
def test_gpu_dequantize_misaligned_views():
    backend = _cuda_backend()
    q = nf4.quantize(torch.randn(1000, 72, device="cuda"))
    buf = torch.empty(q.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:] = q.packed
    q2 = q._replace(packed=buf[1:])  # starts one byte past an allocation: the byte-load path
    assert_bits_equal(backend.nf4_dequantize(q2, torch.bfloat16).reshape(-1).cpu(),
                      nf4.dequantize(q, torch.bfloat16).reshape(-1).cpu(), "dequantize (misaligned)")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,r,bias,p", [
    (1, 4096, 4096, 16, True, 0.0),
    (1, 4096, 14336, 16, False, 0.0),
    (1, 14336, 4096, 64, False, 0.1),
    (16, 4096, 4096, 8, True, 0.0),
    (7, 33, 65, 4, True, 0.5),
    (1, 129, 63, 1, False, 0.0),
    (3, 7, 4095, 256, True, 0.2),
    (5, 11, 64, 0, True, 0.0),
])
def test_gpu_gemv_matches_reference(dtype, m, n, k, r, bias, p):
    backend = _cuda_backend()
    torch.manual_seed(m * 1000 + n + k)
    # Inputs and the float64 reference on the GPU: at 4096 x 14336 the CPU would
    # spend seconds per case quantizing and dequantizing.
    q, x, b, lora_a, lora_b = _gemv_inputs(m, n, k, r, dtype, bias, device="cuda")
    seed = torch.tensor([77 + m], dtype=torch.int64, device="cuda")
    scaling = 0.5
    _poison_allocator((m * n + m * max(r, 1)) * dtype.itemsize)
    if r:
        y, xa = backend.qlora_linear_fwd(x, q, b, lora_a, lora_b, scaling, p, seed)
    else:
        y, xa = backend.nf4_matmul(x, q, b), None
    y_want, mag, xa_want, xa_mag = _expected(q, x, b, lora_a, lora_b, scaling, p, 77 + m)
    _assert_close(y, y_want, mag, dtype, "y")
    if r:
        _assert_close(xa, xa_want, xa_mag, dtype, "xa")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gpu_gemv_scaling_zero_adds_no_lora_term(p):
    # scaling 0 means no LoRA term on every backend (lorakern.reference): the kernel's
    # 0 * (xa B^T) would be NaN with a non-finite adapter.
    backend = _cuda_backend()
    q, x, b, lora_a, lora_b = _gemv_inputs(3, 72, 136, 8, torch.bfloat16, True, device="cuda")
    lora_b = torch.full_like(lora_b, float("inf"))
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    y, xa = backend.qlora_linear_fwd(x, q, b, lora_a, lora_b, 0.0, p, seed)
    assert torch.equal(y, backend.nf4_matmul(x, q, b))
    _, _, xa_want, xa_mag = _expected(q, x, b, lora_a, lora_b, 0.0, p, 5)  # xa still feeds backward
    _assert_close(xa, xa_want, xa_mag, torch.bfloat16, "xa")


@pytest.mark.gpu
@needs_gpu
def test_gpu_registry_picks_cuda_for_small_m_only():
    from lorakern.ops import _registry

    mod = _cuda_backend()
    q = nf4.quantize(torch.randn(64, 128, device="cuda"))
    x16, x17 = torch.randn(16, 128, device="cuda"), torch.randn(17, 128, device="cuda")
    assert mod.supports("nf4_matmul", x16, q, None) is None
    assert "1..16 rows" in mod.supports("nf4_matmul", x17, q, None)
    assert _registry.pick("nf4_matmul", "cuda", (x17, q, None)) is not mod
    # Within its capability, the automatic choice takes the GEMV only where it measured faster.
    x_fast = torch.randn(mod.GEMV_AUTO_MAX_M, 128, device="cuda")
    x_slow = torch.randn(mod.GEMV_AUTO_MAX_M + 1, 128, device="cuda")
    assert _registry.pick("nf4_matmul", "cuda", (x_fast, q, None)) is mod
    assert _registry.pick("nf4_matmul", "cuda", (x_slow, q, None)).NAME == "composite"
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        mod.nf4_matmul(x17, q, None)


@pytest.mark.gpu
@needs_gpu
def test_gpu_runs_on_torch_current_stream():
    backend = _cuda_backend()
    q = nf4.quantize(torch.randn(2048, 2048, device="cuda"))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = backend.nf4_dequantize(q, torch.float32)
    s.synchronize()
    assert_bits_equal(got.reshape(-1).cpu(), nf4.dequantize(q, torch.float32).reshape(-1).cpu(), "dequantize on a side stream")


@pytest.mark.gpu
@needs_gpu
def test_gpu_public_ops_run_the_cuda_kernels(monkeypatch):
    from lorakern import ops

    _cuda_backend()
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda")  # a forced backend raises instead of falling back
    q = nf4.quantize(torch.randn(96, 320, device="cuda"))
    assert_bits_equal(ops.nf4_dequantize(q, torch.bfloat16).reshape(-1).cpu(),
                      nf4.dequantize(q, torch.bfloat16).reshape(-1).cpu(), "ops.nf4_dequantize")
    x = torch.randn(2, 3, 320, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    lora_a = torch.randn(8, 320, device="cuda", dtype=torch.bfloat16) / 20
    lora_b = torch.randn(96, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # backward has no CUDA kernel; forcing the backend would make it raise
        y = ops.qlora_linear(x, q, bias, lora_a, lora_b, 2.0, 0.0)
    y_want, mag, _, _ = _expected(q.to("cpu"), x.reshape(6, 320).cpu(), bias.cpu(), lora_a.cpu(), lora_b.cpu(), 2.0, 0.0, 0)
    assert y.shape == (2, 3, 96)
    _assert_close(y.reshape(6, 96).cpu(), y_want, mag, torch.bfloat16, "ops.qlora_linear")
