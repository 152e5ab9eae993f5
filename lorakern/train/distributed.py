"""Data-parallel training on torch.distributed: launch checks, DDP and FSDP2 wrapping, full-state checkpoints.

Launch with torchrun (one process per device)::

    torchrun --nproc_per_node=2 examples/train_distributed.py --strategy fsdp ...

:func:`init_world` reads torchrun's variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and starts the process group:
gloo for CPU, nccl for CUDA. Without any of them it is one process, rank 0 of
1, with no process group.

Data. Every optimizer step draws one global batch of ``batch_size * grad_accum
* world_size`` samples from the seeded, endless sampler
(:class:`~lorakern.train.sampler.MixtureSampler`) and rank ``r`` keeps samples
``r, r + W, r + 2W, ...`` (:meth:`World.shard`). Ranks therefore see disjoint
samples, the same number each and the same number of steps; no sample is
dropped or padded, because the stream walks into the next epoch instead of
ending. The loss of a step is the sum over all ranks' labelled tokens divided by
the global label count, so the gradient of a step is the SUM of the ranks'
gradients: both wrappers are set to reduce by sum (DDP and FSDP2 average by
default), which makes a W-process step equal to a one-process step over the
same global batch up to float summation order.

Strategies (:func:`wrap_model`):

* ``ddp``: ``DistributedDataParallel``; only parameters with ``requires_grad``
  are bucketed and all-reduced (LoRA: the adapters; full: everything).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6). Each
  transformer block is one unit, then the body of the model (embeddings, final
  norm) is the root unit. Every parameter in them, the frozen base included
  (dense weights and the packed uint8 NF4 weights of
  :class:`~lorakern.nn.QLoRALinear`), is split along dim 0 across ranks, so
  their bytes per rank fall as 1/W (SmolLM2-135M QLoRA on 2 ranks: 0.505 of the
  whole model per rank, benchmarks/results/dist-fsdp-memory.md). What stays
  whole on every rank: buffers (NF4 absmax: about 3% of the packed weight with
  double quantization; rotary tables) and an output head NOT tied to the input
  embedding (see :func:`_shard_causal_lm`). The output head must be frozen, as
  LoRA and QLoRA leave it.
* ``none``: the model unchanged (one process).

Checkpoints. Rank 0 writes the usual single-process checkpoint
(:mod:`lorakern.train.checkpoint`): trainable weights and AdamW state as full,
unsharded tensors under the single-process names, gathered from FSDP shards by
:func:`full_state`. Every rank reads the same files on resume and keeps its
shard, so a checkpoint written by W processes resumes on any W' (one included)
and the reverse. The sampler state is a global sample count, so the data
position carries over unchanged as long as the global batch ``batch_size *
grad_accum * world_size`` is the same; a resume with another global batch is an
error from :func:`check_resume` (change ``grad_accum`` or ``batch_size`` to keep
it), since the step count and learning-rate schedule would no longer line up
with the samples seen. Resuming on several nodes needs the checkpoint directory
on storage every node can read.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .sampler import World

__all__ = ["LaunchError", "DistributedWorld", "init_world", "launch_env", "wrap_model", "unwrap_model",
           "no_sync", "full_state", "save_adapter", "save_trained", "check_resume", "local_parameter_bytes",
           "fsdp_qlora_unsupported", "STRATEGIES"]

STRATEGIES = ("none", "ddp", "fsdp")
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TORCHRUN_HINT = ("launch with torchrun, which sets all of them, e.g.\n"
                 "  torchrun --nproc_per_node=2 examples/train_distributed.py ...\n"
                 "or on several nodes (run on each, node_rank 0..nnodes-1):\n"
                 "  torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d "
                 "--rdzv_endpoint=HOST:29500 examples/train_distributed.py ...")


class LaunchError(RuntimeError):
    """The process was started in a way that cannot form a process group."""


def launch_env(environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """torchrun's rendezvous variables as ints/strings, or None when none is set (a single process).

    Raises :class:`LaunchError` when only some are set, when a number does not
    parse, or when ``RANK`` / ``LOCAL_RANK`` are out of range: the message names
    the variables and shows the torchrun command that sets them all.
    """
    environ = os.environ if environ is None else environ
    present = [k for k in RENDEZVOUS_VARS if environ.get(k, "") != ""]
    if not present:
        return None
    missing = [k for k in RENDEZVOUS_VARS if k not in present]
    if missing:
        raise LaunchError(f"distributed launch is incomplete: {', '.join(present)} set but "
                          f"{', '.join(missing)} missing; {TORCHRUN_HINT}")
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            values[key] = int(environ[key])
        except ValueError:
            raise LaunchError(f"{key} must be an integer, got {environ[key]!r}; {TORCHRUN_HINT}") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise LaunchError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    if not 0 <= local_rank <= rank:
        raise LaunchError(f"need 0 <= LOCAL_RANK <= RANK, got LOCAL_RANK={local_rank}, RANK={rank}")
    if not 0 < values["MASTER_PORT"] < 65536:
        raise LaunchError(f"MASTER_PORT must be a TCP port (1..65535), got {values['MASTER_PORT']}")
    return dict(values, MASTER_ADDR=environ["MASTER_ADDR"])


class DistributedWorld(World):
    """:class:`~lorakern.train.sampler.World` backed by a torch.distributed process group.

    Attributes: ``rank``, ``world_size``, ``local_rank`` (rank within the node),
    ``device`` (this process's device), ``backend`` (None for one process).
    Scalar reductions run in float64 on the backend's device (gloo: CPU, nccl: the GPU).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | str = "cpu", backend: Optional[str] = None):
        super().__init__(rank, world_size)
        self.local_rank = local_rank
        self.device = torch.device(device)
        self.backend = backend

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over ranks (a new tensor, same shape and dtype)."""
        if not self.distributed:
            return tensor.clone()
        out = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(out)
        return (out / self.world_size).to(tensor.device, tensor.dtype)

    def broadcast_object(self, obj=None, src: int = 0):
        """``obj`` from rank ``src`` on every rank (pickled: only for values this job created)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then destroy the process group (call once, at the end of the job)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            # Free what still references the group's work (DDP reducers, FSDP states of
            # models no longer used) while the group exists. Without the barrier and
            # this collect, 2 of 6 two-process gloo test runs aborted at interpreter
            # exit ("terminate called without an active exception"); with them 0 of 14.
            gc.collect()
            dist.destroy_process_group()
        self.backend = None

    def __repr__(self) -> str:
        return (f"DistributedWorld(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device}, backend={self.backend})")


def init_world(device: Optional[str] = None, backend: Optional[str] = None,
               timeout_s: float = 1800.0) -> DistributedWorld:
    """Join the job torchrun started (or return a one-process world when not launched by torchrun).

    Args:
        device: "cpu", "cuda" or None (CUDA when available). With CUDA each
            process takes GPU ``LOCAL_RANK`` and calls ``torch.cuda.set_device``.
        backend: None picks nccl for CUDA and gloo for CPU.
        timeout_s: how long a collective waits for the other ranks before
            failing (a crashed rank then ends the job instead of hanging it).
    """
    env = launch_env()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise LaunchError("device='cuda' was requested but torch sees no CUDA device")
    local_rank = 0 if env is None else env["LOCAL_RANK"]
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                              f"--nproc_per_node must not exceed the GPU count")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if env is None:
        return DistributedWorld(0, 1, 0, dev, None)
    backend = backend or ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise ValueError("the nccl backend needs device='cuda'; use gloo on CPU")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=env["RANK"], world_size=env["WORLD_SIZE"],
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistributedWorld(env["RANK"], env["WORLD_SIZE"], local_rank, dev, dist.get_backend())


# --------------------------------------------------------------------------- wrapping

def _allreduce_sum_hook(process_group, bucket):
    # DDP's default hook divides by the world size; the trainer's loss is already
    # normalised by the global label count, so the ranks' gradients must be summed.
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _fsdp_api():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise RuntimeError(f"strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                           f"this is torch {torch.__version__}: upgrade torch or use strategy='ddp'") from None
    return FSDPModule, MixedPrecisionPolicy, fully_shard


@torch.no_grad()
def _broadcast_from_main(model: nn.Module) -> None:
    # fully_shard keeps rank r's slice of rank r's own copy; ranks must agree on
    # every value first (e.g. adapters drawn before a common seed was set).
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=0)


def transformer_blocks(model: nn.Module, block_types: Optional[Sequence[type]] = None) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one.

    ``block_types`` given: every module of those classes. Otherwise the classes a
    Hugging Face model lists in ``_no_split_modules`` (its decoder layers), else
    the children of every ``nn.ModuleList``.
    """
    if block_types is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = _outermost(model, lambda m: type(m).__name__ in names)
        if blocks:
            return blocks
        return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    return _outermost(model, lambda m: isinstance(m, tuple(block_types)))


def _outermost(model: nn.Module, wanted) -> list[nn.Module]:
    """Modules for which ``wanted`` holds, leaving out those inside another one.

    ``_no_split_modules`` can name a block and a part of it (Mamba: MambaBlock and its
    MambaMixer); sharding the block and then the part inside it made fully_shard
    meet parameters that were already sharded (an error deep in DeviceMesh).
    """
    found: list[nn.Module] = []
    skip: set[int] = set()
    for m in model.modules():  # parents come before their children
        if id(m) in skip:
            continue
        if wanted(m):
            found.append(m)
            skip.update(id(c) for c in m.modules())
    return found


def _integer_parameter_refusal(fully_shard) -> Optional[RuntimeError]:
    """The error ``fully_shard`` raises for a frozen uint8 parameter, or None when it shards one.

    torch 2.11's FSDP2 re-creates every sharded parameter as ``nn.Parameter(dtensor)``,
    which requires grad by default, and only then copies ``requires_grad`` over
    (``_fsdp_param.py``, ``_init_sharded_param``): an integer parameter fails
    with "only Tensors of floating point dtype can require gradients". torch
    2.13 passes ``requires_grad`` to the constructor. The probe shards a
    throwaway module with one such parameter instead of comparing versions:
    construction runs no collective, so this needs no other rank.
    """
    probe = nn.Module()
    probe.codes = nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False)
    try:
        fully_shard(probe)
    except RuntimeError as e:
        return e
    return None


def fsdp_qlora_unsupported() -> Optional[str]:
    """Why this torch cannot run ``strategy='fsdp'`` on a QLoRA model, or None when it can.

    The same probe as :func:`wrap_model`, run in this process alone on the CPU:
    in a one-process gloo group made for it and destroyed after, or in the
    existing process group (every rank must then call it).
    """
    try:
        _, _, fully_shard = _fsdp_api()
    except RuntimeError as e:
        return str(e)
    from torch.distributed.device_mesh import init_device_mesh

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        refusal = _integer_parameter_refusal(
            functools.partial(fully_shard, mesh=init_device_mesh(device_type, (dist.get_world_size(),))))
    finally:
        if own_group:
            dist.destroy_process_group()
    if refusal is None:
        return None
    return (f"torch {torch.__version__}'s fully_shard cannot shard a frozen uint8 parameter (QLoRA's NF4 "
            f"weights): {refusal}")


def _shard_fsdp(model: nn.Module, mixed_precision: Optional[torch.dtype], block_types,
                device: torch.device) -> nn.Module:
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp_api()
    from torch.distributed.device_mesh import init_device_mesh

    # An explicit mesh on the world's device: without one fully_shard meshes over the
    # accelerator whenever torch sees one, so a CPU (gloo) job on a machine with one
    # GPU failed on rank 1 with "invalid device ordinal".
    fully_shard = functools.partial(fully_shard, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))
    # param_dtype applies to floating parameters only: FSDP2 leaves a non-float
    # parameter (the uint8 NF4 codes) in its own dtype (torch 2.13
    # _fsdp_param.py: "not self.orig_dtype.is_floating_point"); a test checks it.
    # Gradients are reduced in float32 whatever the compute dtype.
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) \
        if mixed_precision is not None else MixedPrecisionPolicy()
    if any(not p.is_floating_point() for p in model.parameters()):
        refusal = _integer_parameter_refusal(fully_shard)
        if refusal is not None:
            raise RuntimeError(f"strategy='fsdp' cannot shard QLoRA's uint8 NF4 weights with torch "
                               f"{torch.__version__}: its fully_shard refuses a frozen uint8 parameter "
                               f"({refusal}); use strategy='ddp' or a newer torch (2.13 works)") from refusal
    for block in transformer_blocks(model, block_types):
        fully_shard(block, mp_policy=policy)
    from .loss import split_causal_lm

    body, head = split_causal_lm(model)
    if body is None:
        fully_shard(model, mp_policy=policy)
    else:
        _shard_causal_lm(model, body, head, policy, mixed_precision, fully_shard, MixedPrecisionPolicy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean (see the module docstring). A divide factor of 1 is sent as
            # ReduceOp.PREMUL_SUM, which gloo lacks; forcing plain SUM works on both backends.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


class _TiedHead(nn.Module):
    """Output head tied to an FSDP-sharded input embedding: ``y = x E^T (+ b)`` with E read at call time.

    The embedding module is held outside the module tree (no second path to the
    same weight), so ``weight`` is whatever FSDP has put there: the gathered
    tensor between the body's forward and the end of backward, when the head runs.
    """

    is_plain_linear = True  # causal_lm_loss may read weight / bias and fuse the projection into the loss

    def __init__(self, head: nn.Module, embedding: nn.Module):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.bias = getattr(head, "bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._embedding.weight, self.bias)


def _shard_causal_lm(model, body, head, policy, mixed_precision, fully_shard, MixedPrecisionPolicy) -> None:
    # causal_lm_loss runs the body once per micro-batch, then the head once per
    # chunk of labelled rows: a count that differs between ranks (it follows each
    # rank's label count), so the head must run without collectives, and it never
    # goes through model.forward. The body is therefore the root unit, and its
    # parameters stay gathered from its forward to the end of backward (a root
    # does not reshard after forward; made explicit here).
    # * Tied head (SmolLM2, Gemma, ...): the head reads the embedding's gathered
    #   weight, so the embedding is sharded like everything else.
    # * Untied head: kept whole on every rank, outside FSDP.
    # Either way the head must be frozen (LoRA / QLoRA leave it so): its gradient
    # would otherwise need a reduction outside FSDP.
    trainable_head = [n for n, p in head.named_parameters() if p.requires_grad]
    if trainable_head:
        raise ValueError(f"strategy='fsdp' cannot train the output head ({', '.join(trainable_head)} require grad): "
                         f"freeze it (LoRA / QLoRA do) or use strategy='ddp'")
    embedding = next((m for m in body.modules() if getattr(m, "weight", None) is getattr(head, "weight", False)),
                     None)
    shared = {p for p in head.parameters() if any(p is q for q in body.parameters())}
    if embedding is not None:
        head_name = next(n for n, m in model.named_modules() if m is head)
        parent_name, _, leaf = head_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, _TiedHead(head, embedding))
    elif shared:
        raise ValueError("the output head shares parameters with the body other than a tied embedding weight; "
                         "use strategy='ddp'")
    elif mixed_precision is not None:
        # The untied head runs whole in its own dtype: hand it hidden states in that dtype.
        policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32,
                                      output_dtype=next(head.parameters()).dtype)
    fully_shard(body, mp_policy=policy, reshard_after_forward=False)


def wrap_model(model: nn.Module, world: World, strategy: str = "ddp",
               mixed_precision: Optional[torch.dtype] = None,
               block_types: Optional[Sequence[type]] = None) -> nn.Module:
    """Make ``model`` data-parallel over ``world``; return the module to train.

    Call after :func:`~lorakern.train.trainer.prepare_model` (the trainable set
    is fixed from here on) and before creating the optimizer (FSDP replaces the
    parameters by sharded ``DTensor`` parameters). Every rank must call it.
    All ranks start from rank 0's parameter and buffer values.

    Args:
        strategy: ``"ddp"``, ``"fsdp"`` or ``"none"``. With one process every
            strategy returns ``model`` unchanged.
        mixed_precision: FSDP only: the dtype parameters are gathered and used in
            (e.g. ``torch.bfloat16``); the sharded masters stay in their dtype
            (adapters float32), gradients are reduced in float32, uint8 NF4
            weights are never cast. With DDP use autocast instead.
        block_types: FSDP only: the module classes to shard one by one (default:
            see :func:`transformer_blocks`).

    Returns:
        ``DistributedDataParallel(CausalLMLoss(model))`` for ddp (:func:`unwrap_model`
        gives ``model`` back); ``model`` itself, sharded in
        place, for fsdp (its submodules become ``FSDPModule``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if mixed_precision is not None and strategy != "fsdp":
        raise ValueError("mixed_precision applies to strategy='fsdp'; with ddp run the forward under autocast")
    distributed = getattr(world, "world_size", 1) > 1
    if strategy == "none" or not distributed:
        return model
    if not dist.is_initialized():
        raise LaunchError(f"world_size is {world.world_size} but no process group exists: use init_world()")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (call prepare_model before wrap_model)")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        from .loss import CausalLMLoss

        device = getattr(world, "device", torch.device("cpu"))
        # The loss runs inside DDP's forward (CausalLMLoss): the chunked label-only loss
        # then works under DDP too, instead of DDP forcing full logits.
        ddp = DistributedDataParallel(CausalLMLoss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=False, broadcast_buffers=False)
        ddp.register_comm_hook(None, _allreduce_sum_hook)
        return ddp
    _fsdp_api()
    _broadcast_from_main(model)  # DDP does this itself when it wraps
    return _shard_fsdp(model, mixed_precision, block_types, getattr(world, "device", torch.device("cpu")))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    from .loss import CausalLMLoss

    while isinstance(model, (DistributedDataParallel, CausalLMLoss)):
        model = model.module if isinstance(model, DistributedDataParallel) else model.model
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Accumulate gradients locally: no gradient communication for forwards and backwards inside.

    Run every micro-batch but the last of an optimizer step under it; the last
    one's backward then reduces the accumulated sum once. ``enabled=False`` (or
    an unwrapped model) makes it a no-op.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not enabled:
        yield
        return
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
        return
    units = _fsdp_modules(model)
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


# ------------------------------------------------------------------------ checkpoints

def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


class _FullModel:
    """Stand-in for a sharded model in checkpoint I/O: full trainable tensors under their names."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._params = {n: nn.Parameter(t, requires_grad=True) for n, t in tensors.items()}

    def named_parameters(self):
        return iter(self._params.items())


class _FullOptimizer:
    """Stand-in for an optimizer with sharded state: ``state_dict()`` with full tensors."""

    def __init__(self, state: Optional[dict]):
        self._state = state

    def state_dict(self) -> dict:
        return self._state

    def load_state_dict(self, state: dict) -> None:
        self._state = state


def _gather(t: torch.Tensor) -> torch.Tensor:
    # full_tensor() is an all-gather: every rank calls it, in the same order.
    return (t.full_tensor() if _is_dtensor(t) else t).detach().cpu()


def _gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    sd = optimizer.state_dict()
    state = {idx: {k: _gather(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for idx, s in sorted(sd["state"].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(like):
        return value.to(like.device, like.dtype)
    from torch.distributed.tensor import distribute_tensor

    # Every rank read the same file: slice locally, no broadcast (src_data_rank=None).
    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


@torch.no_grad()
def _scatter(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], full_model: _FullModel,
             full_optimizer: _FullOptimizer, loaded_optimizer: Optional[dict]) -> None:
    params = dict(_trainable(model))
    for name, p in params.items():
        p.copy_(_shard_like(full_model._params[name].detach(), p))
    if optimizer is None or loaded_optimizer is None:
        return
    by_index = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, s in full_optimizer.state_dict()["state"].items():
        p = by_index[int(idx)]
        state[idx] = {k: _shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": full_optimizer.state_dict()["param_groups"]})


def _trainable(model: nn.Module):
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


@contextlib.contextmanager
def full_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, load: bool = False):
    """``(model, optimizer)`` to hand to ``save_checkpoint`` / ``load_checkpoint``, with full tensors.

    Unsharded models (one process, DDP): the unwrapped model and the optimizer
    themselves. FSDP: stand-ins whose ``named_parameters()`` and
    ``state_dict()`` hold full tensors on the CPU, under the names and indices
    a one-process run uses; every rank must enter (gathering is collective).
    With ``load=True`` the stand-ins start as zeros and, when the block exits
    without error, what was loaded into them is split back into each rank's shards::

        with full_state(model, optimizer) as (m, opt):            # save
            if world.is_main:
                save_checkpoint(out, step, m, opt, state)
        with full_state(model, optimizer, load=True) as (m, opt):  # resume, every rank
            state = load_checkpoint(path, m, opt)
    """
    trainable = _trainable(model)
    if not any(_is_dtensor(p) for _, p in trainable):
        yield unwrap_model(model), optimizer
        return
    if load:
        full_model = _FullModel({n: torch.zeros(p.shape, dtype=p.dtype) for n, p in trainable})
        full_optimizer = _FullOptimizer(None)
    else:
        full_model = _FullModel({n: _gather(p) for n, p in trainable})
        full_optimizer = _FullOptimizer(_gather_optimizer_state(optimizer) if optimizer is not None else None)
    yield full_model, full_optimizer
    if load:
        _scatter(model, optimizer, full_model, full_optimizer, full_optimizer.state_dict())


@contextlib.contextmanager
def _full_trainable(model: nn.Module, world: World):
    """Yield the user's module; on rank 0 its trainable parameters hold full tensors for the time of the block.

    Every rank must enter (FSDP shards are gathered); the shards are put back on exit.
    """
    inner = unwrap_model(model)
    full = {n: _gather(p) for n, p in _trainable(inner)}  # collective under FSDP
    swapped = []
    try:
        if world.is_main:
            for name, tensor in full.items():
                owner_name, _, leaf = name.rpartition(".")
                owner = inner.get_submodule(owner_name)
                swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        yield inner
    finally:
        for owner, leaf, original in swapped:
            owner._parameters[leaf] = original


def save_adapter(model: nn.Module, directory: str, world: World) -> Optional[str]:
    """:func:`lorakern.save_adapter` for a wrapped or sharded model: the same PEFT files a one-process run writes.

    Every rank must call it (FSDP shards are gathered); rank 0 writes and gets
    the directory, the others get None.
    """
    from ..patch import save_adapter as save_single

    path = None
    with _full_trainable(model, world) as inner:
        if world.is_main:
            path = save_single(inner, directory)
    world.barrier()
    return path


def save_trained(model: nn.Module, tokenizer, directory: str, world: World) -> Optional[str]:
    """:func:`lorakern.train.export.save_trained` for a wrapped or sharded model.

    The adapter of a LoRA / QLoRA model, or the whole fully fine-tuned model
    (``save_pretrained``, safetensors), with the tokenizer: what a one-process
    run writes. Every rank must call it; rank 0 writes and gets the directory,
    the others get None.
    """
    from .export import save_trained as save_single

    path = None
    with _full_trainable(model, world) as inner:
        if world.is_main:
            path = save_single(inner, tokenizer, directory)
    world.barrier()
    return path


def check_resume(state: Mapping, batch_size: int, grad_accum: int, world_size: int,
                 path: Optional[str] = None) -> None:
    """Refuse to resume a checkpoint whose global batch differs from this run's.

    ``state`` is the trainer state a checkpoint stored (its ``config`` with
    ``batch_size`` / ``grad_accum``, and ``world_size``; a checkpoint without
    ``world_size`` was written by one process). The world size itself may
    change; only ``batch_size * grad_accum * world_size`` must stay equal, since
    the sampler position is a global sample count and step ``s`` must have
    consumed ``s`` global batches. ``path`` (the checkpoint's) is named in the error.
    """
    config = state.get("config", {})
    saved_ws = int(state.get("world_size", 1))
    saved = int(config.get("batch_size", batch_size)) * int(config.get("grad_accum", grad_accum)) * saved_ws
    now = batch_size * grad_accum * world_size
    if saved != now:
        hint = ""
        if saved % (batch_size * world_size) == 0:
            hint = f"; e.g. grad_accum={saved // (batch_size * world_size)} with batch_size={batch_size}"
        where = f"checkpoint {path}:" if path else "checkpoint"
        raise ValueError(
            f"{where} global batch is {saved} samples per step (batch_size {config.get('batch_size')} x "
            f"grad_accum {config.get('grad_accum')} x {saved_ws} processes) but this run's is {now} "
            f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} processes): keep "
            f"batch_size x grad_accum x world_size equal to resume{hint}")


def local_parameter_bytes(model: nn.Module, buffers: bool = True) -> int:
    """Bytes of parameters (and buffers) this rank holds: local shards for FSDP, whole tensors otherwise."""
    total = 0
    tensors = list(unwrap_model(model).parameters()) + (list(unwrap_model(model).buffers()) if buffers else [])
    for t in tensors:
        local = t.to_local() if _is_dtensor(t) else t
        total += local.numel() * local.element_size()
    return total
