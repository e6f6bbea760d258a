"""The files the stages hand each other, read and checked against the model that will use them.

    load_direction      r and its direction.json (Stage 1): finite, an integer block, made for this model
    model_fingerprint   what direction.json records of the model it was made for
    load_safety_tokens  S, safety_tokens.json (Stage 2): unique integer ids, made for this tokenizer
"""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import torch

from safesteer.chat import special_token_ids, tokenizer_fingerprint
from safesteer.errors import UserError
from safesteer.files import load_json


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
    meta, meta_path = load_json(path.with_suffix(".json")), path.with_suffix(".json")
    vec = tensors["direction"].float()
    hidden = model.config.get_text_config().hidden_size
    if vec.shape != (hidden,):
        raise UserError(f"{path}: direction has size {tuple(vec.shape)}, the model's hidden size is "
                        f"{hidden} (made for another model?)")
    if not torch.isfinite(vec).all():
        raise UserError(f"{path}: the direction holds NaN or infinite values")
    layer = meta.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise UserError(f"{meta_path}: 'layer' must be a block number, got {layer!r}")
    c = meta.get("coefficient", 1.0)
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
        raise UserError(f"{meta_path}: 'coefficient' must be a finite number, got {c!r}")
    made_for, here = meta.get("model_fingerprint"), model_fingerprint(model)
    if made_for and here and made_for != here:
        raise UserError(f"{path}: made for another model (fingerprint {made_for}, this model's {here}); "
                        "run extract_direction.py on this model")
    return vec.to(next(model.parameters()).device), meta


def model_fingerprint(model) -> str | None:
    """A short hash that tells two models apart even at the same hidden size: the architecture and the first
    64 rows of the input embeddings, rounded to bf16 (so a float32 and a bf16 load of one model agree).
    None where the weights are not here whole (a sharded or meta-device model): nothing to check."""
    weight = model.get_input_embeddings().weight
    if weight.is_meta or type(weight.data) is not torch.Tensor:
        return None
    cfg = model.config.get_text_config()
    rows = weight[:64].detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()
    shape = f"{cfg.model_type}:{cfg.hidden_size}:{cfg.num_hidden_layers}:{cfg.vocab_size}"
    return hashlib.sha256(shape.encode() + rows).hexdigest()[:16]


def load_safety_tokens(path, tok, model, random_tokens: bool = False, seed: int = 0):
    """S from Stage 2 as a LongTensor, and its file; refused if it was made for another tokenizer.
    random_tokens: a seeded random set of the same size instead (the ablation)."""
    meta = load_json(path)
    ids = meta.get("token_ids") if isinstance(meta, dict) else None
    if not isinstance(ids, list) or not ids:
        raise UserError(f"{path}: no token_ids (a JSON object with a list 'token_ids', as Stage 2 writes)")
    bad = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool)), None)
    if bad is not None:
        raise UserError(f"{path}: token id {bad!r} is not an integer")
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: token id {twice} is listed more than once (S is a set)")
    if meta.get("vocab_size") != len(tok) or meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tok):
        raise UserError(f"{path}: made for another tokenizer (vocabulary size {meta.get('vocab_size')} vs "
                        f"{len(tok)}, or fingerprint differs)")
    vocab = model.config.get_text_config().vocab_size
    outside = next((i for i in ids if not 0 <= i < vocab), None)
    if outside is not None:
        raise UserError(f"{path}: token id {outside} is outside the model's vocabulary of {vocab}")
    if random_tokens:  # the ablation: same |S|, tokens drawn at random from the non-special vocabulary
        special = set(special_token_ids(tok))
        ids = sorted(random.Random(seed).sample([i for i in range(len(tok)) if i not in special], len(ids)))
    return torch.tensor(ids, dtype=torch.long), meta
