"""Stage 3's checkpoints: every rank writes its own slices, and any number of processes reads them back.

    STUDENT.work/weights-STEP/   torch.distributed.checkpoint: what trains and its AdamW state by parameter
                                 name, a file per rank that wrote it (its FSDP2 slices, or without --shard
                                 the whole tensors, written once); nothing is gathered on one process
    STUDENT.work/checkpoint.pt   small, written last by rank 0: that folder's name, the step, the schedule,
                                 every rank's sampler stream, the random states and the log so far

A resume reads only this rank's part of each tensor, cut for however many processes run now: a checkpoint of
2 sharded processes resumes in 1, and one of 1 in 2 sharded ones. The sampler streams are restored under the
number of processes that wrote them; under another they restart from each rank's seed (a warning says so, and
the log), so the samples, not the weights, differ from an uninterrupted run's.
"""
from __future__ import annotations

import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Protocol

import torch

from safesteer.errors import UserError


class Ranks(Protocol):
    """What a checkpoint needs of the processes (parallel.World is one): this rank, their number, a barrier
    and a gather."""
    rank: int
    size: int
    main: bool

    def barrier(self) -> None: ...

    def gather(self, obj) -> list: ...


def trained_state(model, opt) -> dict:
    """What trains and its AdamW state as torch.distributed.checkpoint takes them, keyed by parameter name:
    this rank's slices (sharded) or whole tensors. A load fills them in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    weights, opt_state = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}  # as parallel.trainable
    # a frozen weight tied to a trained one comes along (LoRA: a head tied to the embeddings): left out
    return {"model": {n: w for n, w in weights.items() if n in trains}, "opt": opt_state}


def checkpoint_io(fn, state: dict, folder: Path, world: Ranks) -> None:
    """torch.distributed.checkpoint's save or load (fn) of `state`; a single process runs it without a
    process group (no_dist), minus the warning that says so at every checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=folder, no_dist=world.size == 1)


def save_checkpoint(work: Path, student, opt, sched, step: int, gen, log: list[dict], world: Ranks) -> None:
    """work/weights-STEP/ (every rank its slices), then work/checkpoint.pt naming it (rank 0), then the
    previous folder removed: a run stopped at any moment keeps one whole checkpoint."""
    import torch.distributed.checkpoint as dcp
    folder = work / f"weights-{step}"
    if world.main:
        shutil.rmtree(folder, ignore_errors=True)  # left by a run stopped before naming it
    world.barrier()
    checkpoint_io(dcp.save, trained_state(student, opt), folder, world)
    gens = world.gather(gen.get_state())  # every rank's sampler stream, so that a resumed run draws the same
    if world.main:
        tmp = work / "checkpoint.tmp"
        torch.save({"weights": folder.name, "step": step, "sched": sched.state_dict(), "gens": gens,
                    "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "log": log}, tmp)
        tmp.replace(work / "checkpoint.pt")
        for old in work.glob("weights-*"):
            if old != folder:
                shutil.rmtree(old)
    world.barrier()  # no rank goes on, or stops, before the checkpoint is whole


def load_checkpoint(path: Path, student, opt, sched, gen, world: Ranks) -> tuple[int, list, dict | None]:
    """The run as checkpoint.pt left it, restored in place: weights, AdamW state, schedule, random streams.
    (step, log, note): the note, for the log, says the sampler streams restarted (None: they were restored)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    ck = torch.load(path, map_location="cpu", weights_only=False)  # small: the weights are in ck["weights"]
    if "weights" not in ck:
        raise UserError(f"--resume: {path} was written by an older distill.py; restart with --overwrite")
    state = trained_state(student, opt)
    checkpoint_io(dcp.load, state, path.parent / ck["weights"], world)
    set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["opt"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # a tied head: left out
    sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"])
    random.setstate(ck["py_rng"])
    writers = len(ck["gens"])
    if writers == world.size:
        gen.set_state(ck["gens"][world.rank])
        return ck["step"], ck["log"], None
    if world.main:
        print(f"warning: {path} was written by {writers} processes and is resumed by {world.size}: the "
              f"sampler streams restart from each rank's seed, so the samples are not an uninterrupted run's",
              file=sys.stderr)
    return ck["step"], ck["log"], {"from_step": ck["step"], "processes": world.size,
                                   "checkpoint_processes": writers,
                                   "sampler_streams": "restarted from each rank's seed"}
