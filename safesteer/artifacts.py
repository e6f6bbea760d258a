"""The files the stages hand each other, read and checked against the model that will use them.

    load_direction      r and its direction.json (Stage 1)
    load_safety_tokens  S, safety_tokens.json (Stage 2): refused if made for another tokenizer
"""
from __future__ import annotations

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
    meta = load_json(path.with_suffix(".json"))
    vec = tensors["direction"].float()
    hidden = model.config.get_text_config().hidden_size
    if vec.shape != (hidden,):
        raise UserError(f"{path}: direction has size {tuple(vec.shape)}, the model's hidden size is "
                        f"{hidden} (made for another model?)")
    if "layer" not in meta:
        raise UserError(f"{path.with_suffix('.json')}: no 'layer' field")
    return vec.to(next(model.parameters()).device), meta


def load_safety_tokens(path, tok, model, random_tokens: bool = False, seed: int = 0):
    """S from Stage 2 as a LongTensor, and its file; refused if it was made for another tokenizer.
    random_tokens: a seeded random set of the same size instead (the ablation)."""
    meta = load_json(path)
    ids = meta.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise UserError(f"{path}: no token_ids")
    if meta.get("vocab_size") != len(tok) or meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tok):
        raise UserError(f"{path}: made for another tokenizer (vocabulary size {meta.get('vocab_size')} vs "
                        f"{len(tok)}, or fingerprint differs)")
    vocab = model.config.get_text_config().vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise UserError(f"{path}: token id {max(ids)} is outside the model's vocabulary of {vocab}")
    if random_tokens:  # the ablation: same |S|, tokens drawn at random from the non-special vocabulary
        special = set(special_token_ids(tok))
        ids = sorted(random.Random(seed).sample([i for i in range(len(tok)) if i not in special], len(ids)))
    return torch.tensor(ids, dtype=torch.long), meta
