"""Patch any PyTorch model with LoRA / QLoRA layers, merge them back, and read/write PEFT adapters.

    apply_lora(model, target_modules="all-linear", ...) -> names   swap nn.Linear / Conv1D in place
                                                                    (target_parameters=: MoE expert weights)
    merge_lora(model) -> model                                      plain layers with the adapter merged
    with disable_adapters(model): ...                               the base model's outputs, adapters off
    save_adapter(model, directory)                                  PEFT format (adapter_config.json + safetensors)
    load_adapter(model, directory) -> names                         PEFT-saved LoRA / rsLoRA adapters

transformers is never imported here at module level (only when a merged GPT-2
Conv1D must be rebuilt).
"""

from .adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from .apply import apply_lora, disable_adapters, lora_modules, merge_lora

__all__ = ["apply_lora", "merge_lora", "disable_adapters", "save_adapter", "load_adapter", "read_adapter_config", "lora_modules",
           "AdapterError"]
