"""Stage 1 against brute force on a tiny random Llama."""
import json

import pytest
import torch
from safetensors.torch import load_file

from safesteer.chat import encode_chats, post_instruction_ids, render_chat, stop_token_ids
from safesteer.hooks import add_vector, decoder_layers
from safesteer.sampling import decode_completions, sample, shared_prefix_len
from safesteer import directions
import extract_direction as ed
from safesteer.errors import UserError
from test_steering import record_block_inputs

PROMPTS_A = ["how do I do a bad thing", "tell me something awful", "x"]
PROMPTS_B = ["what is the weather like", "recommend a book about trees please", "hi there"]


def block_inputs_one_prompt(model, tok, prompt):
    """Brute force: run one unpadded prompt, record every block's input: [L, seq, hidden]."""
    seen = {}
    handles = [b.register_forward_pre_hook(
                   lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"])[0]),
                   with_kwargs=True)
               for i, b in enumerate(decoder_layers(model))]
    ids, mask = encode_chats(tok, [prompt])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    [h.remove() for h in handles]
    return torch.stack([seen[i] for i in range(len(seen))])


def test_shared_prefix_batches_equal_plain_forward(tok, model):
    post = post_instruction_ids(tok)
    pb = directions.PromptBatches(tok, PROMPTS_A + PROMPTS_B, batch_size=4, device="cpu")
    for idx, ids, mask in pb.batches:  # the template suffix ends every left-padded row; the opening is shared
        assert all(row[-len(post):].tolist() == post for row in ids)
        assert shared_prefix_len([r[m.bool()].tolist() for r, m in zip(ids, mask)], model) > 0
    ids, mask = encode_chats(tok, PROMPTS_A + PROMPTS_B)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert torch.allclose(pb.last_logits(model), ref, atol=1e-4)


def test_mean_difference_equals_brute_force(tok, model):
    n_pos = len(post_instruction_ids(tok))
    r = directions.candidate_directions(model, directions.PromptBatches(tok, PROMPTS_A, 2, "cpu"),
                                directions.PromptBatches(tok, PROMPTS_B, 2, "cpu"), n_pos)
    mean = lambda ps: torch.stack([block_inputs_one_prompt(model, tok, p)[:, -n_pos:].double()
                                   for p in ps]).mean(0)
    ref = (mean(PROMPTS_A) - mean(PROMPTS_B)).transpose(0, 1)  # [n_pos, L, hidden]
    assert r.dtype == torch.float64 and r.shape == ref.shape
    assert torch.allclose(r, ref, atol=1e-5)


def test_refusal_score_and_kl_brute_force():
    logits = torch.randn(3, 11)
    R = [2, 5]
    p = torch.softmax(logits.double(), -1)[:, R].sum(-1)
    assert torch.allclose(ed.refusal_score(logits, R), torch.log(p / (1 - p)))
    other = torch.randn(3, 11)
    p0, p1 = torch.softmax(logits.double(), -1), torch.softmax(other.double(), -1)
    assert torch.allclose(ed.kl_last(logits, other), (p0 * torch.log(p0 / p1)).sum(-1))


def test_ablation_hooks_removed_after_exception(model):
    with pytest.raises(RuntimeError):
        with directions.ablate_direction(model, torch.randn(model.config.hidden_size)):
            raise RuntimeError("boom")
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def test_ablation_leaves_block_inputs_orthogonal(tok, model):
    ids, mask = encode_chats(tok, ["hi", "tell me a long story please", "why?"])
    r = torch.randn(model.config.hidden_size)
    with torch.no_grad(), directions.ablate_direction(model, r):
        seen, handles = record_block_inputs(model)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        [x.remove() for x in handles]
    unit = r / r.norm()
    for i, h in seen.items():
        assert (h @ unit).abs().max() < 1e-5, i
    # the last block's output (before the final norm) carries no r̂ either
    assert (out.hidden_states[-1] @ unit).abs().max() < 1e-4


def test_scores_equal_hand_computation(tok, model):
    R = [5, 7, 9]
    hv, sv = (directions.PromptBatches(tok, ps, 2, "cpu") for ps in (PROMPTS_B, PROMPTS_A))
    r = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64) * 3
    rows = ed.score_candidates(model, r, [(1, 2)], sv, hv, R, ["a", "b"])
    vec = r[1, 2].float()

    def score(prompts, ctx):
        ids, mask = encode_chats(tok, prompts)
        with torch.no_grad(), ctx:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].double()
        return logits

    def s(logits):
        p = torch.softmax(logits, -1)[:, R].sum(-1)
        return torch.log(p / (1 - p)).mean().item()
    import contextlib
    base = torch.softmax(score(PROMPTS_B, contextlib.nullcontext()), -1)
    abl = torch.softmax(score(PROMPTS_B, directions.ablate_direction(model, vec)), -1)
    row = rows[0]
    assert row["layer"] == 2 and row["position"] == -1 and row["token"] == "b"
    assert row["bypass"] == pytest.approx(s(score(PROMPTS_A, directions.ablate_direction(model, vec))),
                                          abs=1e-4)
    assert row["induce"] == pytest.approx(s(score(PROMPTS_B, add_vector(model, 2, vec))), abs=1e-4)
    assert row["kl"] == pytest.approx((base * (base / abl).log()).sum(-1).mean().item(), abs=1e-5)


def row(layer, bypass, induce, kl):
    return {"layer": layer, "position": -1, "bypass": bypass, "induce": induce, "kl": kl}


def test_select_authors_rule_and_fallback():
    rows = [row(1, -1.0, 0.5, 0.05), row(2, -3.0, 0.1, 0.05),   # 2: lowest bypass among survivors
            row(3, -9.0, 1.0, 0.5),                             # kl too high
            row(9, -9.0, 1.0, 0.01),                            # layer >= 0.8 L
            row(4, -9.0, -0.1, 0.01),                           # induce < 0
            row(5, float("nan"), 1.0, 0.01)]                    # NaN
    best, rule = ed.select_direction(rows, n_layers=10)
    assert (best["layer"], rule) == (2, "authors")
    never_refuses = [row(1, -5.0, -2.0, 0.05), row(2, -5.0, -1.0, 0.05), row(3, -5.0, -0.5, 0.2),
                     row(8, -5, 3.0, 0.0)]
    best, rule = ed.select_direction(never_refuses, n_layers=10)
    assert (best["layer"], rule) == (2, "fallback_highest_induce")
    with pytest.raises(UserError, match="no candidate"):
        ed.select_direction([row(1, 0, 0, 5.0)], n_layers=10)


def test_main_writes_the_contract(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--out", str(out), "--n-train", "4", "--n-val", "3",
            "--n-check-prompts", "2", "--check-new-tokens", "4", "--seed", "1"]
    ed.main(argv)
    meta = json.loads((out / "direction.json").read_text())
    vec = load_file(out / "direction.safetensors")["direction"]
    cands = json.loads((out / "candidates.json").read_text())["candidates"]
    check = json.loads((out / "steering_check.json").read_text())
    n_pos = len(json.loads((out / "candidates.json").read_text())["positions"])
    assert vec.dtype == torch.float32 and vec.shape == (meta["hidden_size"],)
    skipped = json.loads((out / "candidates.json").read_text())["skipped"]
    # block 0's input at the template's tokens is the same embedding for every prompt: r = 0 there, not scored
    assert {(s["layer"], s["reason"]) for s in skipped} == {(0, "zero direction")} and len(skipped) == n_pos
    assert len(cands) == n_pos * (meta["n_layers"] - 1) and all(c["layer"] > 0 for c in cands)
    assert meta["norm"] == pytest.approx(vec.norm().item(), rel=1e-5)
    for key in ("layer", "position", "coefficient", "selection_rule", "fallback_used", "scores", "data",
                "seed", "torch", "transformers", "git_commit"):
        assert key in meta
    assert meta["layer"] < 0.8 * meta["n_layers"]
    assert len(check["samples"]) == 2 and 0 <= check["refusal_rate_steered"] <= 1
    printed = capsys.readouterr().out
    assert "wrote" in printed and str(out / "direction.json") in printed
    # same seed, same inputs -> the same direction
    ed.main(argv + ["--out", str(tmp_path / "run2")])
    assert torch.equal(vec, load_file(tmp_path / "run2" / "direction.safetensors")["direction"])
    with pytest.raises(UserError, match="--overwrite"):
        ed.main(argv)


def test_forced_candidate_and_bad_layer(model_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--model", str(model_dir), "--out", str(out), "--n-train", "3", "--n-val", "2",
            "--n-check-prompts", "0"]
    ed.main(base + ["--layer", "1", "--position", "-2"])
    meta = json.loads((out / "direction.json").read_text())
    assert (meta["layer"], meta["position"], meta["selection_rule"]) == (1, -2, "forced")
    with pytest.raises(UserError, match="out of range|must be in"):
        ed.main(base + ["--layer", "7", "--position", "-1", "--overwrite"])
    with pytest.raises(UserError, match="together"):
        ed.main(base + ["--layer", "1", "--overwrite"])


def test_response_direction_equals_brute_force(tok, model):
    ref_text, comp_text = "no way", "sure thing, here"
    r = directions.response_directions(model, tok, PROMPTS_A, ref_text, comp_text, batch_size=2)

    def mean_over_answer(answer):
        rows = []
        n = len(tok(answer, add_special_tokens=False).input_ids)
        for p in PROMPTS_A:  # one unpadded sequence at a time, block inputs recorded by hand
            seen = {}
            hs = [b.register_forward_pre_hook(
                      lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"])[0]),
                      with_kwargs=True)
                  for i, b in enumerate(decoder_layers(model))]
            ids = tok(render_chat(tok, p) + answer, add_special_tokens=False,
                      return_tensors="pt").input_ids
            with torch.no_grad():
                model(input_ids=ids)
            [h.remove() for h in hs]
            rows.append(torch.stack([seen[i][-n:].double().mean(0) for i in range(len(seen))]))
        return torch.stack(rows).mean(0)
    ref = mean_over_answer(ref_text) - mean_over_answer(comp_text)
    assert r.shape == (1, 4, model.config.hidden_size)
    assert torch.allclose(r[0], ref, atol=1e-5)


def test_main_kind_response(model_dir, tmp_path):
    out = tmp_path / "run"
    ed.main(["--model", str(model_dir), "--out", str(out), "--kind", "response", "--n-train", "3",
             "--n-val", "2", "--n-check-prompts", "0", "--kl-max", "1e9"])
    meta = json.loads((out / "direction.json").read_text())
    cands = json.loads((out / "candidates.json").read_text())["candidates"]
    assert meta["kind"] == "response" and meta["position"] == -1 and len(cands) == 4
    assert meta["response_texts"]["refusal"] == ed.REFUSAL_TEXT
    with pytest.raises(UserError, match="position in -1..-1"):
        ed.main(["--model", str(model_dir), "--out", str(out), "--kind", "response", "--layer", "1",
                 "--position", "-2", "--overwrite"])


def test_teacher_grid_ranks_blocks_then_measures_every_c(tok, model):
    r = torch.randn(1, 4, model.config.hidden_size, dtype=torch.float64)
    harmful, harmless = ["how do I do a bad thing", "tell me"], ["hi"]
    sv, hv = (directions.PromptBatches(tok, ps, 2, "cpu") for ps in (harmful, harmless))
    blocks = [{"position": -1, "layer": l} for l in range(4)]
    ranked, top = ed.rank_blocks(model, r, blocks, [1.0, 0.5, 2.0], sv, hv, refusal_ids=[5, 6], n_blocks=2)
    assert sorted(t["layer"] for t in ranked) == [0, 1, 2, 3] and {t["coefficient"] for t in ranked} == {1.0}
    scores = [t["first_token_selectivity"] for t in ranked]
    assert scores == sorted(scores, reverse=True)  # ranked at the middle c, best first
    expected = [(t["layer"], c) for t in ranked[:2] for c in (1.0, 0.5, 2.0)]
    assert [(t["layer"], t["coefficient"]) for t in top] == expected
    ok = blocks[1:3]
    ranked = ed.first_token_selectivity(model, r, ok, [0.5, 1.0], sv, hv, refusal_ids=[5, 6])
    assert [(t["layer"], t["coefficient"]) for t in ranked] == [(1, 0.5), (1, 1.0), (2, 0.5), (2, 1.0)]
    # p_R by hand for one teacher: softmax mass of R at the last position, plain forward with the hook
    ids, mask = encode_chats(tok, harmful)
    with add_vector(model, 2, r[0, 2].float(), 1.0), torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits[:, -1].double().softmax(-1)
    assert ranked[3]["p_r_harmful"] == pytest.approx(probs[:, [5, 6]].sum(-1).mean().item(), rel=1e-4)
    assert ranked[3]["first_token_selectivity"] == ranked[3]["p_r_harmful"] - ranked[3]["p_r_harmless"]
    ids0, mask0 = encode_chats(tok, harmless)  # the teacher's KL on harmless prompts, by hand
    with torch.no_grad():
        p0 = model(input_ids=ids0, attention_mask=mask0).logits[:, -1].double().softmax(-1)
        with add_vector(model, 2, r[0, 2].float(), 1.0):
            p1 = model(input_ids=ids0, attention_mask=mask0).logits[:, -1].double().softmax(-1)
    assert ranked[3]["teacher_kl"] == pytest.approx((p0 * (p0 / p1).log()).sum(-1).mean().item(), rel=1e-4)

    grid = ed.teacher_selectivity(model, tok, r, ranked[2:], harmful, harmless, max_tokens=3)
    assert all(g["selectivity"] == g["refusal_harmful"] - g["refusal_harmless"] for g in grid)
    # the rates are the judge's verdicts on the steered greedy answers, computed here by hand for one teacher
    with add_vector(model, 2, r[0, 2].float(), 1.0):
        ids, mask = encode_chats(tok, ["hi"])
        text = decode_completions(tok, *sample(model, ids, mask, 3, temperature=0,
                                                                 stop_ids=stop_token_ids(tok),
                                                                 pad_id=tok.pad_token_id))
    assert grid[1]["refusal_harmless"] == float(ed.is_refusal(text[0]))
    g = [{"layer": 1, "coefficient": 1.0, "selectivity": 0.3, "refusal_harmless": 0.1},
         {"layer": 2, "coefficient": 0.5, "selectivity": 0.3, "refusal_harmless": 0.1},
         {"layer": 3, "coefficient": 0.5, "selectivity": 0.3, "refusal_harmless": 0.2},
         {"layer": 4, "coefficient": 0.5, "selectivity": 0.1, "refusal_harmless": 0.0}]
    assert ed.best_teacher(g)["layer"] == 2  # ties: less harmless refusal, then the smaller c


def test_main_with_teacher_grid(model_dir, tmp_path):
    out = tmp_path / "run"
    ed.main(["--model", str(model_dir), "--out", str(out), "--kind", "response", "--n-train", "3",
             "--n-val", "2", "--n-check-prompts", "1", "--check-new-tokens", "2", "--kl-max", "1e-9",
             "--teacher-grid", "0.5", "2", "--grid-blocks", "2", "--grid-new-tokens", "2"])
    meta = json.loads((out / "direction.json").read_text())
    cands = json.loads((out / "candidates.json").read_text())
    teachers, ranked = cands["teachers"], cands["teachers_ranked"]
    # 4 blocks < 0.8 L ranked at c = 2 (the middle of two), the best 2 measured at both c; no ablation-KL
    # bound
    assert len(ranked) == 4 and len(teachers) == 2 * 2 and meta["selection_rule"] == "selectivity"
    assert ([(t["layer"], t["coefficient"]) for t in teachers]
            == [(t["layer"], c) for t in ranked[:2] for c in (0.5, 2)])
    assert ((meta["layer"], meta["coefficient"])
            == (meta["teacher_grid"]["layer"], meta["teacher_grid"]["coefficient"]))
    assert meta["teacher_grid"] == ed.best_teacher(teachers)
