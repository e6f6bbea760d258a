"""Stage 3 past one process: the few lines that let distill.py run under torchrun, and its checkpoints.

    torchrun --nproc-per-node 8 distill.py --out runs/x ...            # each process holds the whole model
    torchrun --nproc-per-node 8 distill.py --out runs/x ... --shard    # FSDP2: each holds 1/8 of it

Each rank takes its share of every step's prompts (prompts[rank::world]) and samples them with its own generator.
Losses are weighted by the *global* number of sequences of the step, and the gradients of all ranks are summed,
so an update is the same whatever the world size. Without --shard that sum is one all_reduce per parameter (data
parallelism written out; DDP does the same sum, overlapped with the backward). With --shard every decoder block is
an FSDP2 unit (`fully_shard`): weights, gradients and Adam states live in 1/world slices, gathered block by block
for each forward and reduce-scattered (summed, not averaged) after each backward. Because every forward then runs
collectives, all ranks must call the model equally often: equal shares per step, and the sampler decodes until
every rank's rows have ended. Only rank 0 prints and writes. Without torchrun (WORLD_SIZE unset) every method
here is a no-op and the run is the ordinary single-process one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

from common import UserError
from steering import decoder_layers


class World:
    def __init__(self, device: torch.device, shard: bool = False):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if shard and self.size == 1:
            raise UserError("--shard splits the model over processes: run under torchrun with --nproc-per-node >= 2")
        self.sharded = shard
        if self.size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list, required: bool = False) -> list:
        """This rank's part of a step's prompts: every world-th one, starting at its rank (shares may differ by 1).
        `required`: a rank left with nothing to sample is an error (more processes than prompts per step)."""
        mine = items[self.rank::self.size]
        if required and items and not mine:
            raise UserError(f"{self.size} processes but {len(items)} prompts in a step: use at most "
                            f"--prompts-per-step processes")
        return mine

    def sum(self, values: list[float]) -> list[float]:
        """The same numbers summed over ranks (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True if flag is true on some rank (the sampler's "is any row still decoding anywhere")."""
        if self.size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, model):
        """FSDP2: every decoder block its own unit, the rest (embeddings, head) the root's. Gradients are summed
        over ranks like sum_gradients does, since each rank's loss is already its share of the global mean."""
        from torch.distributed.fsdp import fully_shard
        units = [*decoder_layers(model), model]
        for unit in units:
            fully_shard(unit)
        for unit in units:  # FSDP2 averages by default (and gloo cannot pre-multiply): a plain sum instead
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        return model

    def sum_gradients(self, params) -> None:
        """Σ over ranks of each gradient, in place: every rank then holds the gradient of the global loss.
        Sharded, FSDP2 has already reduce-scattered the sum during the backward."""
        if self.size == 1 or self.sharded:
            return
        for p in params:
            if p.grad is None:  # a rank whose micro-batches never reached p still takes part in the sum
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order (for checkpoints: each rank's generator state)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints

def trainable(model) -> dict[str, torch.nn.Parameter]:
    """What the optimiser updates, by name: every weight, or (LoRA) the adapters."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full_state(model, opt, world: World):
    """The trainable weights and the optimizer state as whole tensors on rank 0 (sharded: gathered from the
    slices, keyed by parameter name, so a checkpoint resumes under any number of processes)."""
    if not world.sharded:
        return {n: p.detach() for n, p in trainable(model).items()}, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=True))


def load_full_state(model, opt, weights: dict, opt_state: dict, world: World) -> None:
    if not world.sharded:
        params = trainable(model)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=opt_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def unsharded(model, world: World, rebuild):
    """Rank 0: a plain copy of a sharded model with all its weights, built by rebuild() (other ranks: None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    plain = rebuild()
    plain.load_state_dict(weights)
    return plain


def save_checkpoint(path: Path, student, opt, sched, step: int, gen, log: list[dict], world: World) -> None:
    weights, opt_state = full_state(student, opt, world)  # every rank takes part in the gathers
    gens = world.gather(gen.get_state())  # every rank's sampler stream, so that a resumed run draws the same
    if not world.main:
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"model": weights, "opt": opt_state, "sharded": world.sharded, "sched": sched.state_dict(),
                "step": step, "gens": gens, "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(),
                "log": log}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, student, opt, sched, gen, world: World):
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    ck = torch.load(path, weights_only=False)
    if ck.get("sharded", False) != world.sharded:  # the optimizer state is keyed differently
        raise UserError(f"--resume: {path} was written {'with' if ck.get('sharded') else 'without'} --shard; "
                        f"resume it the same way")
    load_full_state(student, opt, ck["model"], ck["opt"], world)
    sched.load_state_dict(ck["sched"])
    if len(ck["gens"]) == world.size:  # another world size: the streams restart from each rank's seed
        gen.set_state(ck["gens"][world.rank])
    torch.set_rng_state(ck["torch_rng"])
    random.setstate(ck["py_rng"])
    return ck["step"], ck["log"]
