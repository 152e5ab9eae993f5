"""torch.distributed.checkpoint of an FSDP2-sharded QLoRA model, for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/dist_scripts/dcp_qlora.py CHECKPOINT_DIR

The state-dict API DCP and trainers built on FSDP2 use (get_model_state_dict /
set_model_state_dict) on sharded NF4 layers: a sharded save + load, and a full
(gathered) state dict loaded into another sharded model, must each reproduce the
outputs exactly. Exits non-zero on any difference.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from lorakern.nn import QLoRALinear


def sharded_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(QLoRALinear.from_linear(nn.Linear(64, 48), r=4), nn.ReLU(),
                          QLoRALinear.from_linear(nn.Linear(48, 32, bias=False), r=2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    return fully_shard(model)


def main(checkpoint_dir: str) -> None:
    dist.init_process_group("gloo")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    saved = sharded_model(0)
    want = saved(x)
    dcp.save({"model": get_model_state_dict(saved)}, checkpoint_id=checkpoint_dir)
    loaded = sharded_model(1)
    assert not torch.equal(loaded(x), want)
    state = {"model": get_model_state_dict(loaded)}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(loaded, state["model"])
    assert torch.equal(loaded(x), want), "sharded DCP save + load changed the outputs"
    full = StateDictOptions(full_state_dict=True)
    other = sharded_model(2)
    set_model_state_dict(other, get_model_state_dict(saved, options=full), options=full)
    assert torch.equal(other(x), want), "a full state dict loaded into a sharded model changed the outputs"
    # as lorakern.train.distributed.World.close: the FSDP states referencing the group's work go
    # before the group, or gloo may abort at exit ("terminate called without an active exception")
    del saved, loaded, other, state
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
