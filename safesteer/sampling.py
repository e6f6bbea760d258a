"""The KV-cached sampler, by hand: prefill each distinct prompt once (and the prefix all share once), then
decode token by token with temperature, top-k and top-p.

    prefill             the prompts' forward pass before decoding (also Stage 1's means, teacher forcing)
    sample              (tokens [b, T], mask [b, T]); the mask is 1 through each row's first stop token:
                        that mask is the end-of-turn mask every loss and metric uses
    RowDraws            N rows at a time with one batch's random numbers (the same tokens for any N)
    decode_completions  the completions' text

Teacher forcing (scoring given completions) is in forcing.py. Imports torch alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


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
