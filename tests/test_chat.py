"""Chat templates and model families: every family's tokens, offline, on tiny random models of its
architecture.

For each family (SmolLM2's ChatML, Qwen3 with its think block, Qwen2.5, Llama-3 with rope scaling, Gemma 2
with soft-capping and no system role, Gemma 3): the post-instruction tokens, the end-of-turn stop, the decoder
blocks, the hook, Stage 1's refusal tokens, and all four stages into one run directory.
"""
import json

import pytest
import torch
from conftest import FAMILIES, LLAMA3, make_tokenizer

from safesteer.chat import (encode_chats, end_of_turn_id, post_instruction_ids, render_chat,
                            special_token_ids, stop_token_ids)
from safesteer.hooks import add_vector, decoder_layers
from safesteer.models import load_model
from safesteer.sampling import prefill, sample, shared_prefix_len
import distill
import evaluate
import extract_direction as ed
import select_tokens
from safesteer import forcing
from safesteer.errors import UserError


def load(family_dir):
    name, d = family_dir
    model, tok = load_model(str(d))  # as every stage loads it: padding side, pad token
    return name, model, tok


def test_post_instruction_tokens_are_what_the_template_adds(family_dir):
    name, model, tok = load(family_dir)
    expected = tok(FAMILIES[name][7], add_special_tokens=False).input_ids
    ids = post_instruction_ids(tok)
    assert ids == expected, (name, tok.decode(ids))
    full, _ = encode_chats(tok, ["short", "a much longer question here"])
    assert full[:, -len(ids):].tolist() == [ids, ids]  # left padding puts them at the end of every row
    if tok.bos_token_id is not None:
        assert all((row == tok.bos_token_id).sum() == 1 for row in full)  # BOS from the template only


def test_end_of_turn_stops_the_sampler(family_dir):
    name, model, tok = load(family_dir)
    eot = tok.convert_tokens_to_ids(FAMILIES[name][6])
    assert end_of_turn_id(tok) == eot
    stops = stop_token_ids(tok)
    assert eot in stops and tok.eos_token_id in stops
    ids, mask = encode_chats(tok, ["hi", "tell me more"])

    def force_eot_at_step_3(module, args, output):  # the LM head's logits: call k predicts token k; eot at 3
        if output.shape[0] == 1:  # the shared template prefix, run once before the prompts (prefill)
            return output
        if state["calls"] == 3:
            output[..., eot] += 1e4
        state["calls"] += 1
        return output
    state = {"calls": 0}
    handle = model.get_output_embeddings().register_forward_hook(force_eot_at_step_3)
    try:
        toks, m = sample(model, ids, mask, 10, temperature=0, stop_ids=stops,
                                  pad_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert toks.shape[1] == 4 and (toks[:, 3] == eot).all() and m.all()  # stopped right after eot, inclusive


def test_prefill_equals_the_plain_forward_and_decoding_equals_generate(family_dir):
    """Duplicate rows run once and the shared template prefix runs once; where the family has sliding-window
    attention (Gemma 2/3 here, window 16 < these prompts) the prefix is not shared, since the mask counts
    slots."""
    name, model, tok = load(family_dir)
    prompts = ["hi", "tell me a long story about the sea please", "hi", "why?", "hi"]
    ids, mask = encode_chats(tok, prompts)
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    sliding = name.startswith("gemma")
    assert (shared_prefix_len(rows, model) == 0) == sliding
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        outputs = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        hidden = outputs.hidden_states
    logits, cache, cache_mask, next_pos, ours = prefill(model, ids, mask, tok.pad_token_id,
                                                                 last_hidden=3)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert len(ours) == len(hidden) - 1  # the input of each block, at the last positions (Stage 1's means)
    for h, want in zip(ours, hidden):
        assert h.shape[1] == 3 and torch.allclose(h, want[:, -3:], atol=1e-4)
    assert torch.equal(next_pos[:, 0], mask.sum(-1)) and torch.equal(cache_mask.sum(-1), mask.sum(-1))
    ours, _ = sample(model, ids, mask, 24, temperature=0, stop_ids=[10_000], pad_id=tok.pad_token_id)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, gen[:, ids.shape[1]:])
    # teacher forcing without autograd (πt, π0) goes through prefill and the cache: the same logits
    with torch.no_grad():
        cached = forcing.completion_logits(model, ids, mask, ours)
    with torch.enable_grad():
        plain = forcing.completion_logits(model, ids, mask, ours)
    assert torch.allclose(cached, plain.detach(), atol=1e-5)


def test_system_prompt_where_the_family_has_none(family_dir):
    name, model, tok = load(family_dir)
    text = render_chat(tok, "hello there", system="Be safe.")
    assert "Be safe." in text and text.index("Be safe.") < text.index("hello there")


def test_blocks_and_hook_at_the_chosen_block_only(family_dir):
    name, model, tok = load(family_dir)
    blocks = decoder_layers(model)
    assert len(blocks) == model.config.num_hidden_layers
    ids, mask = encode_chats(tok, ["hi", "what now"])
    vec = torch.randn(model.config.hidden_size)

    def block_inputs():
        seen, hs = {}, []
        for i, b in enumerate(blocks):
            hs.append(b.register_forward_pre_hook(
                lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).clone()),
                with_kwargs=True))
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        [h.remove() for h in hs]
        return seen, logits
    plain, base_logits = block_inputs()
    with add_vector(model, 1, vec, 0.5):
        steered, logits = block_inputs()
    assert torch.equal(steered[0], plain[0])  # the block before is untouched
    assert torch.allclose(steered[1] - plain[1], (0.5 * vec).expand_as(plain[1]), atol=1e-5)
    assert not torch.allclose(logits, base_logits, atol=1e-4)


def test_refusal_tokens_are_real_tokens(family_dir):
    name, model, tok = load(family_dir)
    ids = ed.refusal_token_ids(tok, ed.REFUSAL_WORDS)
    assert all(0 <= i < len(tok) for i in ids) and not set(ids) & set(special_token_ids(tok))
    for word, i in zip(ed.REFUSAL_WORDS, ids):
        assert word.startswith(tok.decode([i]))


def test_every_stage_runs_and_the_student_reloads(family_dir, tmp_path):
    """All four stages into one run directory, with the smallest settings; the student reloads with
    AutoModelForCausalLM and gives the logits it had when saved."""
    from transformers import AutoModelForCausalLM
    name, d = family_dir
    out = tmp_path / "run"
    m = ["--model", str(d), "--out", str(out)]
    ed.main(m + ["--n-train", "3", "--n-val", "2", "--layer", "1", "--position", "-1",
                 "--n-check-prompts", "1", "--check-new-tokens", "3"])
    select_tokens.main(m + ["--n-prompts", "2", "--samples", "2", "--max-new-tokens", "3", "--k", "5",
                            "--k-vote", "8"])
    saved = {}
    real_save = distill.save_student

    def remember_logits(student, tok, path, info, lora, dtype="float32", log=None):
        ids, mask = encode_chats(tok, ["check the reload"])
        with torch.no_grad():
            saved["logits"] = student.eval()(input_ids=ids, attention_mask=mask).logits
        saved["ids"], saved["mask"] = ids, mask
        real_save(student, tok, path, info, lora, dtype, log)
    distill.save_student = remember_logits
    try:
        distill.main(m + ["--max-steps", "1", "--prompts-per-step", "1", "--samples", "2",
                          "--max-new-tokens", "4"])
    finally:
        distill.save_student = real_save
    evaluate.main(m + ["--n-prompts", "2", "--max-new-tokens", "3", "--qa-new-tokens", "2",
                       "--harmful-reform", "", "--harmless-reform", "", "--models", f"base={d}",
                       f"student={out / 'student'}"])
    student = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    with torch.no_grad():
        logits = student(input_ids=saved["ids"], attention_mask=saved["mask"]).logits
    assert torch.allclose(logits, saved["logits"], atol=1e-5)
    res = json.loads((out / "eval.json").read_text())
    assert set(res["models"]) == {"base", "student"}


# --------------------------------------------------------------------------- templates, one family at a time

def test_llama3_template_from_the_conftest():
    tok = make_tokenizer(LLAMA3)
    ids = post_instruction_ids(tok)
    assert tok.decode(ids) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_missing_template_names_the_flag(tok):
    tok.chat_template = None
    with pytest.raises(UserError, match="--chat-template"):
        render_chat(tok, "hi")


def test_chat_template_flag_replaces_the_tokenizers(model_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    _, tok = load_model(str(model_dir), chat_template=str(template))
    assert render_chat(tok, "hi") == "[user]hi[assistant]"


def test_think_block_is_what_qwen3_adds_with_thinking_off(family_dir):
    name, model, tok = load(family_dir)
    text = render_chat(tok, "x")
    assert text.endswith("<think>\n\n</think>\n\n") == (name == "qwen3")


def test_packed_samples_score_like_one_row_per_sample(family_dir):
    """Stage 3's student computes each prompt once for its G samples (a tree mask): the logits and the
    gradients equal one row per sample, for every family with full attention; sliding-window families (Gemma)
    keep one row per sample, since the tree mask would replace their window."""
    name, model, tok = load(family_dir)
    model.train()
    prompts = ["hi", "tell me a long story about the sea please", "why?"]  # unequal lengths: left padding
    ids, mask = encode_chats(tok, [p for p in prompts for _ in range(3)])
    comp = torch.randint(0, 200, (9, 6), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(9, 6, len(tok), generator=torch.Generator().manual_seed(1))
    assert forcing.packs_exactly(model) == (not name.startswith("gemma"))
    results = []
    for pack in (False, True):
        model.zero_grad()
        logits = forcing.completion_logits(model, ids, mask, comp, pack=pack)
        (logits * weights).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, g_plain), (packed, g_packed) = results
    assert torch.allclose(packed, plain, atol=1e-5)
    for a, b in zip(g_packed, g_plain):
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item())
