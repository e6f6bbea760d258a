"""Stage 3 around the method: its models at scale, its processes under torchrun, checkpoints, and records.

    torchrun --nproc-per-node 8 distill.py --out runs/x ...            # each process holds the whole model
    torchrun --nproc-per-node 8 distill.py --out runs/x ... --shard    # FSDP2: each holds 1/8 (sharding.py)

Models: full fine-tuning trains a float32 student beside a frozen copy of π0 that serves as πt (with the hook)
and π0; with --lora-rank one copy serves all three, adapters off being π0 (one GPU for 8B models). On CUDA
they compute in bf16: under autocast, or sharded by FSDP2's mixed precision (precision.py). --sample-batch N
samples a step's rows N at a time, each row with the random numbers it draws in one batch (sampling.RowDraws).
Processes: each rank samples its share of every step's prompts (prompts[rank::world]) with its own generator;
losses are weighted by the step's *global* number of sequences and gradients summed over ranks, so an update
is the same whatever the world size: one all_reduce per parameter (data parallelism written out), or with
--shard, FSDP2 units per decoder block holding 1/world of the weights, gradients and Adam states, gathered for
each forward and reduce-scattered (summed) after each backward. Every rank must then call the model equally
often: equal shares per step, and the sampler decodes until every rank's rows have ended. Sharded, the models
are built on the meta device and only rank 0 reads the weights, on the host (sharding.py). Checkpoints hold
each rank's slices and resume under any number of processes (checkpoints.py). Only rank 0 prints and writes;
without torchrun (WORLD_SIZE unset) every method here is a no-op.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from safesteer.scale.checkpoints import load_checkpoint, save_checkpoint
from safesteer.cli import positive_float, positive_int, seed_everything
from safesteer.errors import UserError
from safesteer.files import run_info, write_jsonl
from safesteer.models import load_model
from safesteer.scale.precision import DTYPES, computes_in_bf16, frozen_copy, training_autocast
from safesteer.teacher import Teacher, load_teacher
from safesteer.forcing import packing_path


# ----------------------------------------------------------------------------- the models: full or LoRA

@dataclass
class Models:
    """A run's models: the student πs and its tokenizer, πt (replaced at each refresh), π0, and Stage 1's
    direction.json (by which a refresh measures r again). build_models returns them as a tuple."""
    student: torch.nn.Module
    tok: object
    teacher: Teacher
    base: Teacher
    direction: dict


def build_student(args, device, on=None):
    """π0 as the student starts: float32, or (LoRA, peft) π0 in bf16 on CUDA with float32 adapters. on: where
    to build it if not on `device` (--shard: "meta" for the architecture alone, or the host; sharding.py)."""
    lora_bf16 = args.lora_rank and computes_in_bf16(device)
    student, tok = load_model(args.model, on or device, dtype=torch.bfloat16 if lora_bf16 else torch.float32,
                              chat_template=args.chat_template)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model
        cfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank, lora_dropout=0.0,
                         target_modules=args.lora_targets, task_type="CAUSAL_LM")
        student = get_peft_model(student, cfg)
    return student, tok


def build_models(args, out: Path, device, world: World | None = None):
    """(student, tok, πt, π0, direction.json). Full fine-tuning: a float32 student and a frozen float32 copy
    of π0 for πt and π0, computing as the student does (precision.frozen_copy). LoRA: one copy, adapters
    off is π0, adapters off + hook is πt. --shard: each copy sharded, and never whole on a device
    (sharding.py: built on meta, rank 0 reads the weights on the host and sends each rank its slice)."""
    lora = bool(args.lora_rank)
    if world is not None and world.sharded:
        from safesteer.scale.sharding import sharded_models
        student, frozen, tok = sharded_models(lambda on: build_student(args, device, on), device, world.main,
                                              lora)
    else:
        student, tok = build_student(args, device)
        frozen = student if lora else frozen_copy(student)
    base_ctx = student.disable_adapter if lora else contextlib.nullcontext
    system = Path(args.system).read_text().strip() if args.system else None
    teacher, dmeta = load_teacher(frozen, args.direction or out / "direction.safetensors", args.teacher,
                                  args.coefficient, system, base_ctx)
    return student, tok, teacher, Teacher(frozen, "base", base_context=base_ctx), dmeta


def enable_grad_checkpointing(student, lora: bool) -> None:
    """Recompute each block in backward instead of keeping its activations: less memory, the same numbers."""
    student.activation_checkpointing_enable()
    if lora:
        student.enable_input_require_grads()  # checkpointed blocks need an input that requires grad


# ----------------------------------------------------------------------------- processes

class World:
    """This process among the torchrun processes (rank, size), and the few collectives Stage 3 needs."""

    def __init__(self, device: torch.device, shard: bool = False):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if shard and self.size == 1:
            raise UserError("--shard splits the model over processes: run under torchrun with "
                            "--nproc-per-node >= 2")
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
        """This rank's part of a step's prompts: every world-th one from its rank (shares may differ by 1).
        `required`: a rank left with nothing to sample is an error (more processes than prompts per step)."""
        mine = items[self.rank::self.size]
        if required and items and not mine:
            raise UserError(f"{self.size} processes but {len(items)} prompts in a step: use at most "
                            f"--prompts-per-step processes")
        return mine

    def check_even(self, groups: list[list]) -> None:
        """Sharded, every rank must call the model equally often: each group must split evenly over ranks."""
        if self.sharded and any(len(g) % self.size for g in groups):
            raise UserError("--shard needs every step's prompts and anchors to split evenly over "
                            f"{self.size} processes (--prompts-per-step, --anchor-per-step, and the "
                            "prompt count)")

    def generator(self, seed: int) -> torch.Generator:
        """Seed torch and Python; the sampler's generator: rank 0 draws as a single process would, every other
        rank its own stream."""
        gen = seed_everything(seed)
        if self.rank:
            gen.manual_seed(seed * 1_000_003 + self.rank)
        return gen

    def autocast(self, device):
        """Stage 3's forward passes computed in bf16 on CUDA: autocast, or sharded FSDP2's mixed precision."""
        return training_autocast(device, self.sharded)

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

    def sum_gradients(self, params) -> None:
        """Σ over ranks of each gradient, in place: every rank then holds the gradient of the global loss.
        Sharded, FSDP2 has already reduce-scattered the sum during the backward (sharding.shard)."""
        if self.size == 1 or self.sharded:
            return
        for p in params:
            if p.grad is None:  # a rank whose micro-batches never reached p still takes part in the sum
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def clip_grad_norm(self, params: list, clip: float) -> torch.Tensor:
        """Σ of the gradients over ranks, then their global norm clipped to `clip`; the norm before."""
        self.sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, clip)  # sharded: a DTensor, the global norm
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

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
        """Leave the process group, every rank at once: a rank that tears gloo down while another still
        works in it can abort ("terminate called without an active exception", seen once at the end of a
        sharded run)."""
        if self.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_interval(every: int | None, refresh_every: int | None) -> int:
    """--checkpoint-every, by default 5, or with --refresh-every N the first multiple of N from 5: a resumed
    run rebuilds πt from the student, so checkpoints must fall on refreshes."""
    if every is None:
        every = -(-5 // refresh_every) * refresh_every if refresh_every else 5
    if refresh_every and every % refresh_every:
        raise UserError("--checkpoint-every must be a multiple of --refresh-every")
    return every


@dataclass
class Loop:
    """What the steps run with besides the models: the optimiser and its schedule, the sampler's generator,
    the processes, and where (work) and how often the run is checkpointed."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator | None = None
    world: World = field(default_factory=lambda: World(torch.device("cpu")))
    work: Path | None = None  # OUT/STUDENT.work: checkpoint.pt, weights-STEP/, the running train_log.jsonl
    checkpoint_every: int = 5
    recipe: dict | None = None  # what must not change on --resume (recipe_record), saved in each checkpoint
    resumed: dict | None = None  # load_checkpoint's note, until the next step's record carries it
    changes: dict = field(default_factory=dict)  # {option: (then, now)} that --resume-changing let differ
    save_at: frozenset = frozenset()  # --save-at: after these steps keep(student, step, log) saves a copy
    keep: object = None

    def open(self, student, resume: bool, allowed=()) -> tuple[int, list[dict]]:
        """Make the work dir; (first step, log so far): (0, []), or with --resume the checkpoint's, with the
        weights, optimiser, schedule and random streams restored, once the recipe is the checkpoint's (or
        differs only in `allowed`)."""
        self.work.mkdir(parents=True, exist_ok=True)
        if not resume:
            return 0, []
        start, log, self.resumed, self.changes = load_checkpoint(self.work, student, self.opt, self.sched,
                                                                 self.gen, self.world, self.recipe, allowed)
        return start, log

    def resume_record(self, start: int) -> dict:
        """For safesteer.json: what --resume-changing let differ, and from which step (nothing otherwise)."""
        if not self.changes:
            return {}
        return {"resumed_with_changes": {"from_step": start, **{k: list(v) for k, v in self.changes.items()}}}

    def after_step(self, student, log: list[dict], step: int, n_steps: int) -> None:
        """After step `step` (from 1): the log so far written (rank 0), and every N steps but the last a
        checkpoint. The first step after a resume under another number of processes records it."""
        if self.resumed:
            log[-1]["resumed"], self.resumed = self.resumed, None
        if self.world.main:
            write_jsonl(self.work / "train_log.jsonl", log)
        if step in self.save_at and self.world.main:
            self.keep(student, step, log)
        if step % self.checkpoint_every == 0 and step < n_steps:
            save_checkpoint(self.work, student, self.opt, self.sched, step, self.gen, log, self.world,
                            self.recipe)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """What the optimiser updates, by name: every weight, or (LoRA) the adapters."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def unsharded(model, world: World, rebuild):
    """Rank 0: a plain model built by rebuild() holding all the sharded model's weights; other ranks: None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    plain = rebuild()
    plain.load_state_dict(weights)
    return plain


# ----------------------------------------------------------------------------- what the run prints and saves

def startup_summary(args, steps: int, n_s: int, models: Models, anchored: bool, start: int,
                    world: World) -> str:
    """The lines printed before the first step: the plan, the loss, |S|, πt, what trains, and the extras;
    then how the student scores its samples (forcing.packing_path)."""
    n_train = sum(p.numel() for p in trainable(models.student).values())
    text = f"distilling {steps} steps x {args.prompts_per_step} prompts x {args.samples} samples"
    text += f", loss {args.loss} ({args.loss_impl}), |S| = {n_s}"
    if args.random_tokens:
        text += " (random)"
    text += f"; teacher {models.teacher.describe()}; {n_train / 1e6:.1f}M trainable weights"
    text += " (LoRA)" if args.lora_rank else ""
    if anchored:
        text += f"; anchor {args.anchor_per_step} x {args.samples} harmless samples, λ = {args.anchor_weight}"
    if start:
        text += f"; resuming at step {start}"
    if world.size > 1:
        text += f"; {world.size} processes" + (", sharded (FSDP2)" if world.sharded else "")
    return text + f"\nstudent scores samples {packing_path(models.student, args.pack_samples)}"


def student_info(args, models: Models, s_ids, tokens_file: Path, steps: int, world: World,
                 seconds: float) -> dict:
    """safesteer.json: the loss, S, πt, the arguments and the versions that made the student."""
    teacher = {"kind": args.teacher, "file": str(args.direction or Path(args.out) / "direction.safetensors"),
               "layer": models.direction["layer"], "coefficient": models.teacher.coefficient,
               "system": models.teacher.system}
    s_tokens = [models.tok.decode([i]) for i in s_ids.tolist()]
    return {"loss": args.loss, "random_tokens": args.random_tokens, "s_token_ids": s_ids.tolist(),
            "s_tokens": s_tokens, "tokens_file": str(tokens_file), "teacher": teacher,
            "refresh_every": args.refresh_every, "steps": steps, "lora_rank": args.lora_rank,
            "world_size": world.size, "base_model": args.model, "args": vars(args), "seconds": seconds,
            **run_info()}


def peak_memory_mb(device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on the CPU."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def final_summary(log: list[dict], seconds: float, final_dir: Path, lora: bool) -> str:
    """The lines printed at the end: loss and sampled refusal at the first and last step, time, memory."""
    lines = []
    if log:
        first, last = log[0], log[-1]
        loss = f"loss {first['loss']:.4f} -> {last['loss']:.4f}"
        refusal = f"sampled refusal {first['sampled_refusal']:.2f} -> {last['sampled_refusal']:.2f}"
        speed = f"{sum(r['step_seconds'] for r in log) / len(log):.1f} s/step"
        memory = f"peak memory {max(r['peak_memory_mb'] for r in log):.0f} MB"
        lines.append(f"{loss}; {refusal}; {speed}; {memory}")
    adapter = ", adapter/" if lora else ""
    lines.append(f"took {seconds:.0f} s; wrote {final_dir} (model, safesteer.json, train_log.jsonl{adapter})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command line

def add_scale_args(p) -> None:
    """--help's last group: what lets Stage 3 train a big model and survive being stopped."""
    scale = p.add_argument_group("scale: LoRA, sharding, checkpoints")
    scale.add_argument("--lora-rank", type=positive_int,
                       help="train LoRA adapters of this rank (peft), not all weights (default: all weights)")
    scale.add_argument("--lora-alpha", type=positive_float, help="LoRA scale α (default: 2 x rank)")
    scale.add_argument("--lora-targets", nargs="+", help="modules given adapters",
                       default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    scale.add_argument("--shard", action="store_true", help="under torchrun: FSDP2, each process holds 1/N "
                       "of the weights, gradients and Adam states (for a model that does not fit one device)")
    scale.add_argument("--save-dtype", choices=list(DTYPES), default="float32", help="the saved student's "
                       "weights (bf16 halves the file but rounds away updates smaller than its step)")
    scale.add_argument("--sample-batch", type=positive_int, metavar="N",
                       help="sample a step's (P + A) x G rows at most N at a time, each with the random "
                            "numbers of one batch: the same samples, less memory (default: all at once)")
    scale.add_argument("--no-grad-checkpointing", action="store_true",
                       help="keep activations, not recomputing them in backward (more memory, same numbers)")
    scale.add_argument("--checkpoint-every", type=positive_int, help="save a resumable checkpoint every N "
                       "steps (default: 5, or with --refresh-every the first multiple of it from 5)")
    scale.add_argument("--save-at", nargs="+", type=positive_int, metavar="STEP", default=[],
                       help="also keep the student after these steps, as OUT/STUDENT-stepN (loadable, LoRA "
                            "merged), from a copy: the run itself is unchanged (default: none)")
    scale.add_argument("--resume", action="store_true", help="continue from OUT/STUDENT.work/checkpoint.pt")
    scale.add_argument("--resume-changing", nargs="+", metavar="OPTION", default=[],
                       help="with --resume: options (e.g. max-steps) allowed to differ from the checkpoint's "
                            "recipe; the change is recorded in safesteer.json (default: none may differ)")
