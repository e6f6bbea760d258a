"""Stage 3: each loss against its formula in float64, its defining properties, and the training loop."""
import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

import common
import distill as dl
from common import UserError

S = torch.tensor([1, 4, 6])


def brute(student_logits, teacher_logits, s, kind):
    """The method's formulas written out per position in float64."""
    p = student_logits.double().softmax(-1)
    q = teacher_logits.double().softmax(-1)
    rest = torch.ones(p.shape[-1], dtype=torch.bool)
    rest[s] = False
    on_s = (p[:, s] * (p[:, s].log() - q[:, s].log())).sum(-1)
    if kind == "partial":
        return on_s
    if kind == "collapsed":
        pr, qr = p[:, rest].sum(-1), q[:, rest].sum(-1)
        return on_s + pr * (pr.log() - qr.log())
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
def test_losses_equal_brute_force(kind):
    torch.manual_seed(0)
    ls, lt = torch.randn(6, 9) * 2, torch.randn(6, 9) * 2
    got = dl.LOSSES[kind](ls, lt, S)
    assert torch.allclose(got.double(), brute(ls, lt, S, kind), atol=1e-6)


def test_full_equals_kl_div_with_the_right_argument_order():
    torch.manual_seed(1)
    ls, lt = torch.randn(5, 11), torch.randn(5, 11)
    # F.kl_div(input, target) = Σ target (log target - input): target is the student for the reverse KL
    ref = F.kl_div(lt.log_softmax(-1), ls.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(dl.full_kl(ls, lt).float(), ref, atol=1e-6)
    assert torch.allclose(dl.full_kl(ls, lt, chunk=2).float(), ref, atol=1e-6)


def test_collapsed_is_nonnegative_and_zero_iff_match_on_s_and_rest():
    torch.manual_seed(2)
    for _ in range(20):
        assert (dl.collapsed_kl(torch.randn(4, 9) * 3, torch.randn(4, 9) * 3, S) >= -1e-9).all()
    q = torch.randn(1, 9).softmax(-1)
    p = q.clone()
    rest = [0, 2, 3, 5, 7, 8]
    p[0, rest] = q[0, rest].sum() * torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])  # R's mass split differently
    assert dl.collapsed_kl(p.log(), q.log(), S).abs().item() < 1e-9
    assert dl.full_kl(p.log(), q.log()).item() > 1e-3  # the full KL does see the split inside R
    p2 = p.clone()
    p2[0, 1], p2[0, 0] = p[0, 1] + 0.01, p[0, 0] - 0.01  # move mass from R onto a token of S
    assert dl.collapsed_kl(p2.log(), q.log(), S).item() > 1e-6


@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
@pytest.mark.parametrize("chunk", [2, 256])
def test_hand_written_backward_matches_autograd_of_the_formula(kind, chunk):
    """The closed-form gradients p (a - ā) against autograd through brute(), in float64, with an
    uneven upstream gradient (as masking and per-sequence means give) and chunks that do not divide n."""
    torch.manual_seed(8)
    ls, lt = torch.randn(5, 9, dtype=torch.float64) * 2, torch.randn(5, 9, dtype=torch.float64) * 2
    w = torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    ours = ls.clone().requires_grad_(True)
    (dl.LOSSES[kind](ours, lt, S, chunk=chunk) * w).sum().backward()
    ref = ls.clone().requires_grad_(True)
    (brute(ref, lt, S, kind) * w).sum().backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-12)
    assert (ours.grad[0] == 0).all()  # a masked position gets no gradient at all


@pytest.mark.parametrize("with_rest", [True, False])
def test_localized_kl_passes_gradcheck(with_rest):
    torch.manual_seed(9)
    ls = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(4, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: dl.LocalizedKL.apply(z, lt, S, with_rest, 3), (ls,))
    assert torch.autograd.gradcheck(lambda z: dl.FullKL.apply(z, lt, 3), (ls,))


def test_collapsed_gradient_leaves_split_inside_r_unchanged():
    torch.manual_seed(3)
    logits = torch.randn(3, 9, requires_grad=True)
    dl.collapsed_kl(logits, torch.randn(3, 9), S).sum().backward()
    p = logits.detach().softmax(-1)
    rest = [0, 2, 3, 5, 7, 8]
    ratio = logits.grad[:, rest] / p[:, rest]  # gradient ∝ probability: the conditional inside R is unmoved
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert not torch.allclose(logits.grad[:, S] / p[:, S], ratio[:, :1].expand(3, 3), atol=1e-3)


def test_partial_is_minimised_at_q_over_e():
    torch.manual_seed(4)
    q = torch.randn(1, 8).softmax(-1)
    logits = torch.zeros(1, 8, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        dl.partial_kl(logits, q.log(), S).sum().backward()
        opt.step()
    p = logits.detach().softmax(-1)
    assert torch.allclose(p[0, S], q[0, S] / torch.e, atol=2e-4)
    assert dl.partial_kl(logits.detach(), q.log(), S).item() < 0  # not a divergence: it goes negative


def test_masking_and_reduction():
    torch.manual_seed(5)
    ls, lt = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    garbage_s, garbage_t = ls.clone(), lt.clone()
    garbage_s[0, 2:] = 50 * torch.randn(2, 9)  # positions after the end token must not matter
    garbage_t[0, 2:] = -50
    for kind in ("collapsed", "partial", "full"):
        got = dl.localized_reverse_kl(garbage_s, garbage_t, mask, S, kind)
        per_seq = [brute(ls[0, :2], lt[0, :2], S, kind).mean(), brute(ls[1], lt[1], S, kind).mean()]
        assert got.item() == pytest.approx(torch.stack(per_seq).mean().item(), abs=1e-6)


def test_one_step_lowers_the_loss(tok, model):
    import copy
    teacher = copy.deepcopy(model).requires_grad_(False)
    vec = torch.randn(model.config.hidden_size) * 3
    ids, mask = common.encode_chats(tok, ["hello", "how are you"])
    comp, cmask = common.sample(model, ids, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                stop_ids=[10_000], pad_id=tok.pad_token_id)
    s = torch.arange(10, 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss():
        with torch.no_grad(), common.add_vector(teacher, 1, vec):
            lt = common.completion_logits(teacher, ids, mask, comp)
        return dl.localized_reverse_kl(common.completion_logits(model, ids, mask, comp), lt, cmask, s, "collapsed")
    before = loss()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_anchored_step_gradient_is_harmful_loss_plus_lambda_anchor_loss(tok, model, monkeypatch):
    """train_step with anchor prompts: the gradient it applies equals that of
    L(harmful samples, steered πt) + λ·L(anchor samples, unsteered π0), computed by hand on the same samples."""
    import copy
    from types import SimpleNamespace
    teacher = copy.deepcopy(model).requires_grad_(False)
    vec = torch.randn(model.config.hidden_size) * 3
    harmful, anchors = ["hello", "how are you"], ["what is 2+2"]
    args = SimpleNamespace(samples=2, max_new_tokens=5, temperature=1.0, top_p=1.0, micro_batch=3, loss="partial",
                           anchor_weight=0.5, clip=1e9)
    ids, mask = common.encode_chats(tok, [p for p in harmful + anchors for _ in range(2)])
    comp, cmask = common.sample(model, ids, mask, 5, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                stop_ids=[10_000], pad_id=tok.pad_token_id)
    monkeypatch.setattr(dl, "sample", lambda *a, **k: (comp, cmask))
    s = torch.arange(10, 40)

    def part(rows, steer):
        with torch.no_grad(), (common.add_vector(teacher, 1, vec) if steer else contextlib.nullcontext()):
            lt = common.completion_logits(teacher, ids[rows], mask[rows], comp[rows])
        ls = common.completion_logits(model, ids[rows], mask[rows], comp[rows])
        return dl.localized_reverse_kl(ls, lt, cmask[rows], s, "partial")
    model.zero_grad()
    (part(slice(0, 4), True) + 0.5 * part(slice(4, 6), False)).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    class Capture(torch.optim.SGD):  # lr 0: keeps the weights, lets the gradients be read after the step
        def zero_grad(self, set_to_none=True):
            self.grads = [p.grad.clone() for p in model.parameters()]
    opt = Capture(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    rec = dl.train_step(model, teacher, tok, harmful, s, args, None, opt, sched,
                        lambda: common.add_vector(teacher, 1, vec), anchors)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(opt.grads, expected))
    assert {"anchor_loss", "anchor_refusal"} <= rec.keys()
    assert rec["loss"] == pytest.approx(rec["partial"] + 0.5 * rec["anchor_loss"], abs=1e-6)


# ----------------------------------------------------------------------------- the script

def make_run(out, model_dir, tok, s_ids=(10, 20, 30, 40)):
    """Stage 1 and 2 outputs written directly: a random direction and a hand-picked S."""
    from transformers import AutoConfig
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    torch.manual_seed(0)
    common.save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    common.write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden})
    common.write_json(out / "safety_tokens.json", {"token_ids": list(s_ids), "vocab_size": len(tok),
                                                   "tokenizer_fingerprint": common.tokenizer_fingerprint(tok)})


def args_for(model_dir, out, *extra):
    return ["--model", str(model_dir), "--out", str(out), "--prompts-per-step", "2", "--samples", "2",
            "--max-new-tokens", "5", "--max-steps", "4", "--lr", "1e-3", "--micro-batch", "3",
            "--checkpoint-every", "2", *extra]


def test_main_trains_saves_and_reloads(model_dir, tok, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    dl.main(args_for(model_dir, out))
    student = AutoModelForCausalLM.from_pretrained(out / "student")  # no project code needed
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), base.state_dict().values()))
    info = json.loads((out / "student" / "safesteer.json").read_text())
    assert info["loss"] == "collapsed" and info["s_token_ids"] == [10, 20, 30, 40]
    log = [json.loads(l) for l in (out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(k in log[0] for k in ("loss", "collapsed", "full", "sampled_refusal",
                                                       "mean_completion_tokens", "seconds", "peak_rss_mb"))
    assert not (out / "student.work").exists()
    assert "wrote" in capsys.readouterr().out
    dl.main(args_for(model_dir, out, "--random-tokens", "--student", "rand", "--loss", "full"))
    rand = json.loads((out / "rand" / "safesteer.json").read_text())
    assert len(rand["s_token_ids"]) == 4 and rand["s_token_ids"] != [10, 20, 30, 40]
    dl.main(args_for(model_dir, out, "--anchor", str(common.data_file("harmless_val")), "--student", "anchored",
                     "--anchor-per-step", "3"))
    log = [json.loads(l) for l in (out / "anchored" / "train_log.jsonl").read_text().splitlines()]
    assert all("anchor_refusal" in r and r["anchor_loss"] >= 0 for r in log)


def test_resume_equals_uninterrupted(model_dir, tok, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    dl.main(args_for(model_dir, out, "--student", "straight"))
    real_step, calls = dl.train_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(dl, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        dl.main(args_for(model_dir, out, "--student", "resumed"))
    monkeypatch.setattr(dl, "train_step", real_step)
    assert (out / "resumed.work" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="--resume"):
        dl.main(args_for(model_dir, out, "--student", "resumed"))
    dl.main(args_for(model_dir, out, "--student", "resumed", "--resume"))
    a = load_file(out / "straight" / "model.safetensors")
    b = load_file(out / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_token_file_for_another_tokenizer(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    meta = json.loads((out / "safety_tokens.json").read_text())
    common.write_json(out / "safety_tokens.json", {**meta, "tokenizer_fingerprint": "0" * 16})
    with pytest.raises(UserError, match="another tokenizer"):
        dl.main(args_for(model_dir, out))
    common.write_json(out / "safety_tokens.json", {**meta, "token_ids": [10, 10_000]})
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        dl.main(args_for(model_dir, out))
