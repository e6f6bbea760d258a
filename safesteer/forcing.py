"""Teacher forcing: the logits a model gives to completions it did not sample (πt and π0 score the student's
samples; Stage 2 scores πt's; Stage 4 scores π0's answers; the baselines score fixed answers).

Two conventions every loss and metric here relies on, and a port must reproduce (defined here, once):

    positions   completion_logits(...)[:, i] is the distribution completion token i was drawn from: the
                model's output at the position before it (the last prompt token for i = 0), so a loss at
                position i compares the two models' predictions *of* token i, never of token i + 1
    mask        end_of_turn_mask: 1 on each completion token up to and including its first stop token
                (chat.stop_token_ids: the end of turn and eos), 0 after; the sampler returns this mask,
                and the loss and the metrics count those positions only

    completion_logits         prompt + completion -> the logits that predict each completion token: without
                              autograd through sampling.prefill's cache, with autograd (the student) packed
    packed_completion_logits  a prompt's G samples in one row behind a tree mask, the prompt computed once
    sample_groups, packs_exactly, packing_path    when packing applies, and the line Stage 3 logs about it
    right_pad                 completions as token lists -> ids and mask to teacher-force
    end_of_turn_mask          the mask above, from the tokens alone
"""
from __future__ import annotations

import torch

from safesteer.sampling import has_sliding_window, prefill


def sample_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """G if the rows come in consecutive runs of G identical prompts (Stage 3's samples), else 1."""
    rows = torch.cat([prompt_ids, prompt_mask], dim=1)
    g = int((rows == rows[0]).all(-1).long().cumprod(0).sum())  # the first run's length
    return g if g > 1 and len(rows) % g == 0 and torch.equal(rows, rows[::g].repeat_interleave(g, 0)) else 1


def packs_exactly(model) -> bool:
    """The tree mask replaces the model's own masking: exact for full attention (sdpa, eager) only."""
    return model.config._attn_implementation in ("sdpa", "eager") and not has_sliding_window(model)


def packing_path(model, pack: bool = True) -> str:
    """How Stage 3's student scores its G samples, for the log: packed (tree mask), or a row each and why."""
    impl = model.config._attn_implementation
    if pack and packs_exactly(model):
        return f"packed, each prompt once for its G samples behind a tree mask ({impl} attention)"
    why = "sliding-window attention" if has_sliding_window(model) else f"{impl} ignores a 4-D mask"
    return f"unpacked, a row per sample ({why if pack else '--no-pack-samples'})"


def packed_completion_logits(model, prompt_ids, prompt_mask, comp_ids, g: int) -> torch.Tensor:
    """completion_logits for runs of G identical prompts, each prompt computed once: a row
    [prompt | y_1 | ... | y_G] with a tree-shaped mask (y_j sees the prompt and its own past, no other y) and
    position ids that restart after the prompt for each y_j, so y_j is scored as in a row of its own.
    [b, s] + [b, T] -> [b, T, V]."""
    ids, mask = prompt_ids[::g], prompt_mask[::g]  # [n, s]: each prompt once
    (n, s), t, dev = ids.shape, comp_ids.shape[1], ids.device
    width = s + g * t
    seg = torch.cat([torch.where(mask.bool(), 0, -1),  # -1 padding, 0 prompt, j sample j: [n, W]
                     torch.arange(1, g + 1, device=dev).repeat_interleave(t).expand(n, -1)], dim=1)
    pos = torch.cat([(mask.cumsum(-1) - 1).clamp(min=0),
                     mask.sum(-1, keepdim=True) + torch.arange(t, device=dev).repeat(g)], dim=1)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    # a padding query sees itself (the eye): no softmax row is empty
    allowed = (causal & (k >= 0) & ((k == 0) | (k == q))) | torch.eye(width, dtype=torch.bool, device=dev)
    attn = allowed[:, None]  # [n, 1, W, W]: sdpa takes True = attend, eager adds a float mask
    if model.config._attn_implementation != "sdpa":
        dtype = next(model.parameters()).dtype
        attn = torch.zeros(attn.shape, dtype=dtype, device=dev).masked_fill(~attn, torch.finfo(dtype).min)
    # y_j's token i is predicted at the prompt's last position (i = 0), else at y_j's token i - 1
    keep = torch.cat([torch.cat([torch.tensor([s - 1]), s + j * t + torch.arange(t - 1)]) for j in range(g)])
    logits = model(input_ids=torch.cat([ids, comp_ids.reshape(n, g * t)], dim=1), attention_mask=attn,
                   position_ids=pos, use_cache=False, logits_to_keep=keep.to(dev)).logits  # [n, G T, V]
    return logits.reshape(n * g, t, -1)


def completion_logits(model, prompt_ids, prompt_mask, comp_ids, share_prefix: bool = True,
                      pack: bool = True) -> torch.Tensor:
    """Teacher-force prompt + completion: the logits that predict each completion token, [b, plen] + [b, T]
    -> [b, T, V] in the model's dtype (only those positions reach the LM head). Each row's completion follows
    its own prompt, so teacher and student may see different prompts (a system prompt). Without autograd, in
    eval mode (πt, π0): `prefill` (each distinct prompt once; share_prefix as there), then the completions
    through its cache. With autograd (the student; a LoRA student's weights as πt, π0 in train mode, where
    checkpointed blocks keep no cache): runs of G identical prompts are packed (packed_completion_logits;
    pack=False: a row per sample)."""
    t = comp_ids.shape[1]
    if not torch.is_grad_enabled() and not model.training:
        first, cache, cache_mask, next_pos, _ = prefill(model, prompt_ids, prompt_mask, 0, share_prefix)
        mask = torch.cat([cache_mask, cache_mask.new_ones(comp_ids.shape)], dim=1)
        positions = next_pos + torch.arange(t, device=comp_ids.device)
        rest = model(input_ids=comp_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True).logits
        return torch.cat([first[:, None].to(rest.dtype), rest[:, :-1]], dim=1)
    g = sample_groups(prompt_ids, prompt_mask) if pack else 1
    if g > 1 and packs_exactly(model):
        return packed_completion_logits(model, prompt_ids, prompt_mask, comp_ids, g)
    ids = torch.cat([prompt_ids, comp_ids], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(comp_ids)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=t + 1).logits
    return logits[:, :-1]  # position plen-1+i predicts completion token i


def right_pad(token_lists: list[list[int]], pad_id: int, device):
    """Completions to teacher-force: [[ids]] -> ids [b, T], mask [b, T] (1 on real tokens), right-padded."""
    width = max(1, max(len(t) for t in token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(t)] = 1
    return ids.to(device), mask.to(device)


def end_of_turn_mask(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """[b, T] completion tokens -> [b, T] mask: 1 through each row's first stop token (inclusive), 0 after.
    sampling.sample returns this mask beside its tokens; e.g. stop 9: [5, 9, 7] -> [1, 1, 0]."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).long()
    before = is_stop.cumsum(-1) - is_stop  # stop tokens strictly before each position
    return (before == 0).long()
