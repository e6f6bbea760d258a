"""Stage 3's teacher schedules from the authors' code, beside the paper's fixed πt (distill.py reads them).

    --refresh-every N    a hard copy: every N steps πt := the current student + c·r, r measured again on it
                         by Stage 1's rule at Stage 1's block; S never changes              (refresh_teacher)
    --teacher-ema α      the authors' schedule (their scripts/run.sh: --freeze_teacher False
                         --update_refusal_vector True --freeze_safe_token False; ref_model_mixup_alpha 0.01,
                         ref_model_sync_steps 1). After every optimiser step πt's weights follow the student,
                             θt ← (1 − α)·θt + α·θs                                            (ema_update)
                         and every --refresh-tokens-every N steps (theirs: 1) r is measured again on θt
                         (hook off) and S selected again by Stage 2's rule on θt with the new hook against θt
                         without it (select_tokens.select_again, which distill.py hands the schedule: the
                         package never imports a stage); each refresh is logged in train_log.jsonl.

π0 never moves: it stays anchoring's target. With full fine-tuning πt is a third model, a float32 copy of the
student (one more copy of the weights); with LoRA θt is a second set of adapters, swapped in whenever πt runs.
The authors differ in three ways we keep on purpose: they reselect r's block and position at every refresh
(their hook stays on the block chosen first all the same; we keep Stage 1's block and position), they average
in
bf16 (an update α·(θs − θt) below bf16's rounding is lost; ours is float32), and each refresh draws the
teacher's samples from the running random stream (ours from Stage 2's seed: S moves only when θt does).

Both schedules check before step 1 that they can refresh: Stage 1's and Stage 2's settings are recorded, and
their prompt files are found wherever the run directory now is (directions.find_prompt_file).
"""
from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from safesteer.cli import fraction, positive_int
from safesteer.errors import UserError
from safesteer.files import load_json, read_prompts, truncate_prompts
from safesteer.directions import find_prompt_file, recompute_direction, refresh_inputs
from safesteer.scale.parallel import trainable
from safesteer.teacher import Teacher

def add_schedule_args(group) -> None:
    """The teacher schedules' options, in --help's group of the authors' variants."""
    group.add_argument("--refresh-every", type=positive_int, metavar="N",
                       help="every N steps πt becomes the current student + c·r, r measured again on it at "
                            "Stage 1's block; S stays (a hard copy; default: never)")
    group.add_argument("--teacher-ema", type=fraction, metavar="ALPHA",
                       help="the authors' schedule: after every step θt ← (1 − α)·θt + α·θs (their "
                            "ref_model_mixup_alpha, 0.01), r and S measured again on θt every "
                            "--refresh-tokens-every steps; full fine-tuning keeps one more copy of the "
                            "weights; with LoRA the average is taken of A and B separately, which is not the "
                            "average of the merged update B·A (default: off)")
    group.add_argument("--refresh-tokens-every", type=positive_int, metavar="N", default=1,
                       help="with --teacher-ema: r and S measured again every N steps (authors: 1)")
    group.add_argument("--refresh-prompts", metavar="DIR",
                       help="a folder holding Stage 1's and Stage 2's prompt files by name, searched first "
                            "(default: the run directory, the recorded path, then data/)")


# ----------------------------------------------------------------------------- the hard copy

@contextlib.contextmanager
def swapped_weights(model, params: dict, values: dict):
    """Run `model` (in eval mode) with `values` in place of `params`, then swap back (a swap is its own
    inverse): a frozen snapshot of a training model costs a copy of what trains (distill --refresh-every)."""
    def swap():
        with torch.no_grad():
            for name, p in params.items():
                held = p.detach().clone()
                p.copy_(values[name])
                values[name].copy_(held)
    training = model.training
    swap()
    model.eval()
    try:
        yield
    finally:
        model.train(training)
        swap()


def refresh_teacher(student, tok, teacher: Teacher, dmeta: dict) -> Teacher:
    """πt := the student as it is now + c·r, r measured again on it by Stage 1's rule at its block (authors'
    update_refusal_vector). What trains is copied now and swapped in whenever πt runs, so πt stays fixed
    until the next refresh; π0 (anchoring's target) never changes."""
    params = trainable(student)
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    training = student.training
    vec = recompute_direction(student.eval(), tok, dmeta) if teacher.kind == "hook" else None
    student.train(training)
    return Teacher(student, teacher.kind, vec, teacher.layer, teacher.coefficient, teacher.system,
                   base_context=lambda: swapped_weights(student, params, snapshot))


# ----------------------------------------------------------------------------- the authors' schedule

@torch.no_grad()
def ema_update(ema: dict, params: dict, alpha: float) -> None:
    """θt ← (1 − α)·θt + α·θs for each trained weight, in place (their SyncRefModel callback)."""
    for name, p in params.items():
        ema[name].mul_(1 - alpha).add_(p.detach().to(ema[name].dtype), alpha=alpha)


class EmaTeacher:
    """πt as an exponential moving average of the student, with r and S refreshed on it (the authors')."""

    def __init__(self, student, tok, teacher: Teacher, s_ids, dmeta: dict, stage2: dict, prompts: list[str],
                 alpha: float, every: int, lora: bool, reselect):
        self.student, self.tok, self.alpha, self.every = student, tok, alpha, every
        self.reselect = reselect  # Stage 2's rule: (model, tok, teacher, settings, prompts) -> its selection
        self.dmeta, self.stage2, self.prompts = dmeta, stage2, prompts
        self.params = trainable(student)
        if lora:
            self.model = student  # LoRA: θt is a second set of adapters, swapped in when πt runs
            self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        else:  # full fine-tuning: πt is a third model, a float32 copy of the student (π0 at the start)
            self.model = copy.deepcopy(student).eval()
            self.ema = {n: p for n, p in self.model.named_parameters() if n in self.params}
            self.model.requires_grad_(False)
        self.kind, self.layer, self.c, self.system = (teacher.kind, teacher.layer, teacher.coefficient,
                                                      teacher.system)
        self.set(teacher.vector, s_ids)

    def weights(self):
        """θt in the model: the copy as it is, or the averaged adapters swapped into the student."""
        if self.model is self.student:
            return swapped_weights(self.student, self.params, self.ema)
        return contextlib.nullcontext()

    def set(self, vector, s_ids) -> None:
        self.vector, self.s_ids = vector, s_ids
        self.teacher = Teacher(self.model, self.kind, vector, self.layer, self.c, self.system,
                               base_context=self.weights)

    def refresh(self) -> dict:
        """r measured again on θt (hook off), then S selected on θt with the new hook; what changed."""
        t0, old_r, old_s = time.time(), self.vector, self.s_ids
        with self.weights():  # θt in place; the Teacher below must not swap again
            model = self.model.eval()
            r = recompute_direction(model, self.tok, self.dmeta) if self.kind == "hook" else None
            plain = Teacher(model, self.kind, r, self.layer, self.c, self.system)
            sel = self.reselect(model, self.tok, plain, self.stage2, self.prompts)
        self.set(r, sel["ids"].to(old_s.device))
        ids, shared = self.s_ids.tolist(), len(set(self.s_ids.tolist()) & set(old_s.tolist()))
        rec = {"s_token_ids": ids, "s_tokens": [self.tok.decode([i]) for i in ids], "s_shared": shared,
               "s_overlap": shared / max(len(old_s), 1), "coverage": sel["coverage"]}
        if r is not None:
            rec["direction_cosine"] = torch.nn.functional.cosine_similarity(r, old_r.to(r), dim=0).item()
            rec["direction_norm"] = r.norm().item()
        return {**rec, "seconds": round(time.time() - t0, 3)}

    def after_step(self, step: int, n_steps: int, loop) -> dict:
        """After optimiser step `step` (from 1): the average, the refresh when due (not after the last step),
        and with each checkpoint θt, r and S saved beside it. What goes into the step's log record."""
        ema_update(self.ema, self.params, self.alpha)
        rec = {}
        if step % self.every == 0 and step < n_steps:
            rec["teacher_refresh"] = self.refresh()
        if step % loop.checkpoint_every == 0 and step < n_steps and loop.world.main:
            self.save(loop.work, step)
        return rec

    def save(self, work: Path, step: int) -> None:
        """work/teacher_ema-STEP.pt, written before the checkpoint of that step; the last two are kept, so the
        one a checkpoint needs survives a stop between the two writes."""
        state = {"step": step, "ema": {n: t.detach().cpu() for n, t in self.ema.items()},
                 "vector": self.vector, "s_ids": self.s_ids.cpu()}
        tmp = work / f".teacher_ema-{step}.tmp"
        torch.save(state, tmp)
        tmp.replace(work / f"teacher_ema-{step}.pt")
        for old in sorted(work.glob("teacher_ema-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
            old.unlink()

    def load(self, work: Path, step: int) -> None:
        path = work / f"teacher_ema-{step}.pt"
        if not path.is_file():
            raise UserError(f"--resume: {path} not found (--teacher-ema's state at the checkpoint's step)")
        state = torch.load(path, weights_only=False)
        with torch.no_grad():
            for n, t in state["ema"].items():
                self.ema[n].copy_(t)
        self.set(state["vector"], state["s_ids"].to(self.s_ids.device))


def stage2_settings(tokens_file: Path, folders: list[Path], tok, max_prompt_tokens: int):
    """safety_tokens.json's Stage 2 rule and its prompts, found now (or a one-line error before step 1)."""
    settings = load_json(tokens_file).get("settings") or {}
    need = {"score", "aggregate", "k", "k_vote", "prob_floor", "samples", "horizon", "prompts", "n_prompts",
            "seed"}
    if not need <= settings.keys():
        raise UserError(f"{tokens_file} records no Stage 2 settings (made by hand?): cannot select S again")
    if settings.get("contrast"):
        raise UserError("--teacher-ema does not yet select S again with Stage 2's --contrast")
    path = find_prompt_file(settings["prompts"], settings["n_prompts"], folders, "Stage 2's prompts")
    prompts = read_prompts(path, settings["n_prompts"], settings["seed"])
    return settings, truncate_prompts(tok, prompts, max_prompt_tokens, path)


def start_schedule(args, models, s_ids, tokens_file: Path, out: Path, reselect) -> EmaTeacher | None:
    """Before step 1: what a refresh will need, checked and found; with --teacher-ema, θt started.
    reselect(model, tok, teacher, settings, prompts): Stage 2's selection again
    (select_tokens.select_again)."""
    if args.refresh_every and args.teacher_ema is not None:
        raise UserError("--refresh-every and --teacher-ema are two teacher schedules: choose one")
    if not args.refresh_every and args.teacher_ema is None:
        return None
    folders = [Path(args.refresh_prompts)] if args.refresh_prompts else []
    direction = Path(args.direction or out / "direction.safetensors")
    folders.append(direction if direction.is_dir() else direction.parent)  # the run's own copies
    if models.teacher.kind == "hook":
        models.direction = refresh_inputs(models.direction, folders)
    if args.teacher_ema is None:
        return None
    if args.shard or args.random_tokens:
        raise UserError("--teacher-ema works without --shard and without --random-tokens")
    stage2, prompts = stage2_settings(tokens_file, folders, models.tok, args.max_prompt_tokens)
    return EmaTeacher(models.student, models.tok, models.teacher, s_ids, models.direction, stage2, prompts,
                      args.teacher_ema, args.refresh_tokens_every, lora=bool(args.lora_rank),
                      reselect=reselect)


def resume_schedule(models, ema: EmaTeacher | None, work: Path, start: int,
                    refresh_every: int | None) -> None:
    """On --resume, πt as it was at the checkpoint: the moving average saved beside it, or (hard refresh) the
    student + c·r again, since checkpoints fall on refresh steps."""
    if ema and start:
        ema.load(work, start)
    if refresh_every and start >= refresh_every:
        models.teacher = refresh_teacher(models.student, models.tok, models.teacher, models.direction)
