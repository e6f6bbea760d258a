"""Stage 3 past one process: the few lines that let distill.py run under torchrun.

    torchrun --nproc-per-node 8 distill.py --out runs/x ...

Each rank takes its share of every step's prompts (prompts[rank::world]) and samples them with its own generator.
Losses are weighted by the *global* number of sequences of the step, and the gradients of all ranks are summed
with one all_reduce per parameter, so an update is the same whatever the world size (data parallelism, written
out; DDP does the same sum, overlapped with the backward). Only rank 0 prints and writes. Without torchrun
(WORLD_SIZE unset) every method here is a no-op and the run is the ordinary single-process one.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from common import UserError


class World:
    def __init__(self, device: torch.device):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
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

    def sum_gradients(self, params) -> None:
        """Σ over ranks of each gradient, in place: every rank then holds the gradient of the global loss."""
        if self.size == 1:
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
