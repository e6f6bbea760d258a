"""--shard: Stage 3's models in FSDP2 slices, built so that no process ever holds a whole model on its device.

    every rank   builds the architecture on the meta device (shapes, no memory), makes every decoder block and
                 the root an FSDP2 unit (fully_shard), then allocates its own 1/N slice of each (to_empty)
    rank 0       alone reads the weights, on the host (safetensors files are memory-mapped), and sends them
                 one tensor at a time; each rank keeps its slice (set_model_state_dict, broadcast_from_rank0)
    buffers      that are not weights (the rotary frequencies: no state dict holds them) come from rank 0's
                 host copy too, so that every rank computes exactly what one process would

Full fine-tuning shards two models, the float32 student and its frozen copy π0 (precision.frozen_copy), both
filled from the one host copy; LoRA shards one, with the adapters peft drew on rank 0 sent to every rank.
Where Stage 3 computes in bf16 (CUDA), each unit has FSDP2's MixedPrecisionPolicy, not autocast
(precision.mixed_precision): it gathers its slices as bf16 weights to compute and reduce-scatters gradients
in float32, so what trains stays float32 in its slices, with its gradients and AdamW's moments.
Rank 0's host copy is dropped once the slices are filled. At the end rank 0 gathers the trained slices into
a plain model to save (parallel.unsharded).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from safesteer.scale.precision import frozen_copy, mixed_precision
from safesteer.hooks import decoder_layers


def shard(model, device: torch.device):
    """FSDP2: every decoder block its own unit, the rest (embeddings, head) the root's, each with the device's
    mixed precision (bf16 compute on CUDA). Gradients are summed over ranks, as in World.sum_gradients: each
    rank's loss is already its share of the global mean."""
    units = [*decoder_layers(model), model]
    # FSDP2 fixes a unit's dtypes at its first forward, from what then requires grad: Stage 3's first forward
    # is the student sampling, LoRA's adapters on (as π0 or πt, peft turns their requires_grad off)
    for unit in units:
        fully_shard(unit, mp_policy=mixed_precision(device))
    for unit in units:  # FSDP2 averages by default (and gloo cannot pre-multiply): a plain sum instead
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def sharded_models(build, device: torch.device, main: bool, lora: bool):
    """(student, π0's frozen copy or with LoRA the student itself, tok), sharded over the ranks and holding
    π0's weights. build(on) is parallel.build_student's (model, tok) built on `on`: "meta" on every rank, and
    on rank 0 (main) "cpu" too, the copy that every slice is cut from."""
    with torch.random.fork_rng(devices=[]):  # peft draws adapters even on meta: keep its draws for the host
        student, tok = build(torch.device("meta"))
    frozen = student if lora else frozen_copy(student)
    host = build(torch.device("cpu"))[0] if main else None  # the draws of one process: the same adapters
    for model in [student] if lora else [student, frozen]:
        fill(shard(model, device), host, device)
    return student, frozen, tok


@torch.no_grad()
def fill(model, host, device: torch.device) -> None:
    """A sharded model still on meta: its slices allocated on `device` and filled from rank 0's host copy
    (None on other ranks, which receive). A tied head stays the embeddings' parameter (to_empty keeps it)."""
    model.to_empty(device=device)
    weights = host.state_dict() if host is not None else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                  broadcast_from_rank0=True))
    host_buffers = dict(host.named_buffers()) if host is not None else {}
    for name, buf in model.named_buffers():  # to_empty left them uninitialised
        if host is not None:
            buf.copy_(host_buffers[name])
        dist.broadcast(buf, src=0)
