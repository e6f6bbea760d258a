"""Where the residual stream is, and the hook that steers it: πt = π0 + c·r at block l.

    decoder_layers, check_layer   the decoder blocks of each family (also under a peft wrapper)
    add_vector                    πt: c·r added to the input of block l at every position (a pre-hook)
    replace_hidden                the block's hidden_states input, wherever the caller put it (any pre-hook)

Imports torch alone (and the package's error type): a port copies this file.
"""
from __future__ import annotations

import contextlib

import torch

from safesteer.errors import UserError


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
