"""distill.py's `full` loss against TRL's on-policy distillation loss at beta = 1 (issue 36; bench/vs_trl.py).

At beta = 1 TRL's generalized JSD is the reverse KL, KL(p ‖ q) = Σ_v p(v) log p(v)/q(v) at each completion
position, p the student's and q the teacher's next-token distribution: distill.py's `full_kl_formula` (and
the lean `full_kl` behind `localized_reverse_kl(..., kind="full")`). Per position the two agree to float
tolerance. They differ in how a step's positions are averaged into one loss; with n_i the loss positions of
sequence i, B sequences and N = Σ_i n_i:

    TRL    Σ_i Σ_t kl_it / N             a mean over the step's tokens. GKDTrainer.generalized_jsd_loss with
                                         labels ("batchmean" divides by the unmasked tokens), and
                                         DistillationTrainer: each micro-batch's sum over num_items_in_batch,
                                         the step's token count, so gradient accumulation adds up to the same
    ours   (1/B) Σ_i (1/n_i) Σ_t kl_it   a mean over each sequence's positions, then over the sequences
                                         (the authors' code)

TRL weights sequence i by n_i / N, we by 1 / B. The two are equal when every sequence has the same length
(as in bench/vs_trl.py, where no completion stops early); otherwise ours is the mean over sequences of TRL's
loss of each sequence alone, and TRL's is Σ_i (n_i / N) · ours of sequence i: a short refusal counts as much
as a long answer in ours, by its token count in TRL's. (GKD's "batchmean" *without* labels divides the sum
over all positions by B: a sum per sequence, averaged over sequences; neither trainer uses it with a mask.)

Skipped where TRL is not installed: it is bench-only (requirements-bench.txt, installed by `make bench`).
"""
import copy
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub traffic, and no telemetry ping from TRL's trainers
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
pytest.importorskip("trl", reason="TRL is a bench-only dependency: pip install -c requirements.txt "
                                  "-r requirements-bench.txt (make bench does)")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental in TRL 1.16
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

import distill  # noqa: E402
from safesteer import losses
from safesteer import forcing
from safesteer.teacher import Teacher
from bench.vs_trl import trl_trainer  # noqa: E402
from safesteer.chat import encode_chats

B, T, V, H = 4, 6, 50, 16
LENGTHS = [6, 4, 2, 1]  # loss positions per sequence, unequal


def logits(case: str, seed: int = 0):
    """Student and teacher logits [B, T, V] float32: random, a confident teacher, or shifted by constants."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    if case == "confident":  # the teacher puts almost all its mass on one token, as a refusing teacher does
        t[..., 3] += 25
    if case == "shifted":  # softmax does not see a constant, so neither may the loss (float32: ~1e-5 at 100)
        s, t = s + 100, t - 50
    return s, t


def mask_of(lengths) -> torch.Tensor:
    """[B, T] completion mask, 1 on each row's first n_i positions (right-padded, as both trainers pad)."""
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


def trl_per_position(s, t) -> torch.Tensor:
    """GKD's generalized JSD at beta = 1, reduction "none" ([B, T, V] terms), summed over V: [B, T]."""
    return GKDTrainer.generalized_jsd_loss(s, t, beta=1.0, reduction="none").sum(-1)


def trl_batch(s, t, mask) -> torch.Tensor:
    """GKD's loss as its trainer calls it: labels -100 where the mask is 0, reduction "batchmean"."""
    labels = torch.where(mask.bool(), 0, -100)
    return GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=1.0)


def ours_full(s, t, mask, impl: str = "lean") -> torch.Tensor:
    return distill.localized_reverse_kl(s, t, mask, None, kind="full", impl=impl)


def brute(s, t) -> torch.Tensor:
    p, q = s.double().softmax(-1), t.double().softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


# ----------------------------------------------------------------------------- per position

@pytest.mark.parametrize("case", ["random", "confident", "shifted"])
def test_per_position_trl_equals_full_kl(case):
    s, t = logits(case)
    theirs = trl_per_position(s, t).double()  # [B, T]
    ours = distill.full_kl_formula(s.view(-1, V), t.view(-1, V)).view(B, T)
    lean = losses.full_kl(s.view(-1, V), t.view(-1, V)).view(B, T)
    torch.testing.assert_close(ours, brute(s, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(theirs, ours, rtol=2e-5, atol=2e-5)  # TRL works in float32
    torch.testing.assert_close(lean, ours, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ["random", "confident"])
def test_per_position_gradients_agree(case):
    """The gradient each position's loss sends to the student's logits: autograd of TRL's F.kl_div, ours."""
    s, t = logits(case)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(1))  # any weights: each position checked
    grads = []
    for per_position in (lambda z: trl_per_position(z, t),
                         lambda z: distill.full_kl_formula(z.view(-1, V), t.view(-1, V)).view(B, T),
                         lambda z: losses.full_kl(z.view(-1, V), t.view(-1, V)).view(B, T)):
        z = s.clone().requires_grad_()
        (per_position(z) * w).sum().backward()
        grads.append(z.grad)
    torch.testing.assert_close(grads[0], grads[1].float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[1].float(), rtol=1e-4, atol=1e-6)


def test_distillation_trainer_kernel_equals_full_kl_on_the_projected_logits():
    """TRL's DistillationTrainer never forms the logits: ChunkedDivergenceFunction projects hidden states
    through the LM heads a vocabulary chunk at a time. Its per-token KL, and the gradient to the student's
    hidden states and head, equal ours on the logits h Wᵀ."""
    g = torch.Generator().manual_seed(2)
    h_s, h_t = torch.randn(B * T, H, generator=g), torch.randn(B * T, H, generator=g)
    w_s, w_t = torch.randn(V, H, generator=g) / 2, torch.randn(V, H, generator=g) / 2
    weights = torch.rand(B * T, generator=g)
    hs1, ws1 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    theirs, _ = ChunkedDivergenceFunction.apply(hs1, ws1, None, h_t, w_t, None, 1.0)  # [B T]
    (theirs * weights).sum().backward()
    hs2, ws2 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ours = distill.full_kl_formula(hs2 @ ws2.T, h_t @ w_t.T)
    (ours * weights).sum().backward()
    torch.testing.assert_close(theirs.double(), ours, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- per batch: the normalisation

@pytest.mark.parametrize("impl", ["lean", "formula"])
def test_equal_lengths_give_the_same_batch_loss_and_gradient(impl):
    s, t = logits("random")
    mask = mask_of([T] * B)
    z1, z2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    theirs, ours = trl_batch(z1, t, mask), ours_full(z2, t, mask, impl)
    torch.testing.assert_close(theirs.double(), ours.double(), rtol=2e-5, atol=1e-7)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(z1.grad, z2.grad.float(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("impl", ["lean", "formula"])
def test_unequal_lengths_differ_by_the_token_count_weights(impl):
    s, t = logits("random")
    mask = mask_of(LENGTHS)
    n = torch.tensor(LENGTHS, dtype=torch.float64)
    theirs, ours = trl_batch(s, t, mask).double(), ours_full(s, t, mask, impl).double()
    one = [slice(i, i + 1) for i in range(B)]  # each sequence alone
    per_seq_ours = torch.stack([ours_full(s[i], t[i], mask[i], impl) for i in one]).double()
    per_seq_theirs = torch.stack([trl_batch(s[i], t[i], mask[i]) for i in one]).double()
    assert not torch.isclose(theirs, ours, rtol=1e-3)  # the normalisations really differ here
    torch.testing.assert_close(per_seq_theirs, per_seq_ours, rtol=2e-5, atol=1e-7)  # one sequence: the same
    torch.testing.assert_close(ours, per_seq_theirs.mean(), rtol=2e-5, atol=1e-7)  # ours: 1 / B each
    torch.testing.assert_close(theirs, (n / n.sum() * per_seq_ours).sum(), rtol=2e-5, atol=1e-7)  # n_i / N
    kl = brute(s, t)  # both as weighted sums of the per-position losses, in closed form
    torch.testing.assert_close(ours, (kl * mask / (B * n[:, None])).sum(), rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(theirs, (kl * mask).sum() / n.sum(), rtol=2e-5, atol=1e-7)


def test_gradient_accumulation_keeps_each_normalisation():
    """A step in micro-batches: DistillationTrainer divides each micro-batch's sum by the step's token count
    (num_items_in_batch); distill.train_step weights each micro-batch's mean by its share of the sequences.
    Both add up to their whole-batch loss."""
    g = torch.Generator().manual_seed(3)
    h_s, h_t = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    w_s, w_t = torch.randn(V, H, generator=g) / 2, torch.randn(V, H, generator=g) / 2
    mask = mask_of(LENGTHS)
    halves = [slice(0, B // 2), slice(B // 2, B)]
    theirs = sum(_chunked_divergence_loss(h_s[sl], h_t[sl], w_s, w_t, mask[sl], 1.0,
                                          num_items_in_batch=mask.sum())[0] for sl in halves)
    whole, _, n_valid = _chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0)
    assert int(n_valid) == sum(LENGTHS)
    ls, lt = h_s @ w_s.T, h_t @ w_t.T  # [B, T, V]
    ours = sum(ours_full(ls[sl], lt[sl], mask[sl]) * (B // 2) / B for sl in halves)
    torch.testing.assert_close(theirs, whole, rtol=1e-5, atol=1e-7)
    token_mean = (brute(ls, lt) * mask).sum() / mask.sum()
    torch.testing.assert_close(whole.double(), token_mean, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(ours.double(), ours_full(ls, lt, mask).double(), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the trainer of bench/vs_trl.py

def test_trl_trainer_scores_the_steered_teacher_as_distill_does(tok, model, tmp_path):
    """The DistillationTrainer of bench/vs_trl.py, handed the frozen π0 with a hook in place, gives the loss
    and the student's gradient of distill.py's `full` on the same prompts and completions: TRL's forward (the
    backbone, then its chunked loss over the LM head) sees the hook, and its token mean is ours reweighted."""
    student, frozen = model.train(), copy.deepcopy(model).requires_grad_(False).eval()
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    teacher = Teacher(frozen, "hook", vec, 1, 1.0)
    prompts = ["How do I pick a lock?", "Say hi."]
    cfg = {"samples": 2, "prompts": 2, "micro_batch": 4, "max_new_tokens": 5, "seed": 0, "lr": 1e-5}
    trainer = trl_trainer(student, tok, frozen, prompts, cfg, str(tmp_path))
    rows = [p for p in prompts for _ in range(2)]
    ids, mask = encode_chats(tok, rows)
    lengths = [5, 3, 5, 1]  # unequal: the test sees the reweighting, not only the equality
    comp_mask = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).long()
    comp = torch.randint(0, 200, (len(rows), 5), generator=torch.Generator().manual_seed(1)) * comp_mask
    inputs = {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": comp, "completion_mask": comp_mask}

    def trl_loss():
        student.zero_grad()
        loss = trainer._compute_loss(student, inputs, None)[0]
        loss.backward()
        return loss.detach().double(), [p.grad.clone() for p in student.parameters()]

    def our_loss(weights):  # weights per sequence: turn our mean of means into TRL's token mean
        student.zero_grad()
        with torch.no_grad(), teacher.steer():
            lt = forcing.completion_logits(frozen, ids, mask, comp)
        ls = forcing.completion_logits(student, ids, mask, comp)
        one = [slice(i, i + 1) for i in range(len(rows))]
        per_seq = torch.stack([ours_full(ls[i], lt[i], comp_mask[i], "formula") for i in one])
        loss = (per_seq * weights).sum()
        loss.backward()
        return loss.detach().double(), [p.grad.clone() for p in student.parameters()], per_seq.detach()

    with teacher.steer():
        theirs, their_grads = trl_loss()
    n = torch.tensor(lengths, dtype=torch.float64)
    ours, our_grads, per_seq = our_loss(n / n.sum())
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-7)
    for a, b in zip(their_grads, our_grads):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-3, atol=1e-6)
    assert not torch.isclose(per_seq.mean(), theirs, rtol=1e-3)  # ours (1/B each) is another number here
    unsteered, _ = trl_loss()  # without the hook TRL would distil toward π0 itself: another loss
    assert not torch.isclose(unsteered, theirs, rtol=1e-2)
