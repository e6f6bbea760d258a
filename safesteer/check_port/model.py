"""A port's steering hook (against a manual residual edit at the block's input), its teacher forcing (which
logits predict completion token i) and its end-of-turn mask, on a tiny random Llama or a given model."""
from __future__ import annotations

import contextlib

import torch

from safesteer.check_port.results import Result, close, verdict
from safesteer.errors import UserError
from safesteer.hooks import decoder_layers


# ----------------------------------------------------------------------------- the hook

def tiny_model(seed: int = 0):
    """A random 4-block Llama (hidden 32, 64 tokens), its weights large enough that steering shows."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
    return model


@contextlib.contextmanager
def residual_edit(model, layer: int, delta: torch.Tensor, where=None):
    """The reference πt: delta [hidden] added to the input of block `layer` (>= 1) by editing the output of
    block layer − 1 (a bare tensor or a tuple), at every position or where the bool mask `where` [b, s] is
    True."""
    def edit(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + (delta if where is None else delta * where[..., None].to(h.dtype))
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    handle = decoder_layers(model)[layer - 1].register_forward_hook(edit)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def entered(hook_fn, model, layer, vector, coefficient):
    """The porter's hook as a context: the context manager it returns, or a handle removed on exit."""
    made = hook_fn(model, layer, vector, coefficient)
    if hasattr(made, "__enter__"):
        with made:
            yield
    elif hasattr(made, "remove"):
        try:
            yield
        finally:
            made.remove()
    else:
        raise UserError(f"the hook returned {type(made).__name__}: return a context manager or a handle")


def left_padded(model, lengths: list[int], seed: int):
    """Random prompts [b, s], left-padded: ids, mask, and position ids that count real tokens only."""
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(max(lengths))[None] >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def steered_runs(hook_fn, model, layer: int, r, c: float, ids, mask, pos):
    """Under the porter's hook: the logits of a forward pass [b, s, V], then of one cached decoding step after
    the same prompts [b, V], and the token that step was fed [b, 1]."""
    with entered(hook_fn, model, layer, r.clone(), c):
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        nxt = prefill.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     position_ids=pos[:, -1:] + 1, past_key_values=prefill.past_key_values, use_cache=True)
    return full, step.logits[:, -1], nxt


@torch.no_grad()
def check_hook(hook_fn, model, seed: int = 0) -> list[Result]:
    n = len(decoder_layers(model))
    layer, c = max(1, n // 2), 0.5
    r = torch.randn(model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(seed))
    r = r / r.norm() * 4  # |r| = 4 and c = 0.5: c·r, r and c·r̂ all differ
    ids, mask, pos = left_padded(model, [7, 5, 3], seed)

    def run(at=layer, delta=c * r, where=None, ids=ids, mask=mask, pos=pos):  # the reference, or a mistake
        if not 1 <= at < n:
            return None
        with residual_edit(model, at, delta, where):
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    def unsteered():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    base = unsteered()
    try:
        full, step, nxt = steered_runs(hook_fn, model, layer, r, c, ids, mask, pos)
    except UserError:
        raise
    except Exception as e:  # the porter's code
        return [Result("the hook", False, f"raised {type(e).__name__}: {e}")]
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    mistakes = [(f"one block early: c·r lands at the input of block {layer - 1}", run(at=layer - 1)),
                (f"one block late: c·r lands at the input of block {layer + 1} (a forward hook on block "
                 f"{layer} edits its output; use a pre-hook on block {layer})", run(at=layer + 1)),
                ("adds r, not c·r", run(delta=r)),
                ("adds c·r twice", run(delta=2 * c * r)),
                ("adds c·r̂, r normalised: add r as stored", run(delta=c * r / r.norm())),
                ("subtracts c·r", run(delta=-c * r)),
                ("adds c·r at the last position only: πt adds it at every position", run(where=last)),
                ("the model is not steered at all", base)]
    results = [verdict(f"a forward pass, every position (block {layer}, c = {c}, |r| = 4)", full, run(),
                       mistakes)]
    longer = dict(ids=torch.cat([ids, nxt], 1), mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                  pos=torch.cat([pos, pos[:, -1:] + 1], 1))
    prompt_only = longer["mask"].bool().clone()
    prompt_only[:, -1] = False
    skips = ("the hook skips cached decoding steps: πt is steered at every new token too",
             run(where=prompt_only, **longer)[:, -1])
    results.append(verdict("a cached decoding step (one new position)", step, run(**longer)[:, -1], [skips]))
    after = unsteered()
    try:
        with entered(hook_fn, model, layer, r.clone(), c):
            raise KeyError("an error inside the with block")
    except KeyError:
        pass
    removed = close(after, base, 1e-6) and close(unsteered(), base, 1e-6)
    return results + [Result("removed on exit, also after an error", removed,
                             "" if removed else "the model is still steered after the with block")]


# ----------------------------------------------------------------------------- positions and the mask

@torch.no_grad()
def per_row_logits(model, ids, mask, comp, offset: int = -1) -> torch.Tensor:
    """Brute force: each row alone, unpadded; the outputs at positions plen + offset + i for i < T
    (offset −1 is the method's: the output before token i predicts it). [b, T, V]."""
    rows = []
    for row, m, c in zip(ids, mask, comp):
        prompt = row[m.bool()]
        out = model(input_ids=torch.cat([prompt, c])[None]).logits[0]
        rows.append(out[len(prompt) + offset:len(prompt) + offset + len(c)])
    return torch.stack(rows)


def check_logits(logits_fn, model, seed: int = 0) -> list[Result]:
    ids, mask, _ = left_padded(model, [6, 4, 2], seed)
    vocab = model.config.get_text_config().vocab_size
    comp = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for name, g, grad in (("left-padded prompts, no autograd (as πt and π0 score)", 1, False),
                          ("G = 2 samples of each prompt, with autograd (as the student scores)", 2, True)):
        p_ids, p_mask, c_ids = (x.repeat_interleave(g, 0) for x in (ids, mask, comp))
        try:
            with torch.set_grad_enabled(grad):
                got = logits_fn(model, p_ids, p_mask, c_ids)
        except Exception as e:  # the porter's code
            results.append(Result(name, False, f"raised {type(e).__name__}: {e}"))
            continue
        ref = per_row_logits(model, p_ids, p_mask, c_ids)
        if not torch.is_tensor(got) or got.shape != ref.shape:
            shape = list(got.shape) if torch.is_tensor(got) else type(got).__name__
            results.append(Result(name, False, f"returned {shape}, not {list(ref.shape)} = [b, T, V]"))
            continue
        with torch.no_grad():  # every position attended, padding too
            padded = model(input_ids=torch.cat([p_ids, c_ids], 1)).logits[:, p_ids.shape[1] - 1:-1]
        mistakes = [("off by one position: [:, i] is the output at completion token i, which predicts token "
                     "i + 1; token i is predicted by the output before it (the prompt's last for i = 0)",
                     per_row_logits(model, p_ids, p_mask, c_ids, offset=0)),
                    ("off by one position: [:, i] is the output two positions before token i",
                     per_row_logits(model, p_ids, p_mask, c_ids, offset=-2)),
                    ("the padding is attended: pass the prompts' attention mask", padded)]
        results.append(verdict(name, got.detach().float(), ref, mistakes))
    return results


def through_stop(row: list[int], stops: list[int], inclusive: bool = True, first: bool = True):
    """1 up to the first (or last) token of `stops` in row, that token included (or not); 0 after."""
    hits = [i for i, x in enumerate(row) if x in stops] or [len(row)]
    k = hits[0] if first else hits[-1]
    return torch.tensor([float(i < k or (i == k and inclusive)) for i in range(len(row))])


def check_mask(mask_fn) -> list[Result]:
    stops = [5, 9]
    rows = {"no stop token": [1, 2, 3, 4, 6, 7],
            "a stop token inside the window": [1, 2, 9, 3, 4, 6],
            "two stop tokens (the first ends the turn)": [1, 5, 2, 9, 3, 4],
            "a stop token first": [9, 1, 2, 3, 4, 6],
            "a stop token last": [1, 2, 3, 4, 6, 5]}
    try:
        got = mask_fn(torch.tensor(list(rows.values())), list(stops))
    except Exception as e:  # the porter's code
        return [Result("the end-of-turn mask", False, f"raised {type(e).__name__}: {e}")]
    results = []
    for i, (name, row) in enumerate(rows.items()):
        mistakes = [("the stop token itself is left out: the mask runs through it, inclusive",
                     through_stop(row, stops, inclusive=False)),
                    ("the mask runs to the last stop token, not the first",
                     through_stop(row, stops, first=False)),
                    ("only the first stop id ends a turn: each of chat.stop_token_ids does (the end of turn "
                     "and the eos ids)", through_stop(row, stops[:1])),
                    ("stop tokens are ignored", torch.ones(len(row)))]
        results.append(verdict(name, got[i].float(), through_stop(row, stops), mistakes))
    return results
