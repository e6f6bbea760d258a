"""Stage 3: each loss against its formula in float64, its defining properties, and the training loop."""
import contextlib
import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from safesteer.artifacts import load_direction
from safesteer.chat import encode_chats, tokenizer_fingerprint
from safesteer.cli import Parser
from safesteer.errors import UserError
from safesteer.files import data_file, read_prompts, save_tensors, write_json
from safesteer.hooks import add_vector
from safesteer.models import load_model
from safesteer.sampling import sample
from safesteer.teacher import Teacher
from safesteer import forcing
import distill as dl
from safesteer import losses, sampling
from conftest import checkpoint_weights

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


IMPLS = ["lean", "formula"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
def test_losses_equal_brute_force(kind, impl):
    torch.manual_seed(0)
    ls, lt = torch.randn(6, 9) * 2, torch.randn(6, 9) * 2
    got = dl.LOSSES[impl][kind](ls, lt, S)
    assert torch.allclose(got.double(), brute(ls, lt, S, kind), atol=1e-6)


def test_full_equals_kl_div_with_the_right_argument_order():
    torch.manual_seed(1)
    ls, lt = torch.randn(5, 11), torch.randn(5, 11)
    # F.kl_div(input, target) = Σ target (log target - input): target is the student for the reverse KL
    ref = F.kl_div(lt.log_softmax(-1), ls.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(dl.full_kl(ls, lt).float(), ref, atol=1e-6)
    assert torch.allclose(dl.full_kl(ls, lt, chunk=2).float(), ref, atol=1e-6)
    assert torch.allclose(dl.full_kl_formula(ls, lt).float(), ref, atol=1e-6)


# ----------------------------------------------------------------------------- one side confident

V = 200


def confident(q_rest: float, s: torch.Tensor, shift: float, seed: int = 0) -> torch.Tensor:
    """float32 logits [4, V] whose softmax puts mass q_rest on R = V \\ S (exactly, in float64), + a shift."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, V, generator=g, dtype=torch.float64)
    in_s = torch.zeros(V, dtype=torch.bool)
    in_s[s] = True
    # move R down until Σ_R e^z / Σ_V e^z = q_rest: log-odds of R must be log(q / (1 - q))
    odds = z[:, ~in_s].logsumexp(-1) - z[:, in_s].logsumexp(-1)
    z[:, ~in_s] -= (odds - math.log(q_rest / (1 - q_rest)))[:, None]
    return (z + shift).float()


def subtraction_collapsed(student_logits, teacher_logits, s):
    """The old formula: π(R) = 1 - Σ_S π(v) by subtraction, in float32 as the logits come. Kept to show the
    tests below can fail."""
    def logs(z):
        lse = torch.logsumexp(z, -1)
        log_s = (z[:, s] - lse[:, None]).double()
        return log_s, torch.log((1 - log_s.exp().sum(-1)).clamp_min(1e-12))
    lp, lp_r = logs(student_logits)
    lq, lq_r = logs(teacher_logits)
    return (lp.exp() * (lp - lq)).sum(-1) + lp_r.exp() * (lp_r - lq_r)


def rel_err(got, ref):
    return ((got.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)).max().item()


S_CASES = {"1": torch.tensor([7]), "50": torch.arange(0, V, 4), "V-1": torch.arange(1, V)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("s_name", list(S_CASES))
@pytest.mark.parametrize("shift", [0.0, 20.0, -20.0])
@pytest.mark.parametrize("q_rest", [1e-2, 1e-5, 1e-8])
def test_collapsed_exact_when_the_teacher_is_confident(q_rest, shift, s_name, impl):
    """Teacher q(R) down to 1e-8, logits shifted by ±20 (softmax must not notice), |S| = 1, 50, |V| - 1:
    loss and gradient within 1e-4 (relative) of the float64 formula, from float32 logits."""
    s = S_CASES[s_name]
    ls = (torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2 + shift).float()
    assert_collapsed_exact(ls, confident(q_rest, s, shift), s, impl)


def assert_collapsed_exact(ls, lt, s, impl):
    """Loss and gradient of `collapsed` within 1e-4 (relative, per position) of autograd through brute()."""
    ref = ls.double().requires_grad_(True)
    ref_loss = brute(ref, lt.double(), s, "collapsed")
    ref_loss.sum().backward()
    ours = ls.clone().requires_grad_(True)
    loss = dl.LOSSES[impl]["collapsed"](ours, lt, s)
    loss.sum().backward()
    assert rel_err(loss[:, None], ref_loss.detach()[:, None]) <= 1e-4
    assert rel_err(ours.grad, ref.grad) <= 1e-4


def test_the_subtraction_formula_fails_those_tests():
    """The same check on the old formula: off by far more than 1e-4 once q(R) is small (the test can fail)."""
    s = S_CASES["50"]
    ls = torch.randn(4, V, generator=torch.Generator().manual_seed(1)) * 2 + 20
    lt = confident(1e-8, s, 20.0)
    ref = brute(ls.double(), lt.double(), s, "collapsed")
    assert rel_err(subtraction_collapsed(ls, lt, s)[:, None], ref[:, None]) > 1e-2
    assert rel_err(dl.collapsed_kl(ls, lt, s)[:, None], ref[:, None]) <= 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_collapsed_exact_when_the_student_is_confident(impl):
    """The student (not the teacher) puts p(R) ~ 1e-9 on R: its p(R) log p(R)/q(R) and gradient stay exact."""
    s = S_CASES["50"]
    lt = (torch.randn(4, V, generator=torch.Generator().manual_seed(4)) * 2).float()
    assert_collapsed_exact(confident(1e-9, s, 5.0, seed=3), lt, s, impl)


@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
def test_lean_and_formula_agree_on_values_and_gradients(kind):
    torch.manual_seed(6)
    s = S_CASES["50"]
    ls, lt = torch.randn(7, V) * 3, torch.randn(7, V) * 3
    a, b = ls.clone().requires_grad_(True), ls.clone().requires_grad_(True)
    w = torch.rand(7)
    (dl.LOSSES["lean"][kind](a, lt, s).float() * w).sum().backward()
    (dl.LOSSES["formula"][kind](b, lt, s).float() * w).sum().backward()
    lean, formula = dl.LOSSES["lean"][kind](ls, lt, s).float(), dl.LOSSES["formula"][kind](ls, lt, s).float()
    assert torch.allclose(lean, formula, atol=1e-6, rtol=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
def test_bf16_logits_are_upcast_per_chunk(kind):
    """Logits kept in bf16 (as on a GPU): the lean loss upcasts a chunk at a time and returns a bf16 gradient
    equal to the float32 computation on the same (bf16-rounded) values."""
    torch.manual_seed(7)
    s = S_CASES["50"]
    ls, lt = (torch.randn(6, V) * 3).bfloat16(), (torch.randn(6, V) * 3).bfloat16()
    a, b = ls.clone().requires_grad_(True), ls.float().requires_grad_(True)
    la, lb = dl.LOSSES["lean"][kind](a, lt, s, chunk=4), dl.LOSSES["lean"][kind](b, lt.float(), s)
    la.sum().backward()
    lb.sum().backward()
    assert a.grad.dtype == torch.bfloat16
    assert torch.allclose(la.float(), lb.float(), atol=1e-6)
    assert torch.allclose(a.grad.float(), b.grad, atol=1e-2 * b.grad.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_collapsed_is_nonnegative_and_zero_iff_match_on_s_and_rest(impl):
    loss = dl.LOSSES[impl]["collapsed"]
    torch.manual_seed(2)
    for _ in range(20):
        assert (loss(torch.randn(4, 9) * 3, torch.randn(4, 9) * 3, S) >= -1e-9).all()
    q = torch.randn(1, 9).softmax(-1)
    p = q.clone()
    rest = [0, 2, 3, 5, 7, 8]
    p[0, rest] = q[0, rest].sum() * torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])  # R's mass split differently
    assert loss(p.log(), q.log(), S).abs().item() < 1e-6
    assert dl.full_kl(p.log(), q.log()).item() > 1e-3  # the full KL does see the split inside R
    p2 = p.clone()
    p2[0, 1], p2[0, 0] = p[0, 1] + 0.01, p[0, 0] - 0.01  # move mass from R onto a token of S
    assert loss(p2.log(), q.log(), S).item() > 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
@pytest.mark.parametrize("chunk", [2, 256])
def test_gradient_matches_autograd_of_the_brute_force(kind, chunk, impl):
    """The closed-form gradients p (a - ā) (lean) and autograd of the formulas against autograd through
    brute(), in float64, with an uneven upstream gradient (as masking and per-sequence means give) and chunks
    that do not divide n."""
    torch.manual_seed(8)
    ls, lt = torch.randn(5, 9, dtype=torch.float64) * 2, torch.randn(5, 9, dtype=torch.float64) * 2
    w = torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    ours = ls.clone().requires_grad_(True)
    fn = dl.LOSSES[impl][kind]
    out = fn(ours, lt, S, chunk=chunk) if impl == "lean" else fn(ours, lt, S)
    (out * w).sum().backward()
    ref = ls.clone().requires_grad_(True)
    (brute(ref, lt, S, kind) * w).sum().backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-12)
    assert (ours.grad[0] == 0).all()  # a masked position gets no gradient at all


@pytest.mark.parametrize("with_rest", [True, False])
def test_localized_kl_passes_gradcheck(with_rest):
    torch.manual_seed(9)
    ls = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(4, 9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: losses.LocalizedKL.apply(z, lt, S, with_rest, 3), (ls,))
    assert torch.autograd.gradcheck(lambda z: losses.FullKL.apply(z, lt, 3), (ls,))


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


@pytest.mark.parametrize("impl", IMPLS)
def test_masking_and_reduction(impl):
    torch.manual_seed(5)
    ls, lt = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    garbage_s, garbage_t = ls.clone(), lt.clone()
    garbage_s[0, 2:] = 50 * torch.randn(2, 9)  # positions after the end token must not matter
    garbage_t[0, 2:] = -50
    for kind in ("collapsed", "partial", "full"):
        got = dl.localized_reverse_kl(garbage_s, garbage_t, mask, S, kind, impl)
        per_seq = [brute(ls[0, :2], lt[0, :2], S, kind).mean(), brute(ls[1], lt[1], S, kind).mean()]
        assert got.item() == pytest.approx(torch.stack(per_seq).mean().item(), abs=1e-6)


@pytest.mark.parametrize("skip,keep", [(0, None), (2, None), (1, 2), (0, 1), (9, None), (2, 5), (0, 6),
                                       (5, 6), (1, 9)])
def test_loss_window_equals_a_mask_built_by_hand(skip, keep):
    """The authors' semantics: positions [K, M), M counted from the completion's start."""
    comp_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    expected = comp_mask.clone()
    for r in range(3):
        for t in range(6):
            if t < skip or (keep is not None and t >= keep):
                expected[r, t] = 0
    assert torch.equal(dl.loss_window(comp_mask, skip, keep), expected)
    if keep is not None:
        assert int(dl.loss_window(torch.ones(1, 20), skip, keep).sum()) == keep - skip  # [K, M) holds M - K


@pytest.mark.parametrize("skip,keep", [(3, 3), (4, 2), (1, 1)])
def test_loss_window_must_end_after_it_starts(skip, keep):
    with pytest.raises(UserError, match=r"must exceed --skip-tokens K: .* positions \[K, M\)"):
        dl.Recipe.from_args(dl.parse_args(["--skip-tokens", str(skip), "--keep-tokens", str(keep)]))
    assert dl.Recipe(skip_tokens=skip, keep_tokens=skip + 1).keep_tokens == skip + 1  # M = K + 1: one token


def test_one_step_lowers_the_loss(tok, model):
    import copy
    teacher = copy.deepcopy(model).requires_grad_(False)
    vec = torch.randn(model.config.hidden_size) * 3
    ids, mask = encode_chats(tok, ["hello", "how are you"])
    comp, cmask = sample(model, ids, mask, 6, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0), stop_ids=[10_000],
                                  pad_id=tok.pad_token_id)
    s = torch.arange(10, 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss():
        with torch.no_grad(), add_vector(teacher, 1, vec):
            lt = forcing.completion_logits(teacher, ids, mask, comp)
        ls = forcing.completion_logits(model, ids, mask, comp)
        return dl.localized_reverse_kl(ls, lt, cmask, s, "collapsed")
    before = loss()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def fixed_samples(tok, model, monkeypatch, prompts):
    """A frozen copy of the model for πt and π0, a random r, and train_step's sampler replaced by two fixed
    samples per prompt, so that a step can be checked against the same step computed another way."""
    import copy
    teacher = copy.deepcopy(model).requires_grad_(False)
    vec = torch.randn(model.config.hidden_size) * 3
    ids, mask = encode_chats(tok, [p for p in prompts for _ in range(2)])
    comp, cmask = sample(model, ids, mask, 5, temperature=1.0,
                                  generator=torch.Generator().manual_seed(0), stop_ids=[10_000],
                                  pad_id=tok.pad_token_id)
    monkeypatch.setattr(dl, "sample", lambda *a, **k: (comp, cmask))
    return teacher, vec, ids, mask, comp, cmask


class GradCapture(torch.optim.SGD):
    """lr 0: keeps the weights, and keeps the gradients train_step applied (read after the step)."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.model = model

    def zero_grad(self, set_to_none=True):
        self.grads = [p.grad.clone() for p in self.model.parameters()]
        super().zero_grad(set_to_none)


def test_anchored_step_gradient_is_harmful_loss_plus_lambda_anchor_loss(tok, model, monkeypatch):
    """train_step with anchor prompts: the gradient it applies equals that of L(harmful samples, steered πt)
    + λ·L(anchor samples, unsteered π0), computed by hand on the same samples."""
    harmful, anchors = ["hello", "how are you"], ["what is 2+2"]
    teacher, vec, ids, mask, comp, cmask = fixed_samples(tok, model, monkeypatch, harmful + anchors)
    s = torch.arange(10, 40)

    def part(rows, steer):
        with torch.no_grad(), (add_vector(teacher, 1, vec) if steer else contextlib.nullcontext()):
            lt = forcing.completion_logits(teacher, ids[rows], mask[rows], comp[rows])
        ls = forcing.completion_logits(model, ids[rows], mask[rows], comp[rows])
        return dl.localized_reverse_kl(ls, lt, cmask[rows], s, "partial")
    model.zero_grad()
    (part(slice(0, 4), True) + 0.5 * part(slice(4, 6), False)).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    opt = GradCapture(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    teachers = (Teacher(teacher, "hook", vec, 1), Teacher(teacher, "base"))
    recipe = dl.Recipe(samples=2, max_new_tokens=5, loss="partial", anchor_weight=0.5, micro_batch=3,
                       clip=1e9)
    rec = dl.train_step(model, tok, harmful, anchors, teachers, s, recipe, dl.Loop(opt, sched))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(opt.grads, expected))
    assert {"anchor_loss", "anchor_refusal"} <= rec.keys()
    phases = ["sample", "teacher", "student_forward", "loss", "backward", "diagnostics", "optimizer"]
    assert list(rec["seconds"]) == phases  # the step's order, timed phase by phase
    assert rec["loss"] == pytest.approx(rec["partial"] + 0.5 * rec["anchor_loss"], abs=1e-6)


def test_packed_samples_give_the_step_of_one_row_per_sample(tok, model, monkeypatch):
    """--pack-samples (the default) and --no-pack-samples: the same loss and gradient on the same samples."""
    harmful, anchors = ["hello", "how are you today"], ["what is 2+2"]
    teacher, vec, *_ = fixed_samples(tok, model, monkeypatch, harmful + anchors)
    packed, real = [], forcing.packed_completion_logits
    monkeypatch.setattr(forcing, "packed_completion_logits", lambda *a: packed.append(a[-1]) or real(*a))
    runs = []
    teachers = (Teacher(teacher, "hook", vec, 1), Teacher(teacher, "base"))
    for pack in (True, False):
        opt = GradCapture(model)
        loop = dl.Loop(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
        recipe = dl.Recipe(samples=2, max_new_tokens=5, micro_batch=4, clip=1e9, pack=pack)
        rec = dl.train_step(model, tok, harmful, anchors, teachers, torch.arange(10, 40), recipe, loop)
        runs.append((rec["loss"], opt.grads))
    (loss_packed, g_packed), (loss_plain, g_plain) = runs
    assert packed == [2, 2]  # harmful rows as one micro-batch of 2 prompts x 2, anchors as one of 1 x 2
    assert loss_packed == pytest.approx(loss_plain, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5 * b.abs().max().item()) for a, b in zip(g_packed, g_plain))


# ----------------------------------------------------------------------------- settings and --help

def test_recipe_is_built_from_the_arguments_once():
    """Recipe.from_args copies every setting of the step from its argument, and the defaults are Recipe's."""
    args = dl.parse_args(["--samples", "3", "--loss", "full", "--loss-impl", "formula", "--no-pack-samples",
                          "--keep-tokens", "5", "--refresh-every", "2", "--anchor-weight", "1.5",
                          "--lr", "3e-4", "--sample-batch", "6"])
    recipe = dl.Recipe.from_args(args)
    assert recipe == dl.Recipe(samples=3, loss="full", impl="formula", pack=False, keep_tokens=5,
                               refresh_every=2, anchor_weight=1.5, lr=3e-4, sample_batch=6)
    flag = {"impl": "loss_impl", "pack": "pack_samples"}
    for f in dataclasses.fields(recipe):
        assert getattr(recipe, f.name) == getattr(args, flag.get(f.name, f.name)), f.name
    assert dl.Recipe.from_args(dl.parse_args([])) == dl.Recipe()


def test_help_groups_the_options_and_every_option_has_help(monkeypatch, capsys):
    headings = ["model and run:", "the paper's recipe (a default marked 'ours' is not the paper's):",
                "the authors' variants:", "ours:", "scale: LoRA, sharding, checkpoints:"]
    with pytest.raises(SystemExit):
        dl.parse_args(["--help"])
    text = capsys.readouterr().out
    at = [text.index(f"\n{h}\n") for h in headings]  # group titles on lines of their own, in this order
    assert at == sorted(at)
    assert "--loss {collapsed,partial,full}" in text and "(default: collapsed)" in text
    parsers = []
    monkeypatch.setattr(Parser, "parse_args", lambda self, argv=None: parsers.append(self))
    dl.parse_args([])
    common_dests = {"help", "model", "out", "device", "seed", "max_prompt_tokens", "chat_template"}
    for action in parsers[0]._actions:
        assert action.help, action.option_strings
        if action.default is None and action.nargs != 0 and action.dest not in common_dests:
            assert "default" in action.help, action.option_strings  # says what happens when it is not given


def test_step_prompts_shuffle_each_epoch_into_groups_of_p():
    prompts = [f"p{i}" for i in range(10)]
    steps = dl.step_prompts(prompts, 4, 2, seed=0)
    assert [len(s) for s in steps] == [4, 4, 2, 4, 4, 2]
    first, second = sum(steps[:3], []), sum(steps[3:], [])
    assert sorted(first) == sorted(second) == sorted(prompts) and first != second
    assert steps == dl.step_prompts(prompts, 4, 2, seed=0) != dl.step_prompts(prompts, 4, 2, seed=1)
    anchors = dl.anchor_steps(["a", "b", "c"], 4, 2, seed=0)
    assert [len(a) for a in anchors] == [2, 2, 2, 2] and dl.anchor_steps([], 3, 2, 0) == [[], [], []]


# ----------------------------------------------------------------------------- the script

def make_run(out, model_dir, tok, s_ids=(10, 20, 30, 40)):
    """Stage 1 and 2 outputs written directly: a random direction and a hand-picked S."""
    from transformers import AutoConfig
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    torch.manual_seed(0)
    save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden})
    write_json(out / "safety_tokens.json", {"token_ids": list(s_ids), "vocab_size": len(tok),
                                                   "tokenizer_fingerprint": tokenizer_fingerprint(tok)})


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
    pairs = zip(student.state_dict().values(), base.state_dict().values())
    assert any(not torch.equal(a, b) for a, b in pairs)
    info = json.loads((out / "student" / "safesteer.json").read_text())
    assert info["loss"] == "collapsed" and info["s_token_ids"] == [10, 20, 30, 40]
    log = [json.loads(l) for l in (out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(k in log[0] for k in ("loss", "collapsed", "full", "sampled_refusal",
                                                       "mean_completion_tokens", "seconds", "peak_memory_mb"))
    assert not (out / "student.work").exists()
    assert "wrote" in capsys.readouterr().out
    dl.main(args_for(model_dir, out, "--random-tokens", "--student", "rand", "--loss", "full"))
    rand = json.loads((out / "rand" / "safesteer.json").read_text())
    assert len(rand["s_token_ids"]) == 4 and rand["s_token_ids"] != [10, 20, 30, 40]
    dl.main(args_for(model_dir, out, "--anchor", str(data_file("harmless_val")),
                     "--student", "anchored", "--anchor-per-step", "3"))
    log = [json.loads(l) for l in (out / "anchored" / "train_log.jsonl").read_text().splitlines()]
    assert all("anchor_refusal" in r and r["anchor_loss"] >= -1e-7 for r in log)  # ~0 at step 1: π0 = πs
    pooled, real = [], dl.anchor_steps  # several anchor files are pooled, in order
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dl, "anchor_steps", lambda anchors, *a: pooled.append(anchors) or real(anchors, *a))
        files = [data_file(n) for n in ("harmless_val", "harmless_train_reform")]
        dl.main(args_for(model_dir, out, "--anchor", *map(str, files), "--student", "pooled",
                         "--max-steps", "1"))
    assert pooled == [[p for f in files for p in read_prompts(f)]]


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


def test_gradient_checkpointing_changes_memory_not_numbers(model_dir, tok, tmp_path, monkeypatch):
    """Checkpointing (the default) recomputes every block in backward (counted); --no-grad-checkpointing keeps
    the activations; the student is the same to float precision either way."""
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaMLP
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    calls = {"n": 0}
    real = LlamaMLP.forward  # inside each block: a recomputed block runs it again

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)
    monkeypatch.setattr(LlamaMLP, "forward", counted)
    counts = {}
    for mode, flag in (("on", []), ("off", ["--no-grad-checkpointing"])):
        calls["n"] = 0
        dl.main(args_for(model_dir, out, "--student", mode, *flag))
        counts[mode] = calls["n"]
    assert counts["on"] > counts["off"] > 0  # the recomputation happens only when on
    a, b = (load_file(out / m / "model.safetensors") for m in ("on", "off"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sample_batch_changes_memory_not_samples(model_dir, tok, tmp_path, monkeypatch):
    """--sample-batch N samples a step's (P + A)·G rows N at a time (here 6 rows: 4 + 2, and 1 at a time),
    each row with the random numbers it draws in one batch (temperature 1): the same samples, so the same
    losses and, bit for bit, the same student as all rows at once (the default)."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    chunks, real = [], sample  # the calls for each chunk (distill calls sample by its own name)

    def counted(model, ids, *a, **k):
        chunks.append(len(ids))
        return real(model, ids, *a, **k)
    monkeypatch.setattr(sampling, "sample", counted)
    argv = args_for(model_dir, out, "--max-steps", "2", "--anchor", str(data_file("harmless_val")),
                    "--anchor-per-step", "1")
    for n in (None, 4, 1):
        dl.main(argv + ["--student", f"n{n}", *(["--sample-batch", str(n)] if n else [])])
    assert chunks == [4, 2] * 2 + [1] * 6 * 2
    logs = {n: (out / f"n{n}" / "train_log.jsonl").read_text().splitlines() for n in (None, 4, 1)}
    drop = ("seconds", "step_seconds", "sample_tokens_per_s", "peak_memory_mb")
    rows = {n: [{k: v for k, v in json.loads(line).items() if k not in drop} for line in log]
            for n, log in logs.items()}
    assert rows[None] == rows[4] == rows[1]
    weights = {n: load_file(out / f"n{n}" / "model.safetensors") for n in (None, 4, 1)}
    assert all(torch.equal(weights[None][k], weights[n][k]) for n in (4, 1) for k in weights[None])


def test_token_file_for_another_tokenizer(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    meta = json.loads((out / "safety_tokens.json").read_text())
    write_json(out / "safety_tokens.json", {**meta, "tokenizer_fingerprint": "0" * 16})
    with pytest.raises(UserError, match="another tokenizer"):
        dl.main(args_for(model_dir, out))
    write_json(out / "safety_tokens.json", {**meta, "token_ids": [10, 10_000]})
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        dl.main(args_for(model_dir, out))


# ----------------------------------------------------------------------------- LoRA: one copy of the weights

def test_lora_teacher_base_and_student_share_one_copy(model_dir, tok, tmp_path):
    """With --lora-rank the teacher is the student's own base weights with the adapters off and the hook on:
    its logits equal a separately built steered copy of π0, the base weights exist once, and only adapters
    train."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    a = dl.parse_args(args_for(model_dir, out, "--lora-rank", "4"))
    student, tok2, teacher, base, _ = dl.build_models(a, out, torch.device("cpu"))
    separate, _ = load_model(str(model_dir))
    vec, meta = load_direction(out / "direction.safetensors", separate)
    ids, mask = encode_chats(tok2, ["hello", "what is up"])
    comp = torch.randint(0, 250, (2, 4))
    with torch.no_grad():
        with add_vector(separate, 1, vec, 1.0):
            ref = forcing.completion_logits(separate, ids, mask, comp)
        ref0 = forcing.completion_logits(separate, ids, mask, comp)
        with teacher.steer():
            got = forcing.completion_logits(teacher.model, ids, mask, comp)
        with base.steer():
            got0 = forcing.completion_logits(base.model, ids, mask, comp)
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(got0, ref0, atol=1e-5)
    # one storage: teacher, π0 and student read the same base tensors
    assert teacher.model is student and base.model is student
    base_ptrs = lambda m: {p.data_ptr() for n, p in m.named_parameters() if "lora_" not in n}
    assert base_ptrs(teacher.model) == base_ptrs(base.model) == base_ptrs(student)
    full_student, _, full_teacher, _, _ = dl.build_models(dl.parse_args(args_for(model_dir, out)), out,
                                                          torch.device("cpu"))
    assert not base_ptrs(full_teacher.model) & base_ptrs(full_student)  # full fine-tuning: a second copy
    # gradients reach the adapters only
    with torch.no_grad(), teacher.steer():
        lt = forcing.completion_logits(teacher.model, ids, mask, comp)
    student.train()
    torch.nn.init.normal_(next(p for n, p in student.named_parameters() if "lora_B" in n), std=0.1)
    dl.localized_reverse_kl(forcing.completion_logits(student, ids, mask, comp), lt, torch.ones_like(comp),
                            torch.tensor([10, 20]), "collapsed").backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)


def test_lora_student_merges_reloads_and_resumes(model_dir, tok, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    dl.main(args_for(model_dir, out, "--lora-rank", "4", "--student", "straight"))
    d = out / "straight"
    assert (d / "adapter" / "adapter_config.json").exists()
    assert (d / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(d).eval()  # a plain transformers directory, no peft needed
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from peft import PeftModel
    base_again = AutoModelForCausalLM.from_pretrained(model_dir)
    with_adapter = PeftModel.from_pretrained(base_again, d / "adapter").eval()
    ids, mask = encode_chats(tok, ["hi there"])
    with torch.no_grad():
        lm = merged(input_ids=ids, attention_mask=mask).logits
        la = with_adapter(input_ids=ids, attention_mask=mask).logits
        lb = base(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(lm, la, atol=1e-5) and not torch.allclose(lm, lb, atol=1e-4)
    # killed during step 4 (after the checkpoint of step 2), resumed: the same adapters as uninterrupted
    real_step, calls = dl.train_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(dl, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        dl.main(args_for(model_dir, out, "--lora-rank", "4", "--student", "resumed"))
    monkeypatch.setattr(dl, "train_step", real_step)
    weights = checkpoint_weights(out / "resumed.work", tmp_path)
    assert weights and all("lora_" in n for n in weights)  # only the adapters are checkpointed
    dl.main(args_for(model_dir, out, "--lora-rank", "4", "--student", "resumed", "--resume"))
    a = load_file(d / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_teacher_sees_the_system_prompt_and_the_same_completion(tok, model):
    """--teacher prompt: at every completion position the teacher's logits are the base model's on the
    system-prompted context, while the student's context has no system prompt; positions line up."""
    teacher = Teacher(model, "prompt", system="Refuse harmful requests.")
    prompts = ["hello", "how are you today"]
    comp = torch.randint(0, 250, (2, 4))
    t_ids, t_mask = teacher.encode(tok, prompts)
    with torch.no_grad(), teacher.steer():
        lt = forcing.completion_logits(model, t_ids, t_mask, comp)
    for r, p in enumerate(prompts):
        ids, _ = encode_chats(tok, [p], system="Refuse harmful requests.")  # unpadded, one at a time
        with torch.no_grad():
            ref = model(input_ids=torch.cat([ids[0], comp[r]])[None]).logits[0, ids.shape[1] - 1:-1]
        assert torch.allclose(lt[r], ref, atol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_save_at_keeps_students_along_the_way_and_changes_nothing_else(model_dir, tok, tmp_path, monkeypatch,
                                                                      lora):
    """--save-at 2 keeps OUT/student-step2, the student after step 2 (its weights, LoRA merged, as the run
    held them then; a log of 2 steps and their cost), and leaves the run as it was: the final student and
    every logged number after step 2 equal a run without it."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    from safesteer.scale import parallel
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    extra = ["--lora-rank", "4"] if lora else []
    held, real = {}, parallel.Loop.after_step

    def after_step(self, student, log, step, n_steps):  # the weights as the plain run holds them at step 2
        if step == 2 and not lora:
            held.update({k: v.detach().clone() for k, v in student.state_dict().items()})
        real(self, student, log, step, n_steps)
    monkeypatch.setattr(parallel.Loop, "after_step", after_step)
    dl.main(args_for(model_dir, out, "--student", "plain", *extra))
    monkeypatch.setattr(parallel.Loop, "after_step", real)
    dl.main(args_for(model_dir, out, "--student", "kept", "--save-at", "2", *extra))
    a, b = load_file(out / "plain" / "model.safetensors"), load_file(out / "kept" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds", "step_seconds", "sample_tokens_per_s", "peak_memory_mb")
    lines = {name: (out / name / "train_log.jsonl").read_text().splitlines() for name in ("plain", "kept")}
    logs = [[{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines[name]]
            for name in ("plain", "kept")]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    step2 = out / "kept-step2"
    info = json.loads((step2 / "safesteer.json").read_text())
    assert info["steps"] == 2 and info["cost"]["steps"] == 2 and info["cost"]["flops_estimate"] > 0
    assert len((step2 / "train_log.jsonl").read_text().splitlines()) == 2
    loaded = AutoModelForCausalLM.from_pretrained(step2)  # a plain transformers directory
    if not lora:
        saved = load_file(step2 / "model.safetensors")
        assert all(torch.equal(saved[k], held[k]) for k in saved)
    mid = loaded.state_dict()
    assert any(not torch.equal(mid[k], b[k]) for k in b if k in mid)  # step 2 is not the end
    import evaluate
    listed = dict(evaluate.resolve_models(evaluate.parse_args(["--out", str(out)]), out))
    assert listed["kept-step2"] == str(step2)  # Stage 4 evaluates it beside the others


def test_save_at_is_checked_before_step_one(model_dir, tok, tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    for extra, fragment in ((["--save-at", "4"], "--save-at 4 is not before the run's last step (4)"),
                            (["--save-at", "9"], "--save-at 9 is not before")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            dl.main(args_for(model_dir, out, *extra))
    (out / "student-step2").mkdir()
    with pytest.raises(UserError, match="student-step2 already exists and is not a student"):
        dl.main(args_for(model_dir, out, "--save-at", "2", "--overwrite"))
    assert not (out / "student").exists()


def test_a_resumed_run_saves_along_the_way_again(model_dir, tok, tmp_path, capsys, monkeypatch):
    """Stopped after step 3 (the student of step 2 kept, a checkpoint at 2), resumed: the step-2 folder, this
    run's own, is accepted and kept as it was (the resumed run starts after it), not refused."""
    from safetensors.torch import load_file
    from safesteer.cli import run_cli
    from safesteer.scale import parallel
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    real = parallel.Loop.after_step

    def stop_after_3(self, student, log, step, n_steps):
        real(self, student, log, step, n_steps)
        if step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(parallel.Loop, "after_step", stop_after_3)
    with pytest.raises(SystemExit):
        run_cli(lambda: dl.main(args_for(model_dir, out, "--save-at", "2")))
    first = load_file(out / "student-step2" / "model.safetensors")
    monkeypatch.setattr(parallel.Loop, "after_step", real)
    dl.main(args_for(model_dir, out, "--save-at", "2", "--resume"))
    again = load_file(out / "student-step2" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first) and (out / "student").is_dir()
