"""SafeSteer inside TRL 1.16's DistillationTrainer: TRL's sampling, batching, optimiser and logging; the
method's teacher, loss and reduction. Needs the bench extra (requirements-bench.txt).

TRL's on-policy distillation samples one completion per dataset row from the student (`generate`), scores
prompt + completion under a teacher model and averages a per-token divergence. The port overrides the method
that computes the loss, `_compute_loss`, and the one that hands it each step's rows, to mark the anchors:

    teacher    πt = π0 + c·r: TRL's teacher model is a frozen copy of π0, steered by Stage 1's hook
               (safesteer.teacher) only while it scores the completions
    loss       collapsed (default), partial or full on S (safesteer.losses), on the logits of
               safesteer.forcing.completion_logits, through each row's first end-of-turn token (TRL is given
               chat.stop_token_ids as its eos ids, so it stops where the package's sampler stops)
    reduction  a mean over each sequence's positions, then over the step's sequences (TRL's own: a mean over
               the step's tokens, which weighs a sequence by its length)
    anchoring  optional: rows marked "anchor" are pulled toward π0 (no hook): L(harmful) + λ·L(anchors)

Where a step still differs from distill.train_step (tests/test_ports.py measures each):
    samples     TRL's `generate` draws from torch's global random stream, which the Trainer has drawn from
                before it samples (and draws from again to shuffle each step's rows); distill.py's sampler
                reads a generator of its own. So from the same seed the completions differ; with the global
                stream reseeded just before the first `generate`, they are distill.py's, token for token
    order       TRL shuffles a step's rows and adds its micro-batches in another order: on the same
                completions in one micro-batch the loss and gradients are distill.py's to the bit; after
                one step in two micro-batches 99.9% of the weights agree within 1e-7, the rest within 4e-6,
                where a gradient is as small as AdamW's eps and the first step, lr·g/(|g| + eps), magnifies
                its float noise
    metrics     TRL's entropy metric is not computed (its log shows none)

    from ports.trl_port import SafeSteerTrainer, config, dataset, load_run
    teacher, s_ids = load_run(student, tok, "runs/demo")
    steps = [(harmful[i:i + 4], []) for i in range(0, len(harmful), 4)]  # distill.py's P = 4, no anchors
    trainer = SafeSteerTrainer(student, teacher, s_ids, args=config("runs/demo/trl", rows_per_step=32),
                               processing_class=tok, train_dataset=dataset(steps, samples=8))
    trainer.train()
    trainer.save_student("runs/demo/student_trl")   # a directory evaluate.py reads
"""
import copy
from pathlib import Path

import torch
from datasets import Dataset
from trl import DistillationConfig, DistillationTrainer

from ports import plain_loop
from safesteer.chat import stop_token_ids
from safesteer.forcing import completion_logits, end_of_turn_mask
from safesteer.models import save_model_dir
from safesteer.teacher import Teacher


def load_run(student, tok, run_dir, coefficient: float | None = None):
    """(πt on a frozen copy of the student's π0, S) from a run directory: plain_loop.load_run."""
    return plain_loop.load_run(copy.deepcopy(student).requires_grad_(False).eval(), tok, run_dir, coefficient)


def config(output_dir, rows_per_step: int, micro_batch: int = 8, **overrides) -> DistillationConfig:
    """distill.py's recipe in TRL's names: AdamW at 1e-5, cosine with 10% warm-up, clip 1.0, temperature 1,
    top-p 1, no top-k, 64 new tokens; steps of rows_per_step = (P + A)·G rows read in order (and every
    column kept: TRL's remove_unused_columns=False keeps "anchor"); float32."""
    settings = dict(learning_rate=1e-5, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
                    max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=64,
                    per_device_train_batch_size=micro_batch,
                    gradient_accumulation_steps=rows_per_step // micro_batch, shuffle_dataset=False,
                    bf16=False, report_to="none", save_strategy="no",
                    chat_template_kwargs={"enable_thinking": False})  # as chat.render_chat renders
    return DistillationConfig(output_dir=str(output_dir), **{**settings, **overrides})


def dataset(steps: list[tuple[list[str], list[str]]], samples: int = 8) -> Dataset:
    """TRL's rows for distill.py's steps: per step its harmful prompts, then its anchor prompts, each G times
    (TRL samples one completion per row)."""
    prompts, anchor = [], []
    for harmful, anchors in steps:
        for text, is_anchor in [(p, False) for p in harmful] + [(a, True) for a in anchors]:
            prompts += [[{"role": "user", "content": text}]] * samples
            anchor += [is_anchor] * samples
    return Dataset.from_dict({"prompt": prompts, "anchor": anchor})


class SafeSteerTrainer(DistillationTrainer):
    """DistillationTrainer with the localized reverse KL on S toward πt = teacher (a safesteer Teacher
    whose model is a frozen copy of π0); rows with anchor=True toward π0 itself, weighted by λ."""

    def __init__(self, model, teacher: Teacher, s_ids, loss: str = "collapsed", anchor_weight: float = 0.5,
                 **trl_kwargs):
        self.steered = teacher
        self.s_ids, self.kind, self.anchor_weight = s_ids, loss, anchor_weight
        self.stop_ids = stop_token_ids(trl_kwargs["processing_class"])
        model.generation_config.eos_token_id = self.stop_ids  # TRL stops a row at these
        super().__init__(model=model, teacher_model=teacher.model, **trl_kwargs)

    def _generate_and_score_completions(self, inputs):
        """TRL's batch, plus each row's anchor flag and its weight in the step's loss: 1 / (harmful rows of
        the step), λ / (anchor rows), so that each group is a mean over its sequences as in distill.py."""
        out = super()._generate_and_score_completions(inputs)
        anchor = torch.tensor([bool(x.get("anchor", False)) for x in inputs], device=out["prompt_ids"].device)
        n_anchor = self.accelerator.gather(anchor.sum()).sum().clamp(min=1)
        n_harmful = self.accelerator.gather((~anchor).sum()).sum().clamp(min=1)
        # DDP averages the processes' gradients: scale up by their number, as TRL does for its token count
        weight = torch.where(anchor, self.anchor_weight / n_anchor, 1.0 / n_harmful)
        out["anchor"], out["weight"] = anchor, weight * self.accelerator.num_processes
        return out

    def _compute_loss(self, student, inputs, num_items_in_batch):
        ids, mask, comp = inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"]
        loss_mask = inputs["completion_mask"] * end_of_turn_mask(comp, self.stop_ids)  # [b, T]
        anchor = inputs["anchor"]
        student_logits = completion_logits(student, ids, mask, comp)  # [b, T, V]: [:, i] predicts comp[:, i]
        with torch.no_grad():
            self.teacher_model.eval()
            with self.steered.steer():
                teacher_logits = completion_logits(self.teacher_model, ids, mask, comp)
            if anchor.any():  # the anchor rows' target is π0: the same copy, no hook
                teacher_logits[anchor] = completion_logits(self.teacher_model, ids[anchor], mask[anchor],
                                                           comp[anchor])
        per_seq = plain_loop.sequence_losses(student_logits, teacher_logits, loss_mask,
                                             self.s_ids.to(student_logits.device), self.kind)  # [b]
        loss = (per_seq * inputs["weight"]).sum()
        return loss, torch.tensor(float("nan")), loss_mask.sum()  # TRL's entropy metric: not computed

    def save_student(self, path) -> None:
        """The student as a transformers directory with a safesteer.json, which evaluate.py lists by default
        when it lies in the run directory; written atomically."""
        info = {"loss": self.kind, "s_token_ids": self.s_ids.tolist(), "trainer": "ports/trl_port.py",
                "teacher": self.steered.describe(), "anchor_weight": self.anchor_weight}
        save_model_dir(self.model, self.processing_class, Path(path), extra_files={"safesteer.json": info})
