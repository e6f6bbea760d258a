"""Chat templates and the tokens that matter to SafeSteer, for every model family.

Each family formats a turn its own way, and a silent mistake here gives numbers that look fine and mean
nothing (the direction read at the wrong token, a completion that never stops):

    ChatML (Qwen2.5, Qwen3, SmolLM2)  <|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n
                                      Qwen3 adds <think>\\n\\n</think>\\n\\n (thinking off, as we run it)
    Llama-3                           <|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|>…
    Gemma 2/3 (no system role)        <start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n

    render_chat, encode_chats   one user turn (and a system turn where the family has one) up to the assistant
    stop_token_ids              the end-of-turn token the template writes, plus the eos ids
    special_token_ids           never eligible for S
    post_instruction_ids        the tokens after the user's text, where Stage 1 reads r
    refusal_token_ids           R, Stage 1's refusal tokens: each word's first token
    tokenizer_fingerprint       a token file made for another vocabulary is refused
                                (artifacts.load_safety_tokens)
"""
from __future__ import annotations

import hashlib
import json

from safesteer.errors import UserError

SENTINEL = "XQZSENTINELQZX"


def _apply(tok, messages, add_generation_prompt: bool) -> str:
    # enable_thinking=False: Qwen3's templates then write the empty think block, so the model answers
    # directly; templates that do not know the variable ignore it.
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                   enable_thinking=False)


def render_chat(tok, user: str, system: str | None = None) -> str:
    """One user turn (optionally after a system turn), ending where the assistant starts.

    A family without a system role (Gemma) raises on one; the system text is then put at the head of the
    user's turn, which is what Gemma 3's own template does."""
    if not tok.chat_template:
        raise UserError("this tokenizer has no chat template; pass one with --chat-template FILE")
    user_turn = [{"role": "user", "content": user}]
    if not system:
        return _apply(tok, user_turn, True)
    try:
        return _apply(tok, [{"role": "system", "content": system}] + user_turn, True)
    except Exception:  # jinja2's TemplateError from raise_exception('System role not supported')
        return _apply(tok, [{"role": "user", "content": f"{system}\n\n{user}"}], True)


def encode_chats(tok, prompts: list[str], system: str | None = None, device="cpu"):
    """Render and tokenise a batch, left-padded. Returns input_ids, attention_mask: [batch, seq]."""
    texts = [render_chat(tok, p, system) for p in prompts]
    # The template already holds BOS where the model wants one; adding special tokens would double it.
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt", padding_side="left")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def end_of_turn_id(tok) -> int | None:
    """The token the template writes right after an assistant's message (<|im_end|>, <|eot_id|>,
    <end_of_turn>): render a finished assistant turn around a sentinel and read the next token."""
    try:
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
        text = _apply(tok, turns, False)
    except Exception:
        return None
    if SENTINEL not in text:
        return None
    ids = tok(text[text.index(SENTINEL) + len(SENTINEL):], add_special_tokens=False).input_ids
    return ids[0] if ids and ids[0] in special_token_ids(tok) else None


def stop_token_ids(tok) -> list[int]:
    """The sampler stops a row at the first of these: the template's end of turn and the eos token(s)."""
    ids = {tok.eos_token_id, end_of_turn_id(tok)}
    for t in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i >= 0:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


def special_token_ids(tok) -> list[int]:
    """Every special token: the named ones and any added token flagged special (chat markers)."""
    ids = set(tok.all_special_ids)
    ids |= {i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)}
    return sorted(ids)


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the vocabulary, so a token file made for another tokenizer is refused."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def post_instruction_ids(tok) -> list[int]:
    """Token ids the template appends after the user's text: the positions where r[p, l] is read.

    ChatML: `<|im_end|>\\n<|im_start|>assistant\\n` (Qwen3 with thinking off adds
    `<think>\\n\\n</think>\\n\\n`); Llama-3: `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`;
    Gemma: `<end_of_turn>\\n<start_of_turn>model\\n`.
    Found by rendering around a sentinel; with left padding they are the last n positions of every row.
    """
    text = render_chat(tok, SENTINEL)
    suffix = text[text.index(SENTINEL) + len(SENTINEL):]
    ids = tok(suffix, add_special_tokens=False).input_ids
    full = tok(text, add_special_tokens=False).input_ids
    if not ids or full[-len(ids):] != ids:
        raise UserError("could not locate the chat template's post-instruction tokens")
    return ids


def refusal_token_ids(tok, words) -> list[int]:
    """R: the first token of each word, as it would open the assistant's turn."""
    ids = []
    for w in words:
        t = tok(w, add_special_tokens=False).input_ids
        if t and t[0] not in ids:
            ids.append(t[0])
    if not ids:
        raise UserError("--refusal-tokens gave no token ids")
    return ids
