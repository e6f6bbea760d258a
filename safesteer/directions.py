"""Where r comes from: mean differences of the residual stream, shared by Stage 1 and Stage 3's refresh;
and what taking r away does.

    PromptBatches          prompts in length-sorted batches, run through sampling.prefill
    candidate_directions   r[p, l] = mean harmful - mean harmless input of block l at post-instruction token p
    response_directions    r[l] = mean over a prefilled refusal - the same over a prefilled compliance (ours)
    recompute_direction    Stage 1's r at its chosen block, measured again on another model (distill.py
                           --refresh-every, --teacher-ema); refresh_inputs finds its prompts before step 1
    ablate_direction       r̂ projected out of the residual stream everywhere (Stage 1's bypass and kl scores)

Stage 1 (extract_direction.py) scores and chooses among the candidates; the means themselves are here so that
Stage 3 can measure them again without importing a stage.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from safesteer.chat import encode_chats, post_instruction_ids, render_chat
from safesteer.errors import UserError
from safesteer.files import data_file, read_prompts
from safesteer.hooks import decoder_layers, replace_hidden
from safesteer.sampling import prefill


class PromptBatches:
    """Prompts in length-sorted, left-padded batches (chat.encode_chats; sorting keeps padding small).

    forward runs each batch through sampling.prefill: the template prefix every chat prompt opens with
    (SmolLM2: a 24-token default system turn, about half of each prompt) runs once per batch, with the plain
    forward's result (sampling.shared_prefix_len: not under sliding-window attention).
    """

    def __init__(self, tok, prompts: list[str], batch_size: int, device):
        lengths = [len(tok(render_chat(tok, p), add_special_tokens=False).input_ids) for p in prompts]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        self.pad_id = tok.pad_token_id
        self.batches = []  # (row indices, ids [b, s], mask [b, s]), left-padded
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            self.batches.append((idx, *encode_chats(tok, [prompts[i] for i in idx], device=device)))
        self.n = len(prompts)

    @torch.no_grad()
    def forward(self, model, last_hidden: int = 0):
        """Yield (row indices, last-position logits [b, vocab] float32, block inputs or None) per batch; the
        block inputs: at the last `last_hidden` positions, one [b, last_hidden, hidden] per block."""
        for idx, ids, mask in self.batches:
            out = prefill(model, ids, mask, self.pad_id, last_hidden=last_hidden)
            yield idx, out.logits, out.hidden

    def last_logits(self, model) -> torch.Tensor:
        """Last-position logits of every prompt, in the original order: [n, vocab]."""
        result = None
        for idx, logits, _ in self.forward(model):
            if result is None:
                result = logits.new_empty(self.n, logits.shape[-1])
            result[idx] = logits
        return result


def candidate_directions(model, harmful: PromptBatches, harmless: PromptBatches, n_pos: int) -> torch.Tensor:
    """r[p, l] = mean harmful - mean harmless block input, float64: [n_pos, L, hidden]."""
    means = []
    for batches in (harmful, harmless):
        total = None
        for idx, _, hidden in batches.forward(model, last_hidden=n_pos):
            h = torch.stack(hidden, dim=0).double()  # [L, b, n_pos, hidden]
            s = h.sum(dim=1).transpose(0, 1)  # [n_pos, L, hidden]
            total = s if total is None else total + s
        means.append(total / batches.n)
    return means[0] - means[1]


@torch.no_grad()
def response_directions(model, tok, prompts: list[str], refusal: str, comply: str,
                        batch_size: int) -> torch.Tensor:
    """r[l] = mean block-l input over the tokens of a prefilled refusal minus a prefilled compliance, on the
    same prompts, float64: [1, L, hidden] (one "position": the mean over the response). Each prompt runs once
    (prefill), and both answers continue from its cache in one batch, the shorter one right-padded."""
    device = next(model.parameters()).device
    answers = [tok(a, add_special_tokens=False).input_ids for a in (refusal, comply)]
    width = max(map(len, answers))
    totals = [0, 0]
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        # twice, one copy per answer: prefill runs each distinct prompt once
        ids, mask = encode_chats(tok, chunk + chunk, device=device)
        pre = prefill(model, ids, mask, tok.pad_token_id)
        cont = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers], device=device)
        cont = cont.repeat_interleave(len(chunk), 0)  # [2b, width]: refusal rows, then compliance rows
        cont_mask = torch.cat([pre.cache_mask, torch.ones_like(cont)], 1)
        positions = pre.next_pos + torch.arange(width, device=device)
        hidden = model(input_ids=cont, attention_mask=cont_mask, position_ids=positions,
                       past_key_values=pre.cache, use_cache=True, output_hidden_states=True,
                       logits_to_keep=1).hidden_states[:-1]
        h = torch.stack(hidden)  # [L, 2b, width, hidden]
        for k, a in enumerate(answers):
            totals[k] = totals[k] + h[:, k * len(chunk):(k + 1) * len(chunk), :len(a)].double().mean(2).sum(1)
    return ((totals[0] - totals[1]) / len(prompts))[None]


def check_remeasurable(meta: dict) -> None:
    """Stage 1's settings that measuring r again needs are in direction.json, or a one-line UserError."""
    data = meta.get("data") or {}
    if not {"kind", "seed"} <= meta.keys() or not {"harmful", "n_harmful"} <= data.keys():
        raise UserError("direction.json lacks kind, seed or data (made by an older extract_direction.py?): "
                        "cannot measure r again")
    if meta["kind"] != "response" and not {"harmless", "n_harmless"} <= data.keys():
        raise UserError("direction.json lacks data.harmless: cannot measure r again")
    if meta.get("filter"):
        raise UserError("the direction was made with --filter, which measuring it again does not redo")


def find_prompt_file(recorded: str, n: int, folders: list[Path], what: str) -> str:
    """The prompt file a stage recorded, wherever the run is now: the same file name in each of `folders`
    (e.g. --refresh-prompts), else the recorded path, else the same name in data/. It must hold >= n prompts,
    or the seeded subset would differ. A run directory copied elsewhere keeps working; a missing file is a
    one-line error before training, not after minutes of it."""
    name = Path(recorded).name
    tried = [d / name for d in folders] + [Path(recorded), data_file(Path(name).stem).with_name(name)]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise UserError(f"{what}: {name} not found (tried {', '.join(map(str, dict.fromkeys(tried)))}); "
                        f"pass --refresh-prompts DIR holding it")
    if len(read_prompts(found)) < n:
        raise UserError(f"{what}: {found} holds fewer than the {n} prompts recorded (another file?)")
    return str(found)


def refresh_inputs(meta: dict, folders: list[Path]) -> dict:
    """direction.json, checked for what measuring r again needs, with its prompt files found now (above)."""
    check_remeasurable(meta)
    data = dict(meta["data"])
    for key in ("harmful",) + (() if meta["kind"] == "response" else ("harmless",)):
        data[key] = find_prompt_file(data[key], data[f"n_{key}"], folders, f"direction.json's {key} prompts")
    return {**meta, "data": data}


def recompute_direction(model, tok, meta: dict, batch_size: int = 16) -> torch.Tensor:
    """r at direction.json's block (and position), by its rule (kind, prompts, prefilled texts), on `model`
    as it is now: float32 [hidden]."""
    check_remeasurable(meta)
    data = meta["data"]
    layer, device = int(meta["layer"]), next(model.parameters()).device
    harmful = read_prompts(data["harmful"], data["n_harmful"], meta["seed"])
    if meta["kind"] == "response":
        texts = meta["response_texts"]
        r = response_directions(model, tok, harmful, texts["refusal"], texts["comply"], batch_size)
        return r[0, layer].float()
    harmless = read_prompts(data["harmless"], data["n_harmless"], meta["seed"])
    n_pos = len(post_instruction_ids(tok))
    r = candidate_directions(model, PromptBatches(tok, harmful, batch_size, device),
                             PromptBatches(tok, harmless, batch_size, device), n_pos)
    return r[n_pos + int(meta["position"]), layer].float()


# ----------------------------------------------------------------------------- taking r away

def _project_out(h: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.to(h.device, h.dtype)
    return h - (h @ u).unsqueeze(-1) * u  # h - (h·r̂) r̂


@contextlib.contextmanager
def ablate_direction(model, direction: torch.Tensor):
    """Directional ablation (Arditi et al.): remove r̂ from every block input and from every attention
    and MLP output, so the residual stream never carries a component along r."""
    unit = direction.float() / direction.float().norm()

    def pre_hook(module, args, kwargs):
        return replace_hidden(args, kwargs, lambda h: _project_out(h, unit))

    def out_hook(module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (_project_out(output[0], unit),) + tuple(output[1:])
        return _project_out(output, unit)

    handles = []
    try:
        for block in decoder_layers(model):
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            for name in ("self_attn", "attn", "attention", "mlp"):
                sub = getattr(block, name, None)
                if isinstance(sub, torch.nn.Module):
                    handles.append(sub.register_forward_hook(out_hook))
        yield
    finally:
        for h in handles:
            h.remove()
