"""Stage 2 against brute force on a tiny random Llama."""
import json

import pytest
import torch

from safesteer.chat import encode_chats, special_token_ids
from safesteer.hooks import add_vector, decoder_layers
from safesteer.models import load_model
from safesteer.teacher import Teacher
import select_tokens as st
from safesteer.errors import UserError


def hook_teacher(model, vec, layer=1, c=1.0):
    return Teacher(model, "hook", vec, layer, c)


def test_delta_equals_brute_force(tok, model):
    vec = torch.randn(model.config.hidden_size) * 2
    teacher = hook_teacher(model, vec)
    batch = st.teacher_samples(model, tok, teacher, ["hi", "tell me more"], m=2, h=5, batch_size=4,
                               gen=torch.Generator().manual_seed(0))[0]
    batch["comp_mask"][0, 3:] = 0  # pretend row 0 ended early: its later positions must drop out
    log_pt, log_p0 = st.teacher_and_base_logprobs(model, tok, teacher, batch)
    assert log_pt.shape[0] == int(batch["comp_mask"].sum())
    rows = []
    for prompt, comp, cm in zip(batch["prompts"], batch["comp"], batch["comp_mask"]):
        ids, _ = encode_chats(tok, [prompt])  # unpadded, one sequence at a time
        full = torch.cat([ids[0], comp])[None]
        with torch.no_grad():
            with add_vector(model, 1, vec):
                lt = model(input_ids=full).logits[0].double().log_softmax(-1)
            l0 = model(input_ids=full).logits[0].double().log_softmax(-1)
        plen = ids.shape[1]
        for i in range(len(comp)):
            if cm[i]:
                rows.append((lt[plen - 1 + i], l0[plen - 1 + i]))
    ref_t = torch.stack([r[0] for r in rows]); ref_0 = torch.stack([r[1] for r in rows])
    assert torch.allclose(log_pt.double(), ref_t, atol=1e-4)
    assert torch.allclose(st.contrastive_logprobs(log_pt, log_p0).double(), ref_t - ref_0, atol=1e-4)
    kl_terms = st.token_scores(log_pt, log_p0, "kl").double()
    assert torch.allclose(kl_terms, ref_t.exp() * (ref_t - ref_0), atol=1e-4)


@pytest.mark.parametrize("score", ["delta", "kl"])
@pytest.mark.parametrize("aggregate", ["vote", "mean"])
def test_vote_recovers_tokens_the_direction_raises(tok, model, score, aggregate):
    """Steer with the unembedding rows of known tokens at the last block: S must be exactly those tokens,
    and a special token that the direction also raises must stay out."""
    targets = [tok.convert_tokens_to_ids(c) for c in ("Q", "Z", "j")]
    special = tok.convert_tokens_to_ids("<|im_start|>")
    assert special in special_token_ids(tok)
    with torch.no_grad():  # orthogonal unembedding rows for the raised tokens, so no random row competes
        w = model.lm_head.weight
        for j, i in enumerate(targets + [special]):
            w[i] = 0
            w[i, j] = 3.0
    vec = torch.zeros(model.config.hidden_size)
    vec[:4] = 30.0
    teacher = hook_teacher(model, vec, layer=len(decoder_layers(model)) - 1)
    batches = st.teacher_samples(model, tok, teacher, ["hello", "what now"], m=2, h=4, batch_size=8,
                                 gen=torch.Generator().manual_seed(0))
    rule = st.Selection(score=score, aggregate=aggregate, k=3, k_vote=3, prob_floor=0.0)
    sel = st.select(model, tok, teacher, batches, rule)
    assert sorted(sel["ids"].tolist()) == sorted(targets)
    assert special not in sel["ids"].tolist()


def test_vote_and_mean_agree_on_unambiguous_scores():
    torch.manual_seed(0)
    scores = torch.randn(20, 30)
    scores[:, [4, 9, 17]] += 10  # the same three tokens top every position
    eligible = torch.ones(30, dtype=torch.bool)
    s_vote, votes = st.vote(scores, eligible, k_vote=3, k=3)
    s_mean = st.mean_aggregate(scores, eligible, k=3)
    assert sorted(s_vote.tolist()) == sorted(s_mean.tolist()) == [4, 9, 17]
    assert votes[[4, 9, 17]].tolist() == [20, 20, 20] and votes.sum() == 60


def test_vote_brute_force_counts_and_eligibility():
    torch.manual_seed(1)
    scores = torch.randn(7, 12)
    eligible = torch.ones(12, dtype=torch.bool)
    eligible[[0, 5]] = False
    s, votes = st.vote(scores, eligible, k_vote=4, k=5)
    ref = torch.zeros(12, dtype=torch.long)
    for row in scores:
        ranked = sorted((v for v in range(12) if eligible[v]), key=lambda v: -row[v])[:4]
        ref[ranked] += 1
    assert torch.equal(votes, ref)
    assert votes[0] == 0 and votes[5] == 0
    assert set(s.tolist()) <= {v for v in range(12) if ref[v] > 0} and len(s) == 5
    assert min(votes[s].tolist()) >= sorted(ref.tolist(), reverse=True)[4]


def test_eligible_tokens_floor_special_and_padding():
    mean_pt = torch.tensor([0.5, 1e-9, 0.2, 0.2, 0.1])
    ok = st.eligible_tokens(mean_pt, special_ids=[2], vocab_size=4, floor=1e-6)
    assert ok.tolist() == [True, False, False, True, False]


def test_coverage_is_one_on_full_vocab_and_brute_force():
    log_pt = torch.randn(5, 9).log_softmax(-1)
    log_p0 = torch.randn(5, 9).log_softmax(-1)
    shift = st.tv_shift(log_pt, log_p0)
    assert torch.allclose(st.coverage(shift, torch.arange(9)), torch.ones(5))
    s = torch.tensor([1, 4])
    d = (log_pt.exp() - log_p0.exp()).abs()
    assert torch.allclose(st.coverage(shift, s), d[:, [1, 4]].sum(-1) / d.sum(-1))


def test_coverage_of_one_pass_equals_teacher_forcing_again(tok, model):
    """select() measures coverage on the selection prompts from the pass that scored them: the same number
    as teacher-forcing πt and π0 on those samples once more (what mean_coverage does for the second prompt
    set)."""
    teacher = hook_teacher(model, torch.randn(model.config.hidden_size) * 3)
    batches = st.teacher_samples(model, tok, teacher, ["hi", "tell me more", "why"], m=2, h=4, batch_size=4,
                                 gen=torch.Generator().manual_seed(0))
    sel = st.select(model, tok, teacher, batches, st.Selection(k=5, k_vote=10, prob_floor=0.0))
    assert sel["coverage"] == pytest.approx(st.mean_coverage(model, tok, teacher, batches, sel["ids"]),
                                            rel=1e-6)


def test_main_writes_the_contract(model_dir, tmp_path, capsys):
    import extract_direction as ed
    out = tmp_path / "run"
    ed.main(["--model", str(model_dir), "--out", str(out), "--n-train", "3", "--n-val", "2",
             "--layer", "1", "--position", "-1", "--n-check-prompts", "0", "--coefficient", "4"])
    argv = ["--model", str(model_dir), "--out", str(out), "--n-prompts", "3", "--samples", "2",
            "--max-new-tokens", "3", "--k", "5", "--k-vote", "10", "--score", "kl"]
    st.main(argv)
    res = json.loads((out / "safety_tokens.json").read_text())
    assert len(res["token_ids"]) == len(res["tokens"]) == len(res["votes"]) == len(res["mean_delta"]) <= 5
    assert res["vocab_size"] == len(load_model(str(model_dir))[1])
    assert res["settings"]["coefficient"] == 4 and res["settings"]["score"] == "kl"
    assert 0 <= res["coverage"]["selection_prompts"] <= 1 and 0 <= res["coverage"]["harmful_val"] <= 1
    assert len(res["tokenizer_fingerprint"]) == 16
    assert "wrote" in capsys.readouterr().out
    st.main(argv + ["--out", str(tmp_path / "run2"), "--direction", str(out / "direction.safetensors")])
    assert json.loads((tmp_path / "run2" / "safety_tokens.json").read_text())["token_ids"] == res["token_ids"]
    with pytest.raises(UserError, match="direction file not found"):
        st.main(argv + ["--out", str(tmp_path / "empty")])


@pytest.mark.parametrize("aggregate", ["vote", "mean"])
def test_contrast_keeps_what_is_specific_to_the_selection_prompts(tok, monkeypatch, aggregate):
    """Token 5 is raised on both prompt sets (generic), token 9 only on the selection set: only 9 survives."""
    v = len(tok)
    sel, con = torch.zeros(6, v), torch.zeros(4, v)
    sel[:, 5] = sel[:, 9] = 3.0
    con[:, 5] = 3.0
    con[:, 11] = 3.0  # raised only on the contrast set: a negative rank, never in S
    mean_pt = torch.full((v,), 1.0 / v)
    calls = iter([(sel, sel.abs(), mean_pt, sel.mean(0)), (con, con.abs(), mean_pt, con.mean(0))])
    monkeypatch.setattr(st, "position_scores", lambda *a, **k: next(calls))
    rule = st.Selection(score="kl", aggregate=aggregate, k=3, k_vote=2, prob_floor=0.0)
    out = st.select(None, tok, None, ["sel"], rule, contrast_batches=["con"])
    assert out["ids"].tolist() == [9]
