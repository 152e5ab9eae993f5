"""Public lorakern ops: ``torch.library`` custom ops (namespace ``lorakern``) with autograd.

Each op checks its inputs (the same checks run in its fake implementation, so
``torch.compile`` sees them too), dispatches to a backend through
:mod:`lorakern.ops._registry`, and has its autograd written once here, above
dispatch. The gradient math is written out in :mod:`lorakern.reference`.

The ops compute in the dtype of their inputs whether autocast is on or not (the
nn modules apply autocast before calling them). Public functions (leading batch
dimensions of ``x`` are flattened and restored):

    nf4_quantize(weight, blocksize=64, double_quant=True) -> NF4Weight
    nf4_dequantize(q, dtype=None) -> Tensor of q.shape
    nf4_matmul(x [..., K], q (N, K), bias=None) -> [..., N]          grads: x, bias
    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> [..., N]
                                                                    grads: x, weight, bias, lora_A, lora_B
    qlora_linear(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed) -> [..., N]
                                                                    grads: x, bias, lora_A, lora_B
"""

# No ``from __future__ import annotations`` here: torch.library.custom_op infers each op's
# schema from its annotations, and torch < 2.5 rejects string annotations ('Tensor').
import contextlib
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from ..formats.nf4 import CheckedNF4Weight, NF4Weight
from . import _checks as check
from ._registry import BackendUnavailable, pick, status

__all__ = [
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_matmul",
    "lora_linear",
    "qlora_linear",
    "new_seed",
    "BackendUnavailable",
    "status",
]

_EMPTY_SHAPE = (0,)


def _none_to_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY_SHAPE) if t is None else t


def _empty_to_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 and t.dim() == 1 and t.shape[0] == 0 else t


def _device_type(t: Tensor) -> str:
    """``t.device.type`` without building a device and a string (0.3 us) for the two common types."""
    return "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type


def _autocast_on(device_type: str) -> bool:
    if device_type in ("cpu", "cuda"):
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _no_autocast(device_type: str):
    """A context that turns autocast off for ``device_type`` while a backend runs (a no-op when it is off).

    The ops compute in the dtype of their inputs, as their schemas (and fake
    implementations) promise; the nn modules apply autocast before calling them.
    Left on, autocast re-cast the GEMMs inside a backend: under CPU bf16 autocast
    with float32 inputs the cpu backend's ``y.addmm_(xa, lora_B.t())`` met a bf16
    ``xa`` and a float32 ``y`` (RuntimeError), and the reference backend returned
    float32 outputs with bf16 rounding (2.7e-3 relative error instead of 2e-7) and
    a bf16 ``xa`` where the schema says x's dtype.
    """
    return torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext()


def _call(op: str, device_type: str, args: tuple):
    """``op(*args)`` on the backend the registry picks, autocast off."""
    fn = getattr(pick(op, device_type, args), op)
    if _autocast_on(device_type):
        with torch.autocast(device_type, enabled=False):
            return fn(*args)
    return fn(*args)  # without entering a null context: ~0.4 us of every eager call


def _call_backward(op: str, device_type: str, args: tuple):
    """A backward op for the eager twins: the registry's backend, or the reference under ``create_graph=True``.

    The native backends write gradients through raw pointers and ``out=`` GEMMs that
    autograd cannot record, so a second derivative through them failed inside torch
    (``mm(): functions with out=... arguments don't support automatic differentiation``)
    or would miss terms. The reference formulas are plain torch ops, differentiable
    again. The saved ``xa = drop(x) A^T`` came from a backend outside autograd, so it is
    recomputed here on the graph: ``dB = s dy^T xa`` depends on x and lora_A, and with the
    saved tensor the second derivatives through it (d/dA of dL/dB: MAML-style meta-gradients,
    gradient penalties on the adapter) were silently missing. (Through the custom ops, as
    under torch.compile, double backward is an error naming ``lorakern::*_bwd``: those ops
    have no autograd formula.)

    ``args`` is laid out as ``(dy, x, xa, weight | q, lora_A, lora_B, scaling, dropout_p, seed, ...)``.
    """
    if not torch.is_grad_enabled():  # grad mode is on in backward only with create_graph=True
        return _call(op, device_type, args)
    from .. import reference

    dy, x, _, base, lora_A, lora_B, scaling, dropout_p, seed, *flags = args
    with _no_autocast(device_type):
        xa = reference.apply_dropout(x, seed, dropout_p) @ lora_A.t()
        return getattr(reference, op)(dy, x, xa, base, lora_A, lora_B, scaling, dropout_p, seed, *flags)


_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _eager_fast_path(*tensors: Optional[Tensor]) -> bool:
    """May the LoRA ops run as a plain ``autograd.Function`` instead of through the custom op?

    The custom op is what ``torch.compile``, export and fake tensors see, but in
    eager mode its dispatch (schema defaults, redispatch, the registered autograd
    wrapper) costs ~0.4 ms per layer forward + backward on one Zen 4 core:
    ~90 ms of a 1024-token QLoRA step of SmolLM2-135M (210 layers). Eager calls on
    plain CPU/CUDA tensors therefore call the same backend functions through an
    ``autograd.Function`` (or directly, when nothing is recorded: see
    :func:`_records_autograd`); anything traced, faked or wrapped takes the custom op.
    """
    if torch.compiler.is_compiling():
        return False
    if _dispatch_stack_len is None or _dispatch_stack_len() > 0:
        return False
    if _functorch_active is None or _functorch_active():
        return False
    for t in tensors:  # is_cpu / is_cuda: t.device.type costs 0.3 us a tensor, 10 tensors a QLoRA call
        if t is not None and (type(t) not in _PLAIN_TENSORS or not (t.is_cpu or t.is_cuda)):
            return False
    return True


def _func_differentiates() -> bool:
    """Is a ``torch.func`` transform that differentiates (grad, vjp, jacrev, jvp, jacfwd) active?

    The custom ops' registered autograd does not serve these transforms: jvp and
    jacfwd got all-zero tangents from them, silently, and grad / vjp failed inside
    torch. The ops then compute with the pure-torch reference composition, which
    every transform differentiates. vmap alone keeps the custom ops.
    """
    if _functorch_active is None or not _functorch_active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a torch without these internals: assume the worst, stay correct
        return True
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def _forward_ad_active() -> bool:
    """Is ``torch.autograd.forward_ad`` in use (inside ``dual_level()``)?

    The ops' autograd has no forward-mode formula, so under forward AD they compute
    with the reference composition, as under torch.func's jvp (:func:`_func_differentiates`).
    """
    return _forward_ad._current_level >= 0


def _records_autograd(*tensors: Optional[Tensor]) -> bool:
    """Must an eager call go through its ``autograd.Function``?

    Only when it has a backward to record (grad mode on and an input that requires
    grad). Otherwise the backend is called directly, with the same result: the
    Function's ``apply`` costs 6-10 us a call on one core of the 2-core CI VM, more
    than the fused GEMV of a 64 x 64 layer (~4 us).
    """
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


# ------------------------------------------------------------------------------------ NF4


@torch.library.custom_op("lorakern::nf4_quantize", mutates_args=())
def _nf4_quantize(weight: Tensor, blocksize: int, double_quant: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    q = _call("nf4_quantize", weight.device.type, (weight, blocksize, double_quant))
    return q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset


@_nf4_quantize.register_fake
def _(weight, blocksize, double_quant):
    n = weight.numel()
    nblocks = -(-n // blocksize)
    packed = weight.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    f32 = dict(dtype=torch.float32)
    if double_quant:
        return (packed, weight.new_empty((nblocks,), dtype=torch.uint8), weight.new_empty((-(-nblocks // 256),), **f32),
                weight.new_empty((256,), **f32), weight.new_empty((1,), **f32))
    return (packed, weight.new_empty((nblocks,), **f32), weight.new_empty((0,), **f32), weight.new_empty((0,), **f32),
            weight.new_empty((1,), **f32))


def nf4_quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (any shape, fp32/fp16/bf16, finite) to NF4; bitsandbytes-compatible."""
    from ..formats.nf4 import check_weight_for_quantize, quantize_options

    check_weight_for_quantize(weight, "weight")
    blocksize, double_quant = quantize_options(blocksize, double_quant)
    tensors = _nf4_quantize(weight.detach(), blocksize, double_quant)
    return NF4Weight(*tensors, tuple(weight.shape), blocksize, weight.dtype)


@torch.library.custom_op("lorakern::nf4_dequantize", mutates_args=())
def _nf4_dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
                    shape: Sequence[int], blocksize: int, dtype: torch.dtype) -> Tensor:
    q = check.as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize)
    return _call("nf4_dequantize", packed.device.type, (q, dtype))


@_nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


def nf4_dequantize(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Decode ``q`` to a dense tensor of ``q.shape`` in ``dtype`` (default: the dtype it was quantized from).

    The NF4 state is frozen: the result never requires grad, whatever ``q``'s tensors do.
    """
    from ..formats.nf4 import validate

    validate(q, "q")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in check.FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype (float16, bfloat16, float32 or float64), got {dtype!r}")
    # detached: the op has no autograd formula, so a float absmax that requires grad
    # (no double quant) made backward fail inside torch with "no autograd formula"
    return _nf4_dequantize(*(t.detach() for t in q.tensors()), list(q.shape), q.blocksize, dtype)


@torch.library.custom_op("lorakern::nf4_matmul", mutates_args=())
def _nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
                shape: Sequence[int], blocksize: int, bias: Optional[Tensor]) -> Tensor:
    q = check.as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize)
    return _call("nf4_matmul", x.device.type, (x, q, bias))


@_nf4_matmul.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias):
    return x.new_empty((x.shape[0], shape[0]))


@torch.library.custom_op("lorakern::nf4_matmul_t", mutates_args=())
def _nf4_matmul_t(dy: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
                  shape: Sequence[int], blocksize: int) -> Tensor:
    q = check.as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize)
    return _call("nf4_matmul_t", dy.device.type, (dy, q))


@_nf4_matmul_t.register_fake
def _(dy, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize):
    return dy.new_empty((dy.shape[0], shape[1]))


def _nf4_matmul_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.shape, ctx.blocksize = list(shape), blocksize


def _nf4_matmul_backward(ctx, dy):
    q = ctx.saved_tensors
    dx = _nf4_matmul_t(dy, *q, ctx.shape, ctx.blocksize) if ctx.needs_input_grad[0] else None
    dbias = dy.sum(0) if ctx.needs_input_grad[8] else None
    return dx, None, None, None, None, None, None, None, dbias


_nf4_matmul.register_autograd(_nf4_matmul_backward, setup_context=_nf4_matmul_setup)


def _rows(x: Tensor, k: int) -> Tensor:
    """``x [..., K]`` as ``[M, K]``: x itself when it already is.

    Not ``x.reshape(-1, k)`` regardless: that is 0.9 us, and under autograd a view
    node (and one more for the output's reshape back): 12 us of a 64 x 64 LoRA
    layer's forward + backward (164 us instead of 176 us) on one core of the
    2-core CI VM, for a 2-D input as MoE experts and flattened-token models pass.
    """
    return x if x.dim() == 2 else x.reshape(-1, k)


def _unrows_like(y: Tensor, x: Tensor) -> Tensor:
    """``y [M, N]`` as ``[..., N]`` with the leading dimensions of ``x`` (y itself for a 2-D x)."""
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def _empty_rows(x: Tensor, n: int, weight: Optional[Tensor], bias: Optional[Tensor], lora_A: Optional[Tensor] = None,
                lora_B: Optional[Tensor] = None, scaling: float = 0.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ``[..., N]`` result of a batch without rows, on the autograd graph of every input (zero gradients).

    ``nn.Linear`` takes such batches, and models call their layers with them: an MoE
    expert that no token was routed to, a filtered batch that came out empty. Plain
    torch ops on empty tensors give exactly that; no kernel is launched.
    """
    with _no_autocast(x.device.type):
        x2 = x.reshape(0, x.shape[-1])
        y = x2 @ (weight.t() if weight is not None else x2.new_zeros(x2.shape[1], n))
        if lora_A is not None:
            y = y + scaling * ((x2 @ lora_A.t()) @ lora_B.t())
        y = y.to(out_dtype or x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def nf4_matmul(x: Tensor, q: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequant(q)^T + bias`` without materialising the dequantized weight (backend permitting)."""
    check.input_x(x)
    n, k = check.nf4_weight(q, x)
    check.bias(bias, n, x)
    if x.numel() == 0:
        return _empty_rows(x, n, None, bias)
    if _func_differentiates() or _forward_ad_active():
        from .. import reference
        return reference.nf4_matmul(x, q, bias)
    y = _nf4_matmul(x.reshape(-1, k), *q.tensors(), list(q.shape), q.blocksize, bias)
    return y.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------- LoRA


@torch.library.custom_op("lorakern::lora_linear_fwd", mutates_args=())
def _lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return _call("lora_linear_fwd", x.device.type, (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lorakern::lora_linear_bwd", mutates_args=())
def _lora_linear_bwd(dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                     dropout_p: float, seed: Tensor, need_dx: bool, need_dweight: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (dy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dweight)
    dx, dw, da, db = _call("lora_linear_bwd", dy.device.type, args)
    return _none_to_empty(dx, x), _none_to_empty(dw, x), da, db


@_lora_linear_bwd.register_fake
def _(dy, x, xa, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx, need_dweight):
    return (x.new_empty(x.shape if need_dx else _EMPTY_SHAPE), x.new_empty(weight.shape if need_dweight else _EMPTY_SHAPE),
            x.new_empty(lora_A.shape), x.new_empty(lora_B.shape))


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _lora_backward(ctx, dy, _dxa):
    x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, da, db = _lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need[0], need[1])
    dbias = dy.sum(0) if need[2] else None
    return _empty_to_none(dx) if need[0] else None, _empty_to_none(dw) if need[1] else None, dbias, da, db, None, None, None


_lora_linear_fwd.register_autograd(_lora_backward, setup_context=_lora_setup)


class _LoRALinear(torch.autograd.Function):
    """Eager twin of ``lora_linear_fwd`` + its registered autograd (see :func:`_eager_fast_path`).

    Backward under ``create_graph=True`` runs the reference formulas (see :func:`_call_backward`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        y, xa = _call("lora_linear_fwd", _device_type(x), (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed))
        ctx.save_for_backward(x, xa, weight, lora_A, lora_B, seed)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, weight, lora_A, lora_B, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        args = (dy, x, xa, weight, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need[0], need[1])
        dx, dw, da, db = _call_backward("lora_linear_bwd", _device_type(dy), args)
        dbias = dy.sum(0) if need[2] else None
        return dx if need[0] else None, dw if need[1] else None, dbias, da, db, None, None, None


def new_seed(device) -> Tensor:
    """A fresh dropout seed from torch's generator for ``device`` (int64, one element).

    ``device``: a ``torch.device``, a device string (``"cpu"``, ``"cuda:0"``), a CUDA index,
    or None (torch's default device).
    """
    if isinstance(device, bool) or not (device is None or isinstance(device, (torch.device, str, int))):
        raise TypeError(f"device must be a torch.device, a device string or an index, got {type(device).__name__}"
                        + (" (pass x.device, not the tensor)" if isinstance(device, Tensor) else ""))
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


_ZERO_SEEDS: dict = {}


def _zero_seed(device: torch.device) -> Tensor:
    """The seed of an eager call without dropout: one int64 zero per device, never written.

    Saves a ``torch.zeros`` per call (1.3 us on CPU; a fill kernel launch on CUDA).
    Made outside inference mode: an inference tensor made by a first call under
    ``torch.inference_mode()`` could not be saved for backward by a later training
    call. On CUDA the fill is waited for once, as later calls may read the seed on
    other streams; one made while a CUDA graph is being captured is not kept (its
    fill runs only when the graph is replayed).
    """
    seed = _ZERO_SEEDS.get(device)
    if seed is None:
        with torch.inference_mode(False):
            seed = torch.zeros(1, dtype=torch.int64, device=device)
        if device.type == "cuda":
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    return seed
                torch.cuda.current_stream().synchronize()
        _ZERO_SEEDS[device] = seed
    return seed


def _seed_or_zero(seed: Optional[Tensor], x: Tensor, dropout_p: float, eager: bool = False) -> Tensor:
    """The caller's seed (checked), a fresh one for dropout, or zero. ``eager``: the call runs eagerly
    (:func:`_eager_fast_path`), so the zero may be the shared one; traced code gets its own."""
    if seed is None:
        if dropout_p > 0:
            return new_seed(x.device)
        return _zero_seed(x.device) if eager else torch.zeros(1, dtype=torch.int64, device=x.device)
    check.seed(seed, x)
    return seed


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float = 1.0, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``x W^T + bias + scaling * (drop(x) A^T) B^T`` in one fused call.

    Shapes: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None, lora_A ``[r, K]``,
    lora_B ``[N, r]``; all one dtype and device. ``seed`` (int64, one element)
    fixes the dropout mask; None draws one from torch's generator.
    """
    check.input_x(x)
    n, k = check.dense_weight(weight, x)
    check.bias(bias, n, x)
    check.lora(lora_A, lora_B, n, k, x)
    check.scalars(scaling, dropout_p)
    if x.numel() == 0:
        return _empty_rows(x, n, weight, bias, lora_A, lora_B, float(scaling))
    eager = _eager_fast_path(x, weight, bias, lora_A, lora_B, seed)  # (a seed made here is a plain tensor)
    seed = _seed_or_zero(seed, x, dropout_p, eager)
    if (not eager and _func_differentiates()) or _forward_ad_active():
        from .. import reference
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
    args = (_rows(x, k), weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
    if not eager:
        y, _ = _lora_linear_fwd(*args)
    elif _records_autograd(x, weight, bias, lora_A, lora_B):
        y = _LoRALinear.apply(*args)
    else:
        y, _ = _call("lora_linear_fwd", _device_type(x), args)
    return _unrows_like(y, x)


# ---------------------------------------------------------------------------------- QLoRA


@torch.library.custom_op("lorakern::qlora_linear_fwd", mutates_args=())
def _qlora_linear_fwd(x: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
                      shape: Sequence[int], blocksize: int, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scaling: float, dropout_p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    q = check.as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize)
    return _call("qlora_linear_fwd", x.device.type, (x, q, bias, lora_A, lora_B, scaling, dropout_p, seed))


@_qlora_linear_fwd.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return x.new_empty((x.shape[0], shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lorakern::qlora_linear_bwd", mutates_args=())
def _qlora_linear_bwd(dy: Tensor, x: Tensor, xa: Tensor, packed: Tensor, absmax: Tensor, nested_absmax: Tensor,
                      nested_code: Tensor, offset: Tensor, shape: Sequence[int], blocksize: int, lora_A: Tensor,
                      lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor,
                      need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    q = check.as_nf4(packed, absmax, nested_absmax, nested_code, offset, shape, blocksize)
    args = (dy, x, xa, q, lora_A, lora_B, scaling, dropout_p, seed, need_dx)
    dx, da, db = _call("qlora_linear_bwd", dy.device.type, args)
    return _none_to_empty(dx, x), da, db


@_qlora_linear_bwd.register_fake
def _(dy, x, xa, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, lora_A, lora_B, scaling, dropout_p,
      seed, need_dx):
    return x.new_empty(x.shape if need_dx else _EMPTY_SHAPE), x.new_empty(lora_A.shape), x.new_empty(lora_B.shape)


def _qlora_setup(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    ctx.save_for_backward(x, output[1], packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed)
    ctx.shape, ctx.blocksize, ctx.scaling, ctx.dropout_p = list(shape), blocksize, scaling, dropout_p


def _qlora_backward(ctx, dy, _dxa):
    x, xa, packed, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, db = _qlora_linear_bwd(dy, x, xa, packed, absmax, nested_absmax, nested_code, offset, ctx.shape, ctx.blocksize,
                                   lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need[0])
    dbias = dy.sum(0) if need[8] else None
    return (_empty_to_none(dx) if need[0] else None, None, None, None, None, None, None, None, dbias, da, db, None, None, None)


_qlora_linear_fwd.register_autograd(_qlora_backward, setup_context=_qlora_setup)


class _QLoRALinear(torch.autograd.Function):
    """Eager twin of ``qlora_linear_fwd`` + its registered autograd (see :func:`_eager_fast_path`).

    With ``out_dtype`` (wider than x's dtype) the backend computes the base GEMM
    and ``xa`` only (scaling 0, no bias); bias and ``scaling * xa B^T`` are then
    added in ``out_dtype`` (see :func:`qlora_linear`). Backward under ``create_graph=True``
    runs the reference formulas (see :func:`_call_backward`).
    """

    @staticmethod
    def forward(ctx, x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, out_dtype):
        y, xa = _qlora_forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, out_dtype)
        ctx.save_for_backward(x, xa, lora_A, lora_B, seed)
        # the plain tuple: backward validates it again (see CheckedNF4Weight)
        ctx.q, ctx.scaling, ctx.dropout_p = NF4Weight._make(q), scaling, dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, lora_A, lora_B, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        dbias = dy.sum(0) if need[2] else None
        dy = dy.to(x.dtype)
        args = (dy, x, xa, ctx.q, lora_A, lora_B, ctx.scaling, ctx.dropout_p, seed, need[0])
        dx, da, db = _call_backward("qlora_linear_bwd", _device_type(dy), args)
        return dx if need[0] else None, None, dbias, da, db, None, None, None, None


def _qlora_forward(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, out_dtype):
    """(y, xa) of an eager call; ``q`` was validated by :func:`qlora_linear` in this call.

    With ``out_dtype`` the backend computes the base GEMM and ``xa`` only (scaling 0,
    no bias); bias and ``scaling * xa B^T`` are then added in ``out_dtype``.
    """
    wide = out_dtype is not None
    args = (x, CheckedNF4Weight._make(q), None if wide else bias, lora_A, lora_B, 0.0 if wide else scaling, dropout_p,
            seed)
    y, xa = _call("qlora_linear_fwd", _device_type(x), args)
    if wide:
        with _no_autocast(x.device.type):
            y = y.to(out_dtype)
            if scaling != 0.0:  # 0: no LoRA term (lorakern.reference), not 0 * B, NaN where B is not finite
                y.addmm_(xa.to(out_dtype), lora_B.to(out_dtype).t(), alpha=scaling)
            if bias is not None:
                y += bias.to(out_dtype)
    return y, xa


def _qlora_wide_composite(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed, out_dtype):
    """qlora_linear with a wide output from traceable pieces (the nf4_matmul op + torch ops), for compile."""
    from ..reference.dropout import apply_dropout

    with torch.autocast(x.device.type, enabled=False):  # the dtypes below are the point
        y = nf4_matmul(x, q, None).to(out_dtype)
        xa = apply_dropout(x, seed, dropout_p) @ lora_A.t()
        if scaling != 0.0:  # 0: no LoRA term (see _qlora_forward)
            y = y + scaling * (xa.to(out_dtype) @ lora_B.to(out_dtype).t())
        return y if bias is None else y + bias.to(out_dtype)


def qlora_linear(x: Tensor, q: NF4Weight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float = 1.0, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`lora_linear` with a frozen NF4 base ``q`` of shape ``(N, K)``.

    ``out_dtype``: a floating dtype wider than x's (float32 for bf16 / fp16 x) to
    return the output in, with ``x dequant(W)^T`` rounded once from the GEMM and
    the bias and LoRA term added in ``out_dtype``. This is what QLoRALinear does
    under autocast with a float32 input, as bitsandbytes' Linear4bit returns
    float32 there: an adapter update far below one bf16 ulp of the base output
    (every update early in training) then still changes the output. On
    SmolLM2-135M the first AdamW step at lr 1e-3 reached loss 1.246 this way,
    1.289 with a bf16 output (float32 compute: 1.236). The gradient ``dy``
    is rounded to x's dtype for the backward GEMMs, as bitsandbytes does.
    """
    check.input_x(x)
    n, k = check.nf4_weight(q, x)
    check.bias(bias, n, x)
    check.lora(lora_A, lora_B, n, k, x)
    check.scalars(scaling, dropout_p)
    if out_dtype == x.dtype:
        out_dtype = None
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point
                                  or torch.finfo(out_dtype).bits <= torch.finfo(x.dtype).bits):
        raise ValueError(f"out_dtype must be a floating dtype wider than x's {x.dtype}, got {out_dtype!r}")
    if x.numel() == 0:
        return _empty_rows(x, n, None, bias, lora_A, lora_B, float(scaling), out_dtype)
    eager = _eager_fast_path(x, *q.tensors(), bias, lora_A, lora_B, seed)  # (a seed made here is a plain tensor)
    seed = _seed_or_zero(seed, x, dropout_p, eager)
    if (not eager and _func_differentiates()) or _forward_ad_active():  # (out_dtype: LoRA term in x's dtype)
        from .. import reference
        y = reference.qlora_linear(x, q, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)
        return y if out_dtype is None else y.to(out_dtype)
    x2 = _rows(x, k)
    if eager and _records_autograd(x, bias, lora_A, lora_B):  # q is frozen: never differentiated
        y = _QLoRALinear.apply(x2, q, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, out_dtype)
    elif eager:
        y, _ = _qlora_forward(x2, q, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, out_dtype)
    elif out_dtype is not None:
        y = _qlora_wide_composite(x2, q, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed, out_dtype)
    else:
        y, _ = _qlora_linear_fwd(x2, *q.tensors(), list(q.shape), q.blocksize, bias, lora_A, lora_B,
                                 float(scaling), float(dropout_p), seed)
    return _unrows_like(y, x)
