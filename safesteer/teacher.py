"""The teacher πt as one object: the hook of Stage 1's direction, the authors' safety system prompt, or π0.

    Teacher         `with teacher.steer(): model(...)` runs the model as the teacher
    load_teacher    a Teacher from Stage 1's files (c from direction.json unless given)
"""
from __future__ import annotations

import contextlib

from safesteer.artifacts import load_direction
from safesteer.chat import encode_chats
from safesteer.hooks import add_vector, check_layer

# The prompt-based teacher (authors' "via prompt" variant): π0 told to refuse, instead of the hook.
SAFETY_SYSTEM_PROMPT = ("You are a responsible assistant. If a request could help someone cause harm or "
                        "break the law, refuse it clearly and briefly, and say that you cannot help with it.")


class Teacher:
    """πt as one object: `with teacher.steer(): model(...)` runs the model as the teacher, on the context that
    `teacher.encode(tok, prompts)` renders.

        hook    π0 + c·r at block l (Stage 1's direction), plain prompt          (the method)
        prompt  π0 behind a safety system prompt, no hook                          (authors' "via prompt")
        base    π0 itself                                                          (anchoring's target)

    `base_context` is entered first on every use; with LoRA it switches the adapters off, so the one copy of
    the base weights serves as π0, πt and (adapters on) the student.
    """

    def __init__(self, model, kind: str = "hook", vector=None, layer: int | None = None,
                 coefficient: float = 1.0, system: str | None = None, base_context=contextlib.nullcontext):
        if kind not in ("hook", "prompt", "base"):
            raise ValueError(f"unknown teacher kind {kind!r}")
        self.model, self.kind, self.vector = model, kind, vector
        self.layer, self.coefficient = layer, coefficient
        self.system = (system or SAFETY_SYSTEM_PROMPT) if kind == "prompt" else None
        self.base_context = base_context

    @contextlib.contextmanager
    def steer(self):
        hook = contextlib.nullcontext()
        if self.kind == "hook":
            hook = add_vector(self.model, self.layer, self.vector, self.coefficient)
        with self.base_context(), hook:  # the hook is placed after base_context
            yield

    def encode(self, tok, prompts: list[str], device="cpu"):
        """The teacher's context for each prompt: [b, plen] ids and mask (left-padded)."""
        return encode_chats(tok, prompts, system=self.system, device=device)

    def describe(self) -> str:
        if self.kind == "hook":
            return f"hook at block {self.layer}, c = {self.coefficient}, |r| = {self.vector.norm():.2f}"
        return "safety system prompt" if self.kind == "prompt" else "π0 (no steering)"


def load_teacher(model, direction_path, kind: str = "hook", coefficient: float | None = None,
                 system: str | None = None, base_context=contextlib.nullcontext) -> tuple[Teacher, dict]:
    """Teacher from Stage 1's files. c is direction.json's coefficient unless one is given (the one place
    where that fallback lives). Returns (teacher, direction.json)."""
    vec, meta = load_direction(direction_path, model)
    check_layer(model, int(meta["layer"]))
    c = float(meta.get("coefficient", 1.0)) if coefficient is None else coefficient
    return Teacher(model, kind, vec, int(meta["layer"]), c, system, base_context), meta
