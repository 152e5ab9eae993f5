"""Drop-in LoRA modules built on the fused :mod:`lorakern.ops`.

    LoRALinear   dense frozen base weight + trainable low-rank adapter (lora_A, lora_B)
    QLoRALinear  the same with the base weight stored as NF4 (about 4.13 bits per weight)
    LoRAExperts  a fused MoE expert weight [E, out, in] with one adapter per expert (dense or NF4)

Both keep PEFT's conventions: ``lora_A`` is ``[r, in_features]``, ``lora_B`` is
``[out_features, r]``, ``y = base(x) + scaling * dropout(x) A^T B^T`` with
``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
"""

from .experts import LoRAExperts
from .lora import INITS, LoRALinear
from .qlora import QLoRALinear

__all__ = ["LoRALinear", "QLoRALinear", "LoRAExperts", "INITS"]
