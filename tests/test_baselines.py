"""The baselines: each loss against a float64 computation written out by hand, the -mix wiring, the budget,
and end-to-end runs whose students load in transformers and evaluate with Stage 4."""
import copy
import json
import math

import pytest
import torch

from experiments import baselines as bl
from safesteer.chat import encode_chats
from safesteer.cli import run_cli
from safesteer.files import data_file, read_prompts, save_tensors, write_json
from safesteer.teacher import Teacher
import distill
import evaluate
from safesteer.scale import parallel
from safesteer import forcing


# ----------------------------------------------------------------------------- brute force, float64, by hand

def brute_logprob(z, answer, n):
    """log π(y|x) of one answer, position by position: Σ_{t<n} (z[t, y_t] - log Σ_v exp z[t, v]). z: [T, V]"""
    total = torch.zeros((), dtype=torch.float64)
    for t in range(n):
        total = total + z[t, answer[t]] - torch.log(torch.exp(z[t] - z[t].max()).sum()) - z[t].max()
    return total


def brute_softplus(x):
    """-log σ(x) = log(1 + e^(-x)), written so that no exponent is positive (any β)."""
    return torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs()))


def brute_dpo(zs, answers, lengths, beta):
    """zs: the logits [b, T, V] of policy chosen, policy rejected, ref chosen, ref rejected; the mean loss."""
    losses = []
    for r in range(zs[0].shape[0]):
        lp = [brute_logprob(z[r], y[r], n[r]) for z, y, n in zip(zs, answers + answers, lengths + lengths)]
        losses.append(brute_softplus(beta * ((lp[0] - lp[2]) - (lp[1] - lp[3]))))
    return torch.stack(losses).mean()


def first_stop_lengths(answer, stops):
    """Tokens through the first stop token (inclusive), or the whole row: found from the tokens themselves."""
    out = []
    for row in answer.tolist():
        hit = [i for i, t in enumerate(row) if t in stops]
        out.append(hit[0] + 1 if hit else len(row))
    return out


def brute_sft(z, answer, lengths):
    return torch.stack([-brute_logprob(z[r], answer[r], n) / n for r, n in enumerate(lengths)]).mean()


def mask_of(lengths, width):
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()


def random_case(b=3, t=5, v=11, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    answer = torch.randint(0, v, (b, t), generator=g)
    return logits, answer


# ----------------------------------------------------------------------------- sequence_logprobs

def test_sequence_logprobs_on_a_tiny_model_equal_a_loop_over_positions(tok, model):
    """Left-padded prompts of three lengths (as encode_chats makes them), answers of 3, 1 and 5 tokens with
    anything after them: the sum over each answer's tokens equals a float64 loop over positions of the
    unpadded prompt + answer, so neither prompt nor padding counts."""
    ids, mask = encode_chats(tok, ["hi", "what is the capital of France?", "tell me"])
    assert (mask == 0).any()  # left padding is exercised
    answer = torch.randint(0, 250, (3, 5), generator=torch.Generator().manual_seed(1))
    lengths = [3, 1, 5]
    got = bl.sequence_logprobs(forcing.completion_logits(model, ids, mask, answer), answer,
                               mask_of(lengths, 5))
    wide = copy.deepcopy(model).double()
    for r, n in enumerate(lengths):
        prompt = ids[r][mask[r].bool()]
        with torch.no_grad():
            z = wide(input_ids=torch.cat([prompt, answer[r]])[None]).logits[0]  # [plen + T, V]
        expected = sum(z[len(prompt) - 1 + t].log_softmax(-1)[answer[r, t]] for t in range(n))
        assert got[r].item() == pytest.approx(expected.item(), abs=1e-4)


def test_sequence_logprobs_ignore_masked_tokens_and_a_shift_of_the_logits():
    logits, answer = random_case()
    lengths = [2, 5, 1]
    ref = torch.stack([brute_logprob(logits[r], answer[r], n) for r, n in enumerate(lengths)])
    got = bl.sequence_logprobs(logits.float(), answer, mask_of(lengths, 5))
    assert torch.allclose(got.double(), ref, atol=1e-5)
    other = answer.clone()
    other[0, 2:], other[2, 1:] = 0, 7  # beyond each answer's mask
    shifted = logits.float() + torch.randn(3, 5, 1) * 40  # a constant per position
    assert torch.allclose(bl.sequence_logprobs(shifted, other, mask_of(lengths, 5)), got, atol=1e-4)


# ----------------------------------------------------------------------------- dpo_loss

def dpo_through_ours(zs, answers, lengths, beta):
    """Our path: sequence_logprobs of the four logits in float32, then dpo_loss, mean over pairs."""
    masks = [mask_of(n, zs[0].shape[1]) for n in lengths]
    lp = [bl.sequence_logprobs(z, y, m) for z, y, m in zip(zs, answers + answers, masks + masks)]
    return bl.dpo_loss(*lp, beta)[0].mean()


def dpo_case(seed=0, scale=3.0):
    (pc, yc), (pr, yr) = random_case(seed=seed, scale=scale), random_case(seed=seed + 1, scale=scale)
    rc, rr = random_case(seed=seed + 2, scale=scale)[0], random_case(seed=seed + 3, scale=scale)[0]
    return [pc, pr, rc, rr], [yc, yr], [[2, 5, 1], [4, 1, 3]]


def check_dpo(zs, answers, lengths, beta, rel=1e-4):
    """Loss and gradient (on the policy's logits) of ours in float32 against autograd through brute_dpo."""
    ref = [z.clone().requires_grad_(i < 2) for i, z in enumerate(zs)]
    ref_loss = brute_dpo(ref, answers, lengths, beta)
    ref_loss.backward()
    ours = [z.float().requires_grad_(i < 2) for i, z in enumerate(zs)]
    loss = dpo_through_ours(ours, answers, lengths, beta)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=rel, abs=1e-6)
    for a, b in zip(ours[:2], ref[:2]):
        assert torch.allclose(a.grad.double(), b.grad, rtol=rel, atol=1e-6 * max(1.0, b.grad.abs().max()))
    return loss


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_dpo_loss_and_gradient_equal_brute_force(beta):
    check_dpo(*dpo_case(), beta)


def test_dpo_with_a_very_large_beta_is_finite_and_exact():
    """β = 1e4: the margin is thousands, exp(-βm) overflows float64; logsigmoid must not. The loss is then
    relu(-βm) for the mean margin, to the last digit."""
    zs, answers, lengths = dpo_case(seed=4)
    loss = check_dpo(zs, answers, lengths, 1e4)
    assert math.isfinite(loss.item()) and loss.item() > 100  # this case's πs prefers y_r: a big loss


def test_dpo_chosen_equal_rejected_gives_log_2_and_no_gradient():
    (pc, yc), rc = random_case(seed=7), random_case(seed=8)[0]
    lengths = [2, 5, 1]
    policy = pc.float().requires_grad_(True)
    loss = dpo_through_ours([policy, policy, rc.float(), rc.float()], [yc, yc], [lengths, lengths], 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert policy.grad.abs().max().item() < 1e-7


def test_dpo_is_unchanged_when_logits_are_shifted_by_a_constant():
    zs, answers, lengths = dpo_case(seed=2)
    shifted = [z + 30.0 * (-1) ** i for i, z in enumerate(zs)]  # each model's logits, its own shift
    g = [z.float().requires_grad_(True) for z in zs]
    gs = [z.float().requires_grad_(True) for z in shifted]
    a, b = dpo_through_ours(g, answers, lengths, 0.5), dpo_through_ours(gs, answers, lengths, 0.5)
    (a + b).backward()
    assert a.item() == pytest.approx(b.item(), abs=1e-5)
    assert torch.allclose(g[0].grad, gs[0].grad, atol=1e-6)
    check_dpo(shifted, answers, lengths, 0.5)


def test_dpo_margin_is_the_reward_difference():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    loss, margin = bl.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert margin.item() == pytest.approx(0.1 * ((-3 + 4) - (-5 + 4.5)))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin.item())))


# ----------------------------------------------------------------------------- sft_loss

def test_sft_loss_and_gradient_equal_brute_force_with_a_one_token_answer():
    logits, answer = random_case(seed=3)
    lengths = [1, 5, 3]  # the first answer is its end of turn alone
    ref = logits.clone().requires_grad_(True)
    expected = brute_sft(ref, answer, lengths)
    expected.backward()
    ours = logits.float().requires_grad_(True)
    loss = bl.sft_loss(ours, answer, mask_of(lengths, 5))
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(ours.grad.double(), ref.grad, atol=1e-6)
    assert ours.grad[0, 1:].abs().max() == 0 and ours.grad[2, 3:].abs().max() == 0  # masked: no gradient


def test_sampled_answers_end_at_the_first_stop_and_sft_ignores_what_follows(tok, model, monkeypatch):
    """The answers come from Stage 3's sampler, which stops a row at its first end of turn; with many
    stop tokens the rows end early, and sft_loss equals the brute force that finds each row's end from
    its tokens. Tokens written after that end change nothing."""
    stops = list(range(60, 200))
    monkeypatch.setattr(distill, "stop_token_ids", lambda tok: stops)
    recipe = distill.Recipe(samples=3, max_new_tokens=6, prompts_per_step=2)
    loop = parallel.Loop(None, None, torch.Generator().manual_seed(0))
    prompts = ["hello", "how are you", "hello"]  # a repeated prompt is answered once
    answers = bl.sample_answers(Teacher(model, "base"), tok, prompts, recipe, loop)
    assert list(answers) == ["hello", "how are you"]
    comp, cmask = bl.answer_rows(answers, ["hello", "how are you"])  # [6, T]
    lengths = first_stop_lengths(comp, set(stops))
    assert cmask.sum(-1).tolist() == lengths and min(lengths) < comp.shape[1]
    assert all(cmask[r, :n].all() and not cmask[r, n:].any() for r, n in enumerate(lengths))
    ids, mask = encode_chats(tok, [p for p in ["hello", "how are you"] for _ in range(3)])
    with torch.no_grad():
        z = forcing.completion_logits(model, ids, mask, comp)
    loss = bl.sft_loss(z, comp, cmask)
    assert loss.item() == pytest.approx(brute_sft(z.double(), comp, lengths).item(), rel=1e-5)
    after = torch.where(cmask.bool(), comp, torch.full_like(comp, 5))
    assert bl.sft_loss(z, after, cmask).item() == pytest.approx(loss.item(), abs=1e-7)


# ----------------------------------------------------------------------------- the -mix wiring and the step

def fake_answers(prompts, g, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in prompts:
        comp = torch.randint(0, 250, (g, 5), generator=gen)
        out[p] = comp, mask_of([int(n) for n in torch.randint(1, 6, (g,), generator=gen)], 5)
    return out


def test_groups_prefer_the_teacher_on_harmful_and_the_base_on_anchors():
    harmful, anchors = ["h1", "h2"], ["a1"]
    both = harmful + anchors
    answers = {"teacher": fake_answers(both, 2, 0), "base": fake_answers(both, 2, 1)}
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    dpo = bl.step_groups(harmful, anchors, answers, True, 0.7, 2)
    assert [g.name for g in dpo] == ["harmful", "anchor"] and [g.weight for g in dpo] == [1.0, 0.7]
    assert dpo[0].prompts == ["h1", "h1", "h2", "h2"]
    assert same(dpo[0].chosen, bl.answer_rows(answers["teacher"], harmful))
    assert same(dpo[0].rejected, bl.answer_rows(answers["base"], harmful))
    assert same(dpo[1].chosen, bl.answer_rows(answers["base"], anchors))
    assert same(dpo[1].rejected, bl.answer_rows(answers["teacher"], anchors))
    sft = bl.step_groups(harmful, anchors, answers, False, 0.7, 2)
    assert same(sft[1].chosen, bl.answer_rows(answers["base"], anchors)) and sft[1].rejected is None


@pytest.mark.parametrize("dpo", [False, True], ids=["sft-mix", "dpo-mix"])
def test_mixed_step_gradient_is_harmful_loss_plus_lambda_anchor_loss(tok, model, dpo):
    """train_step in micro-batches of 3 rows applies the gradient of L(harmful) + λ·L(anchor), each computed
    by hand on all its rows at once (DPO: against a frozen copy of π0)."""
    harmful, anchors, g = ["hello", "how are you"], ["what is 2+2"], 2
    both = harmful + anchors
    answers = {"teacher": fake_answers(both, g, 0), "base": fake_answers(both, g, 1)}
    groups = bl.step_groups(harmful, anchors, answers, dpo, 0.5, g)
    ref = copy.deepcopy(model).requires_grad_(False)

    def group_loss(group):
        ids, mask = encode_chats(tok, group.prompts)
        if not dpo:
            return bl.sft_loss(forcing.completion_logits(model, ids, mask, group.chosen[0]), *group.chosen)
        lp = []
        for m in (model, ref):
            for y, ym in (group.chosen, group.rejected):
                lp.append(bl.sequence_logprobs(forcing.completion_logits(m, ids, mask, y), y, ym))
        return bl.dpo_loss(*lp, 0.1)[0].mean()
    model.zero_grad()
    (group_loss(groups[0]) + 0.5 * group_loss(groups[1])).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad = lambda set_to_none=True: None  # the step's gradients stay, to be read after it
    loop = parallel.Loop(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    recipe = distill.Recipe(micro_batch=3, clip=1e9)
    rec = bl.train_step(model, tok, groups, Teacher(ref, "base"), recipe, loop, beta=0.1)
    assert all(torch.allclose(p.grad, b, atol=1e-6) for p, b in zip(model.parameters(), expected))
    assert rec["loss"] == pytest.approx(rec["harmful_loss"] + 0.5 * rec["anchor_loss"], abs=1e-6)
    if dpo:  # the policy is π0 here: every margin is 0, the loss log 2
        assert rec["harmful_reward_margin"] == pytest.approx(0, abs=1e-5)
        assert rec["harmful_loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert 0 <= rec["harmful_reward_accuracy"] <= 1  # ties at float32 noise: the sign is a coin
    assert rec["answer_tokens"] == sum(int(m.sum()) for gr in groups for y in (gr.chosen, gr.rejected)
                                       if y is not None for m in [y[1]])


# ----------------------------------------------------------------------------- the script

def make_run(out, model_dir):
    """Stage 1's output written directly: a random direction at block 1 (the baselines need no S)."""
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    torch.manual_seed(0)
    save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden})


def args_for(model_dir, out, method, *extra):
    anchor = ["--anchor", str(data_file("harmless_val")), "--anchor-per-step", "1"]
    return ["--model", str(model_dir), "--out", str(out), "--method", method, "--prompts-per-step", "2",
            "--samples", "2", "--max-new-tokens", "4", "--max-steps", "2", "--lr", "1e-3",
            "--micro-batch", "3",
            *(anchor if method.endswith("-mix") else []), *extra]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "dpo", "sft-mix", "dpo-mix"])
def test_each_method_writes_a_student_that_transformers_loads(method, model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    make_run(out, model_dir)
    bl.main(args_for(model_dir, out, method))
    student = AutoModelForCausalLM.from_pretrained(out / method)  # the method's name by default
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    weights = zip(student.state_dict().values(), base.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in weights)
    info = json.loads((out / method / "safesteer.json").read_text())
    assert info["method"] == method and info["beta"] == (0.1 if method.startswith("dpo") else None)
    assert info["steps"] == 2 and info["teacher"]["layer"] == 1
    log = read_log(out / method / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    if method.startswith("dpo"):
        assert all({"harmful_reward_margin", "harmful_reward_accuracy"} <= r.keys() for r in log)
        assert log[0]["harmful_loss"] == pytest.approx(math.log(2), abs=1e-5)  # πs = π0 at step 1
    if method.endswith("-mix"):
        assert all("anchor_loss" in r for r in log)
    assert not (out / f"{method}.work").exists()
    printed = capsys.readouterr().out
    assert f"wrote {out / method}" in printed and "πt: " in printed


def test_sample_batch_samples_the_same_answers(model_dir, tmp_path):
    """--sample-batch (a scale option shared with Stage 3) samples the answers 1 row at a time, each row with
    the random numbers of one batch: the same answers, so bit for bit the same student."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    make_run(out, model_dir)
    bl.main(args_for(model_dir, out, "sft"))
    bl.main(args_for(model_dir, out, "sft", "--sample-batch", "1", "--student", "rows"))
    a, b = load_file(out / "sft" / "model.safetensors"), load_file(out / "rows" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_log(out / name / "train_log.jsonl")] for name in ("sft", "rows")]
    assert losses[0] == losses[1]


def test_a_student_evaluates_with_stage_4(model_dir, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir)
    bl.main(args_for(model_dir, out, "dpo", "--max-steps", "1"))
    evaluate.main(["--model", str(model_dir), "--out", str(out), "--n-prompts", "2", "--max-new-tokens", "3",
                   "--qa-new-tokens", "2", "--batch-size", "8"])  # base, teacher and every student in OUT
    report = json.loads((out / "eval.json").read_text())
    assert {"base", "teacher", "dpo"} <= set(report["models"])


def test_the_budget_is_stage_3s(model_dir, tmp_path, monkeypatch):
    """Five prompts, P = 2, two epochs: 6 steps of the prompts distill.step_prompts gives, and each distinct
    prompt answered once (G rows), by πt only for SFT."""
    prompts = tmp_path / "five.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "run"
    make_run(out, model_dir)
    seen, sampled, real = [], [], bl.train_step
    monkeypatch.setattr(bl, "train_step", lambda s, t, groups, *a: seen.append(groups[0].prompts[::2])
                        or real(s, t, groups, *a))
    real_sample = bl.sample_batch
    monkeypatch.setattr(bl, "sample_batch",
                        lambda m, t, ps, *a: sampled.append(ps) or real_sample(m, t, ps, *a))
    argv = args_for(model_dir, out, "sft", "--prompts", str(prompts), "--epochs", "2")
    bl.main(argv + ["--max-steps", "99"])  # the last value wins: no cut
    assert seen == distill.step_prompts(read_prompts(prompts), 2, 2, 0)
    assert sorted(p for batch in sampled for p in batch) == sorted(read_prompts(prompts))
    assert len(read_log(out / "sft" / "train_log.jsonl")) == 6


def test_lora_dpo_uses_the_adapters_off_as_reference_and_merges(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    make_run(out, model_dir)
    bl.main(args_for(model_dir, out, "dpo", "--lora-rank", "2", "--student", "lora"))
    assert (out / "lora" / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out / "lora")
    log = read_log(out / "lora" / "train_log.jsonl")
    assert log[0]["harmful_loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: πs = π0 at step 1


def test_resume_equals_uninterrupted(model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    make_run(out, model_dir)
    argv = lambda name: args_for(model_dir, out, "dpo-mix", "--student", name, "--max-steps", "3",
                                 "--checkpoint-every", "2")
    bl.main(argv("straight"))
    real = parallel.Loop.after_step

    def killed_after_step_2(loop, student, log, step, n_steps):  # just after step 2's checkpoint
        real(loop, student, log, step, n_steps)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(parallel.Loop, "after_step", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        bl.main(argv("resumed"))
    monkeypatch.setattr(parallel.Loop, "after_step", real)
    assert (out / "resumed.work" / "checkpoint.pt").exists() and not (out / "resumed").exists()
    bl.main(argv("resumed") + ["--resume"])
    a, b = load_file(out / "straight" / "model.safetensors"), load_file(out / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(out / "straight" / "train_log.jsonl")[-1]["loss"] == \
        read_log(out / "resumed" / "train_log.jsonl")[-1]["loss"]


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("missing prompt file", lambda t: ["--prompts", str(t / "nope.jsonl")], "nope.jsonl: file not found"),
    ("empty prompt file", lambda t: ["--prompts", str(t / "empty.jsonl")],
     "empty.jsonl: file holds no prompts"),
    ("empty anchor file", lambda t: ["--method", "sft-mix", "--anchor", str(t / "empty.jsonl")],
     "holds no prompts"),
    ("missing direction", lambda t: ["--direction", str(t / "none.safetensors")], "direction file not found"),
    ("output already there", lambda t: ["--student", "done"], "already exists; pass --overwrite"),
    ("-mix without anchors", lambda t: ["--method", "dpo-mix"], "pass --anchor FILE"),
    ("anchors without -mix", lambda t: ["--anchor", str(t / "empty.jsonl")], "for the -mix methods"),
    ("no method", lambda t: ["--method"], "--method"),
    ("beta <= 0", lambda t: ["--beta", "0"], "--beta: must be > 0"),
    ("shard", lambda t: ["--shard"], "one process"),
]


@pytest.mark.parametrize("name,argv,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(name, argv, fragment, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out, model_dir)
    (out / "done").mkdir()
    (out / "done" / "safesteer.json").write_text("{}")  # a finished student
    (tmp_path / "empty.jsonl").write_text("")
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    full = ["--model", str(model_dir), "--out", str(out), "--method", "dpo", *argv(tmp_path)]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: bl.main(full))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing half-written


def test_help_shows_usage_and_defaults(capsys):
    with pytest.raises(SystemExit):
        bl.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Usage:" in text and "DPO's β (default: 0.1)" in text and "(default: 8)" in text
