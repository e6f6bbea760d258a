"""The method's shared machinery: the steering hooks that make the teacher πt, and the sampler.

Three stages need the same few pieces, so they live here once:

    blocks        decoder_layers, check_layer       where the residual stream of each family is
    hooks         add_vector (πt = π0 + c·r at block l); replace_hidden, for any pre-hook (also
                  directions.ablate_direction's)
    the teacher   load_direction, Teacher, load_teacher   πt as one object: hook, safety system prompt, or π0
    sampling      prefill (each distinct prompt once, the shared prefix once), sample (a KV-cached decoding
                  loop, by hand; N rows at a time with one batch's random numbers, RowDraws),
                  decode_completions; teacher forcing (scoring given completions) is in forcing.py

What is plumbing (files, loading, templates, the CLI) is in common.py; the math of each stage is in its file.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from chat import encode_chats
from common import UserError, load_json

# The prompt-based teacher (authors' "via prompt" variant): π0 told to refuse, instead of the hook.
SAFETY_SYSTEM_PROMPT = ("You are a responsible assistant. If a request could help someone cause harm or "
                        "break the law, refuse it clearly and briefly, and say that you cannot help with it.")


# ----------------------------------------------------------------------------- blocks and hooks

def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks: model.layers for Llama/Qwen/Gemma/Mistral (also under a peft wrapper), GPT-2's
    transformer.h, NeoX's gpt_neox.layers."""
    for path in ("model.layers", "model.model.layers", "base_model.model.model.layers", "transformer.h",
                 "gpt_neox.layers", "model.decoder.layers", "model.language_model.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}")


def check_layer(model, layer: int) -> int:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise UserError(f"layer {layer} is out of range: the model has blocks 0..{n - 1}")
    return layer


def replace_hidden(args, kwargs, fn):
    """Apply fn to a block's hidden_states input, wherever the caller put it (transformers 5 passes it by
    keyword, older releases positionally)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


@contextlib.contextmanager
def add_vector(model, layer: int, vector: torch.Tensor, coefficient: float = 1.0):
    """πt: add c·r to the input of decoder block `layer` at every position (prompt and each cached step).

    A pre-hook, so it sees the residual stream before the block; always removed on exit. The vector moves to
    the block's device, so a model split over devices (device_map) is steered at the right place.
    """
    check_layer(model, layer)
    hidden = model.config.get_text_config().hidden_size
    if vector.shape != (hidden,):
        raise UserError(f"direction has shape {tuple(vector.shape)}, the model's hidden size is {hidden}")
    delta = coefficient * vector

    def hook(module, args, kwargs):
        return replace_hidden(args, kwargs, lambda h: h + delta.to(h.device, h.dtype))

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- the teacher

def load_direction(path, model) -> tuple[torch.Tensor, dict]:
    """Stage 1's r and its direction.json (same folder), checked against the model it will steer."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        path = path / "direction.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: direction file not found "
                        "(run extract_direction.py first, or pass --direction)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a safetensors file ({e})") from None
    if "direction" not in tensors:
        raise UserError(f"{path}: holds no tensor named 'direction'")
    meta = load_json(path.with_suffix(".json"))
    vec = tensors["direction"].float()
    hidden = model.config.get_text_config().hidden_size
    if vec.shape != (hidden,):
        raise UserError(f"{path}: direction has size {tuple(vec.shape)}, the model's hidden size is "
                        f"{hidden} (made for another model?)")
    if "layer" not in meta:
        raise UserError(f"{path.with_suffix('.json')}: no 'layer' field")
    return vec.to(next(model.parameters()).device), meta


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


# ----------------------------------------------------------------------------- sampler

def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering: removed tokens get -inf. logits: [batch, vocab]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def has_sliding_window(model) -> bool:
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None)
    return bool(any(t != "full_attention" for t in types) if types else getattr(cfg, "sliding_window", None))


def shared_prefix_len(rows: list[list[int]], model, keep: int = 1) -> int:
    """How many leading tokens every row has in common (the chat template's opening, e.g. SmolLM2's 24-token
    system turn), leaving at least `keep` tokens of each row after it; 0 under sliding-window attention,
    where computing them once is not exact (the mask counts cache slots; the shared layout moves padding)."""
    if has_sliding_window(model):
        return 0
    n = 0
    while all(len(r) > n + keep and r[n] == rows[0][n] for r in rows):
        n += 1
    return n


class Prefilled(NamedTuple):
    logits: torch.Tensor      # [b, V] float32: the last prompt position's, which predicts the first new token
    cache: object             # the KV cache, laid out [shared prefix | left padding | rest of the prompt]
    cache_mask: torch.Tensor  # [b, s'] the cache's attention mask
    next_pos: torch.Tensor    # [b, 1] the position id of the first new token
    hidden: tuple | None      # last_hidden=k: the input of each block at the last k positions, [b, k, hidden]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int,
            share_prefix: bool = True, last_hidden: int = 0) -> Prefilled:
    """The prompts' forward pass before decoding, with two exact savings: a prompt that occurs in several rows
    (Stage 3's G samples of one prompt) runs once, and the prefix all prompts share runs once. Position ids
    count real tokens only, so each row sees what the plain left-padded forward sees.

    input_ids, attention_mask: [b, s] left-padded. share_prefix=False: no prefix pass (a sharded model must be
    called equally often on every rank, and ranks hold different prompts). last_hidden=k also returns each
    block's input at the last k positions (Stage 1's means; the shared prefix then stops k tokens short)."""
    device = input_ids.device
    rows = [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]
    distinct = list(dict.fromkeys(map(tuple, rows)))
    where = {r: i for i, r in enumerate(distinct)}
    inverse = torch.tensor([where[tuple(r)] for r in rows], device=device)
    n = shared_prefix_len(distinct, model, max(last_hidden, 1)) if share_prefix else 0
    width = max(len(r) - n for r in distinct)
    ids = torch.full((len(distinct), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(distinct), width, dtype=torch.long, device=device)
    for j, r in enumerate(distinct):
        ids[j, width - len(r) + n:] = torch.tensor(r[n:], device=device)
        mask[j, width - len(r) + n:] = 1
    cache = None
    if n:
        prefix = torch.tensor([distinct[0][:n]], device=device)
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        cache.reorder_cache(torch.zeros(len(distinct), dtype=torch.long, device=device))  # one copy per row
    cache_mask = torch.cat([mask.new_ones(len(distinct), n), mask], dim=1)
    positions = (n + mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=cache_mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=1, output_hidden_states=last_hidden > 0)
    cache = out.past_key_values
    if len(distinct) < len(rows):
        cache.reorder_cache(inverse)
    # hidden_states[l] is the input of block l for l < L (the last entry is the final output)
    hidden = tuple(h[inverse, -last_hidden:] for h in out.hidden_states[:-1]) if last_hidden else None
    logits = out.logits[inverse, -1].float()
    return Prefilled(logits, cache, cache_mask[inverse], positions[inverse, -1:] + 1, hidden)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
           stop_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None, sync_stop=None, rows_at_once: int | None = None,
           draw=None):
    """Decode a batch of left-padded prompts with a KV cache; temperature 0 means greedy.

    Returns (tokens [batch, new], mask [batch, new]); mask is 1 up to and including each row's first
    stop token. Rows stop independently; a finished row is fed pad tokens, and decoding ends as soon as
    every row has stopped (the returned width is then the longest row's). sync_stop(running) -> bool, if
    given, decides for all processes together (a sharded model must be called equally often on every rank).
    rows_at_once=N decodes N rows at a time (the KV cache holds N rows), each row drawing the random numbers
    it would in one batch (RowDraws; draw(probs, step) is its hook): its tokens do not depend on N.
    """
    batch, device = input_ids.shape[0], input_ids.device
    if rows_at_once and rows_at_once < batch:
        cut = [(a, min(a + rows_at_once, batch)) for a in range(0, batch, rows_at_once)]
        draws = RowDraws(generator, [b - a for a, b in cut])
        parts = [sample(model, input_ids[a:b], attention_mask[a:b], max_new_tokens, stop_ids=stop_ids,
                        pad_id=pad_id, temperature=temperature, top_p=top_p, top_k=top_k, sync_stop=sync_stop,
                        draw=lambda probs, t, i=i: draws.draw(i, probs, t)) for i, (a, b) in enumerate(cut)]
        width = max(tokens.shape[1] for tokens, _ in parts)
        tokens = torch.cat([F.pad(tokens, (0, width - tokens.shape[1]), value=pad_id) for tokens, _ in parts])
        return tokens, torch.cat([F.pad(mask, (0, width - mask.shape[1])) for _, mask in parts])
    draw = draw or (lambda probs, t: torch.multinomial(probs, 1, generator=generator))
    share_prefix = sync_stop is None  # a sharded model runs the same calls on every rank
    logits, cache, cache_mask, next_pos, _ = prefill(model, input_ids, attention_mask, pad_id, share_prefix)
    plen = cache_mask.shape[1]
    # One preallocated mask for prompt + completion: no tensor grows by cat inside the loop.
    full_mask = torch.cat([cache_mask, cache_mask.new_ones(batch, max_new_tokens)], dim=1)
    stop = torch.tensor(stop_ids, device=device)
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)

    for t in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = draw(probs.cpu(), t).squeeze(1).to(device)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        tokens[:, t] = nxt
        mask[:, t] = alive.long()
        alive = alive & ~torch.isin(nxt, stop)
        running = bool(alive.any()) if sync_stop is None else sync_stop(bool(alive.any()))
        if not running:
            return tokens[:, :t + 1], mask[:, :t + 1]
        if t + 1 < max_new_tokens:
            out = model(input_ids=nxt[:, None], attention_mask=full_mask[:, :plen + t + 1],
                        position_ids=next_pos + t, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
    return tokens, mask


class RowDraws:
    """One batch's random numbers for a batch sampled a chunk of rows at a time. torch.multinomial over
    [rows, V] takes rows·V exponentials from the generator at each step, row after row (tested), while a chunk
    decodes all its steps before the next starts: the first chunk to reach step t draws all of step t's
    numbers, noting where each chunk's part starts, and each chunk draws its part from there. The generator
    ends where one batch leaves it. Costs twice one batch's draws, and 5 KB per chunk and step until used."""

    def __init__(self, generator: torch.Generator | None, sizes: list[int]):
        self.gen, self.sizes, self.states = generator or torch.default_generator, sizes, []

    def draw(self, chunk: int, probs: torch.Tensor, t: int) -> torch.Tensor:
        while len(self.states) <= t:  # states[step][chunk]: where that chunk's part of the step starts
            self.states.append([])
            for n in self.sizes:  # multinomial's own draws for n rows, thrown away
                self.states[-1].append(self.gen.get_state())
                torch.empty(n, probs.shape[1], dtype=probs.dtype).exponential_(generator=self.gen)
        frontier, start = self.gen.get_state(), self.states[t][chunk]
        self.states[t][chunk] = None  # used once
        self.gen.set_state(start)
        picked = torch.multinomial(probs, 1, generator=self.gen)
        self.gen.set_state(frontier)
        return picked


def decode_completions(tok, tokens: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [tok.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(tokens, mask)]
