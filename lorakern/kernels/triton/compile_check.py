"""Compile every Triton kernel for sm_80 / sm_90 without a GPU: ``python -m lorakern.kernels.triton.compile_check``.

triton compiles to a cubin with its bundled ptxas and needs no driver, so a
machine without a GPU can still catch type errors, unsupported constructs and
configs whose shared memory exceeds the architecture's limit (which autotuning
would silently skip, or which would fail at launch with autotuning off). Each
line reports the kernel variant, the config, the shared memory used and whether
it fits. Exit status 1 if a default config (the one used with autotuning off)
fails, or with ``--all-configs`` if any config fails to compile at all.

``--sass`` adds what the machine code of each variant looks like: registers, spill
instructions (LDL/STL), and the instructions of the main loop (the loop with the most
tensor-core instructions) by opcode, read with the nvdisasm that ships with triton.

Run it with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _launch, dropout, gemv, matmul, nf4

# Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
_FLOAT_PTRS = {"x_ptr", "w_ptr", "bias_ptr", "xa_ptr", "b_ptr", "y_ptr", "dy_ptr", "g_ptr", "a_ptr", "dx_ptr", "p_ptr",
               "q_ptr", "c_ptr", "out_ptr"}
_FP32_PTRS = {"nested_absmax_ptr", "nested_code_ptr", "code_ptr", "offset_ptr"}
_I64_SCALARS = {"threshold", "numel"}
_F32_SCALARS = {"scaling", "keep_scale"}
# What triton specializes at launch for contiguous operands of Llama-sized layers: unit
# strides become the constant 1, pointers and sizes/strides that are multiples of 16 carry
# a divisibility hint. Without these the loads cannot be vectorized or pipelined, and the
# shared memory reported would be that of an unpipelined kernel (a third of the real one).
_UNIT_STRIDES = {
    "_lora_fwd_kernel": {"stride_xk", "stride_wk", "stride_xar", "stride_br", "stride_yn"},
    "_lora_dx_kernel": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_dxk"},
    "_skinny_kernel": {"stride_xk", "stride_wk", "stride_or"},
    "_tn_kernel": {"stride_pj", "stride_ql", "stride_cl"},
    "_nf4_gemv_kernel": {"stride_xk", "stride_xar", "stride_br", "stride_yn"},
}
_NO_HINT = {"threshold", "scaling", "keep_scale"}


def _signature(fn, constexprs: dict, dtype: str, nf4_weight: bool) -> dict:
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr or name in constexprs:
            sig[name] = "constexpr"
        elif name in ("packed_ptr", "absmax_ptr") or (name == "w_ptr" and nf4_weight):
            sig[name] = "*u8"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name in _FP32_PTRS:
            sig[name] = "*fp32"
        elif name in _FLOAT_PTRS:
            sig[name] = f"*{dtype}"
        elif name in _F32_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in _I64_SCALARS else "i32"
    return sig


def compile_kernel(fn, arch: int, constexprs: dict, config: triton.Config | None, dtype: str = "bf16",
                   nf4_weight: bool = False):
    """Compile ``fn`` for sm_``arch``; returns the compiled kernel (``.metadata.shared`` in bytes)."""
    consts = dict(constexprs)
    consts.update({name: 1 for name in _UNIT_STRIDES.get(fn.__name__, ())})
    options = {}
    if config is not None:
        consts.update(config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    signature = _signature(fn, consts, dtype, nf4_weight)
    unspecialized = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize} | _NO_HINT
    aligned = [name for name, ty in signature.items() if ty != "constexpr" and name not in unspecialized]
    return triton.compile(_source(fn, signature, consts, aligned), target=GPUTarget("cuda", arch, 32), options=options)


def _source(fn, signature: dict, consts: dict, aligned: list) -> ASTSource:
    """The ASTSource of ``fn`` with ``consts`` folded in and ``aligned`` arguments hinted divisible by 16."""
    index = fn.arg_names.index
    if "constexprs" in inspect.signature(ASTSource).parameters:  # triton >= 3.3
        return ASTSource(fn=fn, signature=signature, constexprs={(index(k),): v for k, v in consts.items()},
                         attrs={(index(name),): [["tt.divisibility", 16]] for name in aligned})
    from triton.compiler.compiler import AttrsDescriptor

    if not hasattr(AttrsDescriptor(), "divisible_by_16"):
        raise RuntimeError(f"compile_check supports triton 3.0 and >= 3.3; this is triton {triton.__version__}")
    # triton 3.0 (torch 2.4's): non-constexpr arguments only in the signature, constants by name,
    # the specialisation (divisible by 16, equal to 1) as argument indices.
    ones = {index(k) for k, v in consts.items() if v == 1 and not fn.params[index(k)].is_constexpr}
    return ASTSource(fn=fn, signature={k: v for k, v in signature.items() if v != "constexpr"}, constants=consts,
                     attrs=AttrsDescriptor(divisible_by_16={index(name) for name in aligned}, equal_to_1=ones))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_MMA = ("HMMA", "HGMMA")


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_stats(kernel) -> dict:
    """Registers, spill instructions and the main loop's opcode counts of a compiled kernel.

    The main loop is the loop (a backward branch) holding the most HMMA/HGMMA instructions;
    opcodes are counted without modifiers (``LDG.E.128`` counts as ``LDG``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    labels, pending, code = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.search(line)
        if m:
            addr = int(m.group(1), 16)
            labels.update({name: addr for name in pending})
            pending = []
            code.append((addr, m.group(2).split(".")[0], m.group(3)))
    loops = []
    for addr, op, args in code:
        target = re.search(r"(\.L_x_\d+)", args) if op == "BRA" else None
        if target and labels.get(target.group(1), addr + 1) <= addr:
            body = collections.Counter(o for a, o, _ in code if labels[target.group(1)] <= a <= addr)
            loops.append(body)
    every = collections.Counter(op for _, op, _ in code)
    main = max(loops, key=lambda c: (sum(c[o] for o in _MMA), sum(c.values())), default=collections.Counter())
    return dict(regs=regs, stack=stack, ldl=every["LDL"], stl=every["STL"], shared=kernel.metadata.shared,
                loop=main, loop_instructions=sum(main.values()))


def _sass_summary(stats: dict) -> str:
    top = ", ".join(f"{op} {n}" for op, n in stats["loop"].most_common(12))
    return (f"regs {stats['regs']}, stack {stats['stack']} B, LDL/STL {stats['ldl']}/{stats['stl']}; "
            f"main loop {stats['loop_instructions']} instructions: {top}")


def _variants():
    """(name, kernel, constexprs, config-list name, nf4 weight) for every kernel family."""
    gemm = dict(DOUBLE_QUANT=True, NF4_BLOCKSIZE=64, UPCAST_DOT=False, DOT_PRECISION="tf32", BLOCK_R=16)
    for w_nf4 in (False, True):
        tag = "nf4" if w_nf4 else "dense"
        tiles = "gemm_nf4" if w_nf4 else "gemm"
        yield (f"lora_fwd[{tag}]", matmul._lora_fwd_kernel,
               dict(gemm, W_NF4=w_nf4, NF4_ALIGNED=w_nf4, HAS_BIAS=True, HAS_LORA=True), tiles, w_nf4)
        yield (f"lora_dx[{tag}]", matmul._lora_dx_kernel,
               dict(gemm, W_NF4=w_nf4, NF4_ALIGNED=w_nf4, HAS_LORA=True, HAS_DROPOUT=True), tiles, w_nf4)
    yield ("lora_fwd[nf4,unaligned K]", matmul._lora_fwd_kernel,
           dict(gemm, W_NF4=True, NF4_ALIGNED=False, HAS_BIAS=False, HAS_LORA=True), "gemm_unpipelined", True)
    yield ("lora_dx[nf4,unaligned K]", matmul._lora_dx_kernel,
           dict(gemm, W_NF4=True, NF4_ALIGNED=False, HAS_LORA=True, HAS_DROPOUT=False), "gemm_unpipelined", True)
    flags = dict(UPCAST_DOT=False, DOT_PRECISION="tf32", BLOCK_R=16)
    yield ("skinny[dropout]", matmul._skinny_kernel, dict(flags, HAS_DROPOUT=True), "skinny", False)
    yield ("tn[dropout]", matmul._tn_kernel, dict(HAS_DROPOUT=True, UPCAST_DOT=False, DOT_PRECISION="tf32"), "tn", False)
    for block_m in (1, 16):
        yield (f"nf4_gemv[M<={block_m}]", gemv._nf4_gemv_kernel,
               dict(DOUBLE_QUANT=True, NF4_BLOCKSIZE=64, NF4_ALIGNED=True, HAS_BIAS=True, HAS_LORA=True,
                    UPCAST_DOT=False, DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_R=16), "gemv", True)
    yield ("nf4_dequantize", nf4._nf4_dequantize_kernel,
           dict(BLOCKSIZE=64, DOUBLE_QUANT=True, BLOCK=nf4.DEQUANT_BYTES_PER_PROGRAM), None, True)
    yield ("dropout_add", dropout._dropout_add_kernel, dict(BLOCK=dropout._BLOCK), None, False)


def _configs(kind: str | None, arch: int, all_configs: bool) -> list:
    if kind is None:
        return [None]
    tiles = {
        "gemm": [_launch._cfg(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8) for m, n, k, w, s in _launch._GEMM_TILES[arch]],
        "gemm_nf4": [_launch._cfg(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
                     for m, n, k, w, s in _launch._NF4_GEMM_TILES[arch]],
        "gemm_unpipelined": [_launch._cfg(w, 1, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
                             for m, n, k, w, s in _launch._NF4_GEMM_TILES[arch]],
        "gemv": [_launch._cfg(w, 2, BLOCK_N=n, BLOCK_K=k) for n, k, w in _launch._GEMV_TILES],
        "tn": [_launch._cfg(w, s, BLOCK_J=j, BLOCK_L=l, BLOCK_M=m) for j, l, m, w, s in _launch._TN_TILES],
        "skinny": [_launch._cfg(w, s, BLOCK_M=m, BLOCK_K=k) for m, k, w, s in _launch._SKINNY_TILES],
    }[kind]
    return tiles if all_configs else tiles[:1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the defaults")
    parser.add_argument("--only", default="", help="check only the kernel variants whose name contains this")
    parser.add_argument("--sass", action="store_true", help="registers, spills and main-loop instruction counts")
    args = parser.parse_args(argv)
    if _launch.interpreting():
        print("TRITON_INTERPRET=1: kernels are interpreted and cannot be compiled; unset it", file=sys.stderr)
        return 2
    failed = 0
    for arch in args.arch:
        for name, fn, constexprs, kind, nf4_weight in _variants():
            if args.only not in name:
                continue
            for default_index, config in enumerate(_configs(kind, arch, args.all_configs)):
                for dtype in args.dtype:
                    start = time.perf_counter()
                    label = f"sm_{arch} {name:<26} {dtype:<4} {config.all_kwargs() if config else '-'}"
                    try:
                        kernel = compile_kernel(fn, arch, constexprs, config, dtype, nf4_weight)
                        shared = kernel.metadata.shared
                    except Exception as e:  # report every failing variant, then exit non-zero
                        print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}", flush=True)
                        failed += 1
                        continue
                    fits = shared <= SHARED_LIMIT[arch]
                    # A config over the shared-memory limit is only an error when it is the default.
                    if not fits and default_index == 0:
                        failed += 1
                    status = "ok  " if fits else ("FAIL" if default_index == 0 else "skip")
                    print(f"{status} {label}: shared {shared} B, {time.perf_counter() - start:.1f}s", flush=True)
                    if args.sass:
                        print(f"     {_sass_summary(sass_stats(kernel))}", flush=True)
    print(f"{failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
