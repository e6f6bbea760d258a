"""Stage 3's checkpoints: every rank writes its own slices, and any number of processes reads them back.

    STUDENT.work/weights-STEP/   torch.distributed.checkpoint: what trains and its AdamW state by parameter
                                 name, a file per rank that wrote it (its FSDP2 slices, or without --shard
                                 the whole tensors, written once); nothing is gathered on one process
    STUDENT.work/checkpoint.pt   small, written last by rank 0: that folder's name and each of its files'
                                 sha256, the step, the schedule, every rank's sampler stream, the random
                                 states, the log so far and the recipe (what must not change on --resume)
    STUDENT.work/checkpoint.prev.pt   the one before, with its folder: used when the newest is damaged

A resume reads only this rank's part of each tensor, cut for however many processes run now: a checkpoint of
2 sharded processes resumes in 1, and one of 1 in 2 sharded ones. The sampler streams are restored under the
number of processes that wrote them; under another they restart from each rank's seed (a warning says so, and
the log), so the samples, not the weights, differ from an uninterrupted run's.
"""
from __future__ import annotations

import pickle
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Protocol

import torch

from safesteer.errors import UserError
from safesteer.files import sha256


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


def save_checkpoint(work: Path, student, opt, sched, step: int, gen, log: list[dict], world: Ranks,
                    recipe: dict | None = None) -> None:
    """work/weights-STEP/ (every rank its slices), then work/checkpoint.pt naming it, with each file's sha256
    and the run's recipe (rank 0), the one before kept as checkpoint.prev.pt with its folder: a run stopped at
    any moment keeps a whole checkpoint, and a damaged one is found on resume. A failed write (a full disk)
    leaves no partial folder and the earlier checkpoints as they were."""
    import torch.distributed.checkpoint as dcp
    folder = work / f"weights-{step}"
    if world.main:
        shutil.rmtree(folder, ignore_errors=True)  # left by a run stopped before naming it
    world.barrier()
    try:
        checkpoint_io(dcp.save, trained_state(student, opt), folder, world)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"could not write the checkpoint of step {step} in {folder} ({e}); the earlier "
                        "checkpoint is kept") from None
    gens = world.gather(gen.get_state())  # every rank's sampler stream, so that a resumed run draws the same
    world.barrier()  # every rank's files are written before rank 0 hashes them
    if world.main:
        tmp = work / "checkpoint.tmp"
        state = {"weights": folder.name, "step": step, "sched": sched.state_dict(), "gens": gens,
                 "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "log": log,
                 "files": manifest(folder), "recipe": recipe}
        try:
            torch.save(state, tmp)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"could not write {tmp} ({e}); the earlier checkpoint is kept") from None
        if (work / "checkpoint.pt").is_file():
            (work / "checkpoint.pt").replace(work / "checkpoint.prev.pt")
        tmp.replace(work / "checkpoint.pt")
        keep = {folder.name, _weights_of(work / "checkpoint.prev.pt")}
        for old in work.glob("weights-*"):
            if old.name not in keep:
                shutil.rmtree(old)
    world.barrier()  # no rank goes on, or stops, before the checkpoint is whole


def manifest(folder: Path) -> dict[str, str]:
    """{file name: sha256} of a checkpoint's folder: what a resume checks before it reads a byte."""
    return {f.name: sha256(f) for f in sorted(folder.iterdir())}


def _weights_of(path: Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["weights"]
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
        return None


def read_checkpoint(work: Path) -> tuple[dict, Path]:
    """The newest checkpoint whose files are whole: checkpoint.pt, or, if it or a file it names is damaged,
    checkpoint.prev.pt (with a warning that names the damaged file). (checkpoint, its weights folder)"""
    problems = []
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        path = work / name
        if not path.is_file():
            continue
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)  # small: the weights are beside it
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            problems.append(f"{path} is damaged ({str(e).splitlines()[0][:80]})")
            continue
        if "weights" not in ck or "files" not in ck:
            raise UserError(f"--resume: {path} was written by an older distill.py; restart with --overwrite")
        folder = work / ck["weights"]
        bad = [f for f, digest in ck["files"].items()
               if not (folder / f).is_file() or sha256(folder / f) != digest]
        if bad:
            problems.append(f"{folder / bad[0]} is damaged or missing (its sha256 differs from {path}'s)")
            continue
        for problem in problems:
            print(f"warning: {problem}; resuming from {path} (step {ck['step']})", file=sys.stderr)
        return ck, folder
    if problems:
        raise UserError(f"--resume: {problems[0]}, and no earlier whole checkpoint is kept; restart with "
                        "--overwrite")
    raise UserError(f"--resume: no checkpoint in {work}")


def check_recipe(saved: dict | None, now: dict | None, allowed=()) -> dict:
    """A resume must train with the recipe that started the run: {option: (then, now)} of the differences
    --resume-changing allows, and a one-line error for any other."""
    if saved is None or now is None:
        return {}
    keys = sorted(set(saved) | set(now))
    changed = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    refused = [k for k in changed if k not in allowed]
    if refused:
        k = refused[0]
        flag = "--" + k.replace("_", "-")
        more = f" (and {len(refused) - 1} more: {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise UserError(f"--resume: {flag} was {changed[k][0]!r} when the run started, now "
                        f"{changed[k][1]!r}{more}; resume with the run's recipe, or pass --resume-changing "
                        f"{k.replace('_', '-')} to train on with the change recorded")
    return changed


def load_checkpoint(work: Path, student, opt, sched, gen, world: Ranks, recipe: dict | None = None,
                    allowed=()) -> tuple[int, list, dict | None, dict]:
    """The run as its newest whole checkpoint left it, restored in place: weights, AdamW state, schedule,
    random streams, after checking the recipe. (step, log, note, changes): the note, for the log, says the
    sampler streams restarted (None: they were restored); changes: what --resume-changing let differ."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    ck, folder = read_checkpoint(work)
    changes = check_recipe(ck.get("recipe"), recipe, allowed)
    state = trained_state(student, opt)
    checkpoint_io(dcp.load, state, folder, world)
    set_state_dict(student, opt, model_state_dict=state["model"], optim_state_dict=state["opt"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # a tied head: left out
    sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"])
    random.setstate(ck["py_rng"])
    writers = len(ck["gens"])
    if writers == world.size:
        gen.set_state(ck["gens"][world.rank])
        return ck["step"], ck["log"], None, changes
    if world.main:
        print(f"warning: {work / 'checkpoint.pt'} was written by {writers} processes and is resumed by "
              f"{world.size}: the sampler streams restart from each rank's seed, so the samples are not an "
              "uninterrupted run's", file=sys.stderr)
    return ck["step"], ck["log"], {"from_step": ck["step"], "processes": world.size,
                                   "checkpoint_processes": writers,
                                   "sampler_streams": "restarted from each rank's seed"}, changes
