"""A small supervised fine-tuning loop: full fine-tuning, LoRA or QLoRA of any torch model.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` examples on
each of ``world.world_size`` processes. The loss of a step is the mean over all
labelled tokens of the step (not a mean of per-micro-batch means), so the
result does not depend on how a batch is split into micro-batches.

Exact resume: the batch of every step is a pure function of the seed and the
sampler position, torch's generators are reseeded from (seed, step, rank) at the
start of every step, and checkpoints hold trainable weights, AdamW state, the
learning-rate step and every RNG state, so N steps straight and k steps +
resume + N-k steps give the same losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import signal
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import (check_parameters, checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint,
                         read_trainer_state, save_checkpoint)
from .data import Collator, Example
from .distributed import check_resume, full_state, no_sync, unwrap_model, wrap_model
from .loss import causal_lm_loss, check_loss_split, check_packing
from .sampler import MixtureSampler, World, mix_seed

__all__ = ["TrainConfig", "Trainer", "TrainingInterrupted", "prepare_model", "cosine_lr", "autocast_dtype"]

METHODS = ("full", "lora", "qlora")
# Last part of the per-step seed: keeps the step RNG stream apart from the sampler's streams.
_STEP_STREAM = 0x5EED


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (every field has a working default for small models)."""

    steps: int = 100                   # optimizer steps
    batch_size: int = 8                # examples per micro-batch per process
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0              # linear warmup, then cosine decay towards min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping
    mixed_precision: str = "auto"      # "auto" | "bf16" | "fp16" | "no"
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 1024        # labelled rows projected to the vocabulary at once
    eval_every: int = 0                # 0: only at the end (when eval data is given)
    eval_batch_size: int = 8
    save_every: int = 0                # 0: only at the end
    keep_checkpoints: int | None = 2
    log_every: int = 1
    seed: int = 0
    output_dir: str | None = None      # metrics.jsonl, loss_curve.png, checkpoint-*/
    progress: bool = True
    mixture_weights: Sequence[float] | None = None

    def __post_init__(self):
        # Counts are whole numbers (NumPy's too), stored as int: steps=2.5 trained 3 steps and never
        # reached its final checkpoint and evaluation (step == steps never held).
        for names, low in ((("steps", "batch_size", "grad_accum", "loss_chunk_size", "eval_batch_size", "log_every"),
                            1), (("warmup_steps", "eval_every", "save_every"), 0)):
            for name in names:
                setattr(self, name, _count(name, getattr(self, name), low))
        self.seed = _count("seed", self.seed, 0)
        if self.seed >= 2**32:  # NumPy's seeding takes 32 bits
            raise ValueError(f"TrainConfig.seed must be in [0, 2**32), got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(tuple(self.betas)) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"TrainConfig.max_grad_norm must be None or a finite number > 0, got {self.max_grad_norm}")
        if self.keep_checkpoints is not None:
            self.keep_checkpoints = _count("keep_checkpoints", self.keep_checkpoints, 1)
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            raise ValueError(f"TrainConfig.mixed_precision must be auto|bf16|fp16|no, got {self.mixed_precision!r}")
        self.betas = tuple(self.betas)


def _count(name: str, value, low: int) -> int:
    """``value`` as an int >= ``low``, or a ValueError naming ``TrainConfig.<name>``."""
    # any real that is a whole number: NumPy's int64 / float32 from a config, 4.0 from YAML
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not float(value).is_integer():
        raise ValueError(f"TrainConfig.{name} must be a whole number >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"TrainConfig.{name} must be {'in [0, 2**32)' if name == 'seed' else f'>= {low}'}, "
                         f"got {value}")
    return int(value)


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device`` (None: run in the weights' dtype).

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with native bf16
    instructions (AVX512-BF16 / AMX), where it measured 1.6x faster than fp32 for
    a SmolLM2-135M training step (4 x 256 tokens, 2 cores: 2.0 s vs 3.2 s).
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def prepare_model(model: nn.Module, method: str = "lora", fast_attention: bool = True, lean_mlp: bool = True,
                  **lora_kwargs) -> list[str]:
    """Make ``model`` trainable for ``method`` in place; return the names of replaced modules.

    ``full``: every parameter trains. ``lora`` / ``qlora``: :func:`lorakern.apply_lora`
    with ``lora_kwargs`` (``r``, ``alpha``, ``dropout``, ``target_modules``,
    ``target_parameters`` for MoE expert weights, ...; ``qlora`` adds
    ``quantize="nf4"``), which freezes everything but the adapters.
    ``fast_attention``: switch a CPU model of a supported family from ``sdpa`` to
    :mod:`lorakern.train.attention` (faster training, same results; anything it
    does not serve still goes to sdpa). ``save_pretrained`` does not save the switch
    (config.json keeps the model's own attention); a whole-model pickle
    (``torch.save(model)``) does, and loading it needs
    :func:`lorakern.train.attention.register` called first.
    ``lean_mlp``: gated MLPs (Llama-style ``down(act(gate(x)) * up(x))``) save only
    gate and up for backward, in the autocast dtype under autocast
    (:mod:`lorakern.train.mlp`; same forward; on a SmolLM2 QLoRA step 360 MB less saved,
    peak RSS 2259 -> 1934 MB).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fast_attention:
        from .attention import use_fast_attention

        use_fast_attention(model)
    if lean_mlp:
        from .mlp import use_lean_mlp

        use_lean_mlp(model)
    if method == "full":
        if lora_kwargs:
            raise ValueError(f"method 'full' takes no LoRA arguments, got {sorted(lora_kwargs)}")
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    from ..patch import apply_lora

    if method == "qlora":
        lora_kwargs = dict(lora_kwargs, quantize="nf4")
    replaced = apply_lora(model, **lora_kwargs)
    if method == "qlora":
        _copy_frozen_tensors(model)
    return replaced


@torch.no_grad()
def _copy_frozen_tensors(model: nn.Module) -> None:
    """Give the frozen floating-point tensors left after quantization their own memory.

    Hugging Face loads safetensors checkpoints through a memory map, and the
    parameters kept as they are (embeddings, norms, biases) are views into it. The
    mapping lives as long as one of them does, so every page of the file read
    while quantizing the linear weights stays resident, although those weights are
    gone: 405 MB of the 540 MB SmolLM2-135M file after ``prepare_model(..., "qlora")``.
    Copying the ~115 MB still in use releases the mapping (-305 MB resident).
    Tied parameters stay tied (the Parameter object is kept, its data replaced).
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or t.requires_grad or not t.is_floating_point() or t.device.type != "cpu":
                continue
            if id(t) not in copies:
                copies[id(t)] = t.clone()
                if isinstance(t, nn.Parameter):
                    t.data = copies[id(t)]
            if not isinstance(t, nn.Parameter):
                module._buffers[name] = copies[id(t)]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Trainer:
    """Train the parameters of ``model`` that have ``requires_grad``.

    Args:
        model: a causal LM (Hugging Face, or any module returning logits
            ``[B, T, V]`` from ``model(input_ids)``; ``attention_mask=`` and,
            for packed examples, ``position_ids=`` are passed only when its
            forward takes them), already prepared with :func:`prepare_model`.
        train_data: a list of :class:`Example`, or ``{name: list}`` for a
            weighted mixture (``config.mixture_weights``, in the dict's order).
        config: :class:`TrainConfig`.
        eval_data: held-out examples for the validation loss (optional).
        pad_token_id: padding id for batches (default: the model config's, else 0).
        world: data-parallel placement (default: one process).
        callbacks: ``fn(trainer, record)`` called with every metrics record.
        strategy: ``"none"``, ``"ddp"`` or ``"fsdp"``: how ``model`` is spread
            over ``world`` (:func:`lorakern.train.distributed.wrap_model`, with
            ``world`` from :func:`~lorakern.train.distributed.init_world`);
            ``self.model`` is then the wrapped module.
    """

    def __init__(self, model: nn.Module, train_data: Sequence[Example] | Mapping[str, Sequence[Example]],
                 config: TrainConfig | None = None, eval_data: Sequence[Example] | None = None,
                 pad_token_id: int | None = None, world: World | None = None,
                 callbacks: Sequence[Callable] = (), strategy: str = "none"):
        self.model = model
        self.config = config = config or TrainConfig()
        self.world = world or World()
        self.datasets = dict(train_data) if isinstance(train_data, Mapping) else {"train": list(train_data)}
        for name, rows in self.datasets.items():
            if not rows:
                raise ValueError(f"training dataset {name!r} is empty")
        self.eval_data = list(eval_data) if eval_data else []
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
            if isinstance(pad_token_id, (list, tuple)):
                pad_token_id = pad_token_id[0]
        self.collate = Collator(pad_token_id if pad_token_id is not None else 0)
        self.callbacks = list(callbacks)
        self.device = _model_device(model)
        self.amp_dtype = autocast_dtype(self.device, config.mixed_precision)
        # float16 has 5 exponent bits: small gradients underflow to zero unless the loss is
        # scaled up for backward (and the gradients back down before clipping and the step).
        self.scaler = None
        if self.amp_dtype == torch.float16:
            if strategy == "fsdp":
                raise ValueError("float16 mixed precision needs loss scaling, which the fsdp strategy does not do "
                                 "here (each rank sees only its gradient shard); use mixed_precision='bf16' "
                                 "(or 'no'), or strategy='ddp'")
            self.scaler = torch.amp.GradScaler(self.device.type)
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing()  # on the user's module, before any wrapper
        # The loss's one-time check of the body + head split runs the whole model, which
        # only works before FSDP shards it; a model that fails it needs its full logits.
        sample = next(iter(self.datasets.values()))[0].input_ids
        fused_loss = check_loss_split(model, torch.tensor([sample], device=_model_device(model)))
        # Packed data: one probe forward (8 tokens) says whether this model keeps packed
        # examples apart; a warning if not (see check_packing), before FSDP shards it.
        packed = next((e for rows in (*self.datasets.values(), self.eval_data) for e in rows
                       if e.position_ids is not None), None)
        if packed is not None:
            check_packing(model, packed.input_ids)
        if strategy == "fsdp" and not fused_loss:
            raise ValueError("strategy='fsdp' needs the loss computed from the model's body and output head, and "
                             f"{type(model).__name__}'s logits are not head(hidden states) (see the warning above); "
                             "use strategy='ddp'")
        self.model = wrap_model(model, self.world, strategy)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (call prepare_model first)")
        # No weight decay on biases and norm weights (1-D), as is standard for AdamW.
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)
        self.sampler = MixtureSampler([len(v) for v in self.datasets.values()], config.mixture_weights,
                                      seed=config.seed)
        self.step = 0
        self.history: list[dict] = []
        self._fingerprints: dict[str, str] | None = None
        # output_dir is this run's: resume() continued it, or this trainer checked it held no other run
        # before its first save (save(), train(), after manual train_step() calls too)
        self._continues = False

    # ----------------------------------------------------------------------- setup

    def _enable_gradient_checkpointing(self) -> None:
        # transformers >= 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        kwargs_name = "activation_checkpointing_kwargs"
        if enable is None:
            enable, kwargs_name = getattr(self.model, "gradient_checkpointing_enable", None), \
                "gradient_checkpointing_kwargs"
        if enable is None:
            raise ValueError("gradient_checkpointing=True needs a model with gradient_checkpointing_enable() "
                             "(Hugging Face models); wrap the blocks of other models with "
                             "torch.utils.checkpoint yourself")
        # Non-reentrant checkpointing works when the inputs need no grad (frozen
        # embeddings under LoRA); the reentrant variant would silently drop the
        # adapter gradients of every checkpointed block.
        enable(**{kwargs_name: {"use_reentrant": False}})

    def autocast(self):
        """The mixed-precision context this trainer runs the model under (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -------------------------------------------------------------------- batches

    def _next_micro_batches(self) -> list[dict]:
        cfg = self.config
        global_rows = self.sampler.take(cfg.batch_size * cfg.grad_accum * self.world.world_size)
        names = list(self.datasets)
        mine = self.world.shard(global_rows)
        out = []
        for i in range(0, len(mine), cfg.batch_size):
            examples = [self.datasets[names[k]][j] for k, j in mine[i:i + cfg.batch_size]]
            out.append({k: v.to(self.device) for k, v in self.collate(examples).items()})
        return out

    # ----------------------------------------------------------------------- step

    def train_step(self) -> dict:
        """Run one optimizer step; return its metrics record."""
        cfg = self.config
        t0 = time.perf_counter()
        self.model.train()
        # The random numbers of a step (LoRA and model dropout) come from (seed, step,
        # rank): every rank draws its own masks (one generator state copied to all
        # ranks dropped the same units in every rank's rows), and a run resumed at any
        # step draws what the uninterrupted run drew.
        torch.manual_seed(mix_seed(cfg.seed, self.step, self.world.rank, _STEP_STREAM))
        batches = self._next_micro_batches()
        n_labels = self.world.all_reduce_sum(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)))
        n_tokens = self.world.all_reduce_sum(float(sum(int(b["attention_mask"].sum()) for b in batches)))
        lr = cfg.lr * cosine_lr(self.step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for i, b in enumerate(batches):
            # Gradients are reduced across processes once per step, in the last backward.
            with no_sync(self.model, i < len(batches) - 1):
                with self.autocast():
                    loss, _ = causal_lm_loss(self.model, b["input_ids"], b["labels"], b["attention_mask"],
                                             chunk_size=cfg.loss_chunk_size, position_ids=b.get("position_ids"))
                if loss.requires_grad:  # a micro-batch without labels contributes nothing
                    scaled = loss / max(n_labels, 1.0)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += float(loss.detach())
        loss_sum = self.world.all_reduce_sum(loss_sum)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params if p.grad is not None])))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - t0
        return {"step": self.step, "loss": loss_sum / max(n_labels, 1.0), "lr": lr, "grad_norm": grad_norm,
                "tokens": int(n_tokens), "tokens_per_s": n_tokens / seconds, "step_s": seconds}

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example] | None = None) -> dict:
        """Mean loss and perplexity over ``examples`` (default: the eval data)."""
        from .evaluate import evaluate_loss

        with self.autocast():
            return evaluate_loss(self.model, examples if examples is not None else self.eval_data,
                                 batch_size=self.config.eval_batch_size, collate=self.collate,
                                 world=self.world, chunk_size=self.config.loss_chunk_size)

    # ------------------------------------------------------------------------ run

    def state(self) -> dict:
        """JSON-able trainer state stored in checkpoints (besides weights, optimizer, RNG)."""
        state = {"sampler": self.sampler.state_dict(), "config": _jsonable(asdict(self.config)),
                 "datasets": {k: len(v) for k, v in self.datasets.items()},
                 "data_fingerprints": self.data_fingerprints(), "world_size": self.world.world_size,
                 "adapters": adapter_settings(unwrap_model(self.model))}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()  # floats and ints: JSON
        return state

    def save(self) -> str | None:
        """Write a checkpoint of the current step to ``output_dir`` (main process only)."""
        cfg = self.config
        if cfg.output_dir is None:
            raise ValueError("TrainConfig.output_dir is needed to save checkpoints")
        path = None
        self._claim_output_dir()
        with full_state(self.model, self.optimizer) as (model, optimizer):  # gathers FSDP shards: every rank
            if self.world.is_main:
                path = save_checkpoint(cfg.output_dir, self.step, model, optimizer, self.state(),
                                       keep=cfg.keep_checkpoints)
        self.world.barrier()
        return path

    def check_checkpoint(self, path: str) -> dict:
        """Refuse checkpoint ``path`` unless this trainer can continue it exactly; return its JSON state.

        Reads only the checkpoint's JSON and tensor headers, so a mismatch shows
        before any weight loads: the global batch (batch_size x grad_accum x
        processes), the training datasets (sizes, and token ids and labels by
        :meth:`data_fingerprints`), the trainable parameters' names and shapes and
        what each LoRA layer computes (:func:`adapter_settings`: layer kind, NF4
        or dense base, scaling, dropout), the seed and the mixture weights must be
        those of the run that wrote it.
        Raises ``ValueError`` saying what differs.
        """
        state = read_trainer_state(path)
        check_resume(state, self.config.batch_size, self.config.grad_accum, self.world.world_size, path)
        # The sampler's permutations (one per epoch) are drawn from the seed and the mixture weights:
        # with others, the restored position would see some examples twice and others never this epoch.
        saved_config = state.get("config", {})
        for name in ("seed", "mixture_weights"):
            mine = _jsonable(getattr(self.config, name))
            if name in saved_config and saved_config[name] != mine:
                raise ValueError(f"checkpoint {path} was trained with {name} {saved_config[name]!r} but this run has "
                                 f"{mine!r}: the order of examples follows it; resume with {name} "
                                 f"{saved_config[name]!r}")
        sizes = {k: len(v) for k, v in self.datasets.items()}
        saved = state.get("datasets", sizes)
        if saved != sizes:
            raise ValueError(f"checkpoint {path} was trained on {_sizes(saved)} but this run has {_sizes(sizes)}: "
                             "resume with the same training data, prepared the same way (files, max length, "
                             f"validation split, packing){_split_rounding_hint(state, saved, sizes)}")
        saved = state.get("data_fingerprints")
        if saved is not None and saved != self.data_fingerprints():
            differ = [name for name, digest in self.data_fingerprints().items() if saved.get(name) != digest]
            raise ValueError(f"checkpoint {path} was trained on other examples in {', '.join(map(repr, differ))} "
                             "(same sizes, different tokens): resume with the same training data, prepared the "
                             "same way (files, tokenizer, chat template, max length, validation split, packing)")
        try:
            check_parameters(path, {n: p.shape for n, p in unwrap_model(self.model).named_parameters()
                                    if p.requires_grad})
        except ValueError as e:
            raise ValueError(f"{e}: resume with the method, LoRA rank and targets it was trained with") from None
        saved = state.get("adapters")  # absent from checkpoints written before it was stored
        if saved is not None:
            _check_adapter_settings(saved, adapter_settings(unwrap_model(self.model)), path)
        return state

    def data_fingerprints(self) -> dict[str, str]:
        """SHA-256 of each training dataset's token ids and labels, in order (hex; computed once).

        The sampler's position in a checkpoint indexes these examples, so a resume
        on other examples of the same count would silently train on a different
        sequence of batches.
        """
        if self._fingerprints is None:
            self._fingerprints = {name: _fingerprint(rows) for name, rows in self.datasets.items()}
        return self._fingerprints

    def resume(self, path: str | None = None) -> bool:
        """Restore the newest checkpoint in ``output_dir`` (or ``path``); False when there is none.

        Without a checkpoint the run starts at step 0, and records a previous
        attempt left in ``metrics.jsonl`` are dropped. A checkpoint this trainer
        cannot continue raises ``ValueError`` (see :meth:`check_checkpoint`), as
        does ``path`` older than a checkpoint in ``output_dir`` (the rotation would
        keep those and delete this run's). Without ``resume()``, :meth:`train`
        refuses an ``output_dir`` that holds a previous run.
        """
        path = path or (latest_checkpoint(self.config.output_dir) if self.config.output_dir else None)
        if path is None:
            self._truncate_metrics(0)
            self._continues = True
            return False
        step = int(self.check_checkpoint(path)["step"])
        outside = self.config.output_dir and \
            os.path.dirname(os.path.abspath(path)) != os.path.abspath(self.config.output_dir)
        if outside:  # a checkpoint from elsewhere: output_dir must not hold another run
            self._refuse_a_previous_run()
        later = [p for p in list_checkpoints(self.config.output_dir) if checkpoint_step(p) > step] \
            if self.config.output_dir else []
        if later:  # the rotation keeps the highest steps: it would delete this run's new ones, not these
            raise ValueError(f"{self.config.output_dir} holds checkpoints after step {step} "
                             f"({', '.join(os.path.basename(p) for p in later)}): continuing from {path} would mix "
                             "them with this run's; move or delete them first")
        with full_state(self.model, self.optimizer, load=True) as (model, optimizer):
            state = load_checkpoint(path, model, optimizer)
        self.sampler.load_state_dict(state["sampler"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = int(state["step"])
        self._truncate_metrics(self.step)
        self._continues = True  # only now: after a refused checkpoint train() still refuses the directory
        return True

    def train(self) -> list[dict]:
        """Train until ``config.steps``; return the metrics records of this call.

        Ctrl-C (SIGINT, in the main thread) stops after the optimizer step in
        progress: the trainer saves a checkpoint of that step (with
        ``output_dir``) and raises :class:`TrainingInterrupted`, a
        ``KeyboardInterrupt`` saying where; :meth:`resume` continues exactly.
        A second Ctrl-C interrupts at once, saving nothing.
        """
        cfg = self.config
        if cfg.output_dir:
            self._claim_output_dir()
        show = cfg.progress and self.world.is_main
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        records = []
        note = "stopping after this step" + (" to save a checkpoint" if cfg.output_dir else "")
        with _stop_after_step_on_sigint(note if self.world.is_main else None) as stop_requested:
            try:
                self._train_loop(records, bar, stop_requested)
            finally:
                if bar is not None:
                    bar.close()
        if cfg.output_dir and self.world.is_main:
            self.plot()
        return records

    def _train_loop(self, records: list, bar, stop_requested: Callable[[], bool]) -> None:
        cfg = self.config
        while self.step < cfg.steps:
            record = self.train_step()
            if cfg.eval_every and self.eval_data and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                record.update(self._eval_record())
            if self.step == cfg.steps and self.eval_data:
                record.update(self._eval_record())
            self._log(record)
            records.append(record)
            if bar is not None:
                bar.update(1)
                postfix = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "eval_loss" in record:
                    postfix["eval"] = f"{record['eval_loss']:.4f}"
                bar.set_postfix(postfix)
            due = bool(cfg.output_dir) and ((cfg.save_every and self.step % cfg.save_every == 0)
                                            or self.step == cfg.steps)
            path = self.save() if due else None
            # Every rank must stop after the same step: saving is collective under FSDP.
            stop = stop_requested()
            if self.world.world_size > 1:
                stop = self.world.all_reduce_sum(float(stop)) > 0
            if stop:
                if cfg.output_dir and not due:
                    path = self.save()
                if cfg.output_dir and self.world.is_main:
                    self.plot()
                raise TrainingInterrupted(self.step, path)

    def _eval_record(self) -> dict:
        result = self.evaluate()
        return {"eval_loss": result["loss"], "eval_ppl": result["perplexity"]}

    # -------------------------------------------------------------------- metrics

    def _metrics_path(self) -> str | None:
        return os.path.join(self.config.output_dir, "metrics.jsonl") if self.config.output_dir else None

    def _log(self, record: dict) -> None:
        self.history.append(record)
        for fn in self.callbacks:
            fn(self, record)
        path = self._metrics_path()
        if path and self.world.is_main and (record["step"] % self.config.log_every == 0 or "eval_loss" in record
                                            or record["step"] == self.config.steps):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _claim_output_dir(self) -> None:
        if not self._continues:
            self._refuse_a_previous_run()
            self._continues = True

    def _refuse_a_previous_run(self) -> None:
        # A fresh run in a used output_dir: its checkpoints would lose to the old run's in the
        # rotation (which keeps the highest steps), and metrics.jsonl would hold both runs.
        found = [os.path.basename(p) for p in list_checkpoints(self.config.output_dir)]
        metrics = self._metrics_path()
        if metrics and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            found.append("metrics.jsonl")
        if found:
            raise ValueError(f"output_dir {self.config.output_dir} holds a previous run ({', '.join(found[:4])}"
                             f"{' ...' if len(found) > 4 else ''}): call resume() to continue it, or train into "
                             "an empty directory")

    def _truncate_metrics(self, step: int) -> None:
        # A resumed run repeats the steps after its checkpoint: drop their old records.
        from .plot import read_metrics

        path = self._metrics_path()
        if not path or not self.world.is_main or not os.path.exists(path):
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def plot(self, path: str | None = None) -> str | None:
        """Plot train (and eval) loss from ``metrics.jsonl`` to ``loss_curve.png``; return its path."""
        metrics = self._metrics_path()
        if not metrics or not os.path.exists(metrics):
            return None
        from .plot import plot_loss_curve

        return plot_loss_curve(metrics, path or os.path.join(self.config.output_dir, "loss_curve.png"))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :meth:`Trainer.train` after optimizer step ``step``.

    ``checkpoint`` is the directory holding that step (None without an
    ``output_dir``, and on ranks other than 0).
    """

    def __init__(self, step: int, checkpoint: str | None):
        saved = f"; checkpoint saved in {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted after step {step}{saved}")
        self.step, self.checkpoint = step, checkpoint


@contextlib.contextmanager
def _stop_after_step_on_sigint(note: str | None):
    """Yield ``stop_requested()``: True once Ctrl-C was pressed inside the block (which prints ``note``).

    Python's default handler raises ``KeyboardInterrupt`` wherever the program
    is, mid-backward or mid-optimizer-step included, where no consistent state
    exists to save. Inside this block the first SIGINT only sets a flag, read
    between steps; a second one raises at once. Nothing changes when SIGINT is
    ignored or handled by the application, or outside the main thread (where
    signal handlers cannot be installed).
    """
    requested = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def on_sigint(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        if note:
            print(f"\nCtrl-C: {note} (Ctrl-C again stops at once, without saving)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def adapter_settings(model: nn.Module) -> list[dict]:
    """What defines the function each LoRA layer of ``model`` trains, beyond its parameters' shapes.

    One entry per distinct setting, with the names of the layers that have it:
    ``{"layer": class name, "base": "nf4" | "dense", "scaling": alpha / r (or
    alpha / sqrt(r)), "dropout": p, "modules": [names]}``. A checkpoint's
    lora_A / lora_B of the same shapes trained under another scaling, dropout
    or base (QLoRA's NF4 weights vs LoRA's dense ones) would continue as a
    different function. Empty without LoRA layers (full fine-tuning).
    """
    from ..nn import LoRAExperts, LoRALinear, QLoRALinear
    from ..patch import lora_modules

    groups: dict[tuple, list[str]] = {}
    for name, m in lora_modules(model).items():
        # the layer class itself, not a subclass a wrapper may have made of it (FSDP2's FSDP<name>)
        layer = next(c for c in (LoRALinear, QLoRALinear, LoRAExperts) if isinstance(m, c))
        quantized = layer is QLoRALinear or getattr(m, "quantize", None) is not None
        key = (layer.__name__, "nf4" if quantized else "dense", float(m.scaling), float(m.dropout))
        groups.setdefault(key, []).append(name)
    return [{"layer": layer, "base": base, "scaling": scaling, "dropout": dropout, "modules": names}
            for (layer, base, scaling, dropout), names in groups.items()]


# What to resume with when a layer setting differs, named for prepare_model / apply_lora
# callers and for the command line (whose flags share these names) alike.
_KIND = "LoRA layer kind and base weights (method 'lora' for a dense base, 'qlora' for NF4)"
_SETTING_HINTS = {"layer": _KIND, "base": _KIND,
                  "scaling": "LoRA alpha and rank (scaling = alpha / r) and rsLoRA setting (alpha / sqrt(r) with it)",
                  "dropout": "LoRA dropout"}


def _describe(settings: dict) -> str:
    return f"{settings['layer']} on a {settings['base']} base, scaling {settings['scaling']:g}, " \
           f"dropout {settings['dropout']:g}"


def _check_adapter_settings(saved: list[dict], mine: list[dict], path: str) -> None:
    """Refuse when a LoRA layer of the checkpoint was trained with another kind, base, scaling or dropout."""
    def by_module(groups):
        return {name: g for g in groups for name in g["modules"]}

    saved_of = by_module(saved)
    for name, here in by_module(mine).items():
        there = saved_of.get(name)
        if there is None:  # the parameter names matched, so the layer sets cannot differ: a damaged state
            raise ValueError(f"checkpoint {path} holds no LoRA settings for {name}")
        differ = [key for key in _SETTING_HINTS if there[key] != here[key]]
        if differ:
            hints = list(dict.fromkeys(_SETTING_HINTS[key] for key in differ))
            raise ValueError(f"checkpoint {path} trained {name} (and {len(there['modules']) - 1} more layer(s)) "
                             f"as {_describe(there)}; this run has {_describe(here)}: resume with the "
                             f"{' and '.join(hints)} it was trained with")


def _fingerprint(rows: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for ex in rows:
        # Lengths first, so that no two different example lists hash the same byte stream.
        digest.update(len(ex.input_ids).to_bytes(8, "little"))
        digest.update(array("q", ex.input_ids).tobytes())
        digest.update(array("q", ex.labels).tobytes())
    return digest.hexdigest()


def _split_rounding_hint(state: dict, saved: dict, sizes: dict) -> str:
    """Why a checkpoint from before split sizes were rounded half up may count 1-2 examples more or fewer.

    Checkpoints written since shortly after that change store ``adapters`` in
    their state; one without may predate it, when ``round()`` rounded held-out
    sizes half to even: 0.05 of 50 records held out 2, where 3 are held out now.
    """
    differ = {name: saved.get(name, 0) - n for name, n in sizes.items() if saved.get(name, 0) != n}
    if "adapters" in state or set(saved) != set(sizes) or not all(abs(d) <= 2 for d in differ.values()):
        return ""
    counts = ", ".join(f"{abs(d)} record{'s' if abs(d) > 1 else ''} {'fewer' if d > 0 else 'more'}"
                       + (f" for {name!r}" if len(differ) > 1 else "") for name, d in differ.items())
    return (f". This checkpoint may predate split sizes rounded half up (it rounded them half to even: 0.05 of 50 "
            f"records held out 2, now 3); if that is the difference, pick validation and test fractions "
            f"(--val-fraction, --test-fraction) that hold out {counts}, as then")


def _sizes(datasets: dict) -> str:
    return ", ".join(f"{n} examples in {name!r}" for name, n in datasets.items())


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
