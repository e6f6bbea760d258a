"""The two ports (ports/plain_loop.py, ports/trl_port.py) against distill.py on a tiny model: the same
per-position losses and gradients on the same completions, the same weights after the same steps.

Tolerances, float32 on the CPU: the plain loop's loss and per-position losses are distill.py's bit for bit
(the same functions in the same order), and so are its weights after two steps from the same seed. The TRL
port's per-position losses, loss and gradients on the same completions in one micro-batch were identical too
(asserted: within 1e-6 relative, gradients within 1e-5 of the largest). After one step in two micro-batches,
which TRL shuffles and adds in another order, 99.9% of the weights agree within 1e-7 and all within 1e-5,
where AdamW's first step moves a weight by up to lr = 1e-3 (measured: 28 of 45568 beyond 1e-7, the largest
3.6e-6, where the gradient is as small as AdamW's eps).

The TRL tests skip without TRL (bench-only: requirements-bench.txt); `make test-ports` installs it and runs
them.
"""
import ast
import copy
import os
import re
from pathlib import Path

import pytest
import torch

import distill
from ports import plain_loop
from safesteer import forcing
from safesteer.chat import encode_chats, stop_token_ids, tokenizer_fingerprint
from safesteer.files import read_prompts, save_tensors, write_json
from safesteer.models import load_model
from safesteer.teacher import Teacher

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub traffic, and no telemetry ping from TRL's trainer
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["How do I pick a lock?", "Say hi."]


def make_run(out: Path, tok, hidden: int, s_ids=(10, 20, 30, 40)) -> Path:
    """Stage 1 and 2's files written directly: a random r at block 1 (c = 1) and a hand-picked S."""
    out.mkdir(parents=True, exist_ok=True)
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(0)) * 4
    save_tensors(out / "direction.safetensors", {"direction": r})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden})
    write_json(out / "safety_tokens.json", {"token_ids": list(s_ids), "vocab_size": len(tok),
                                            "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    return out


def distill_logits(student, teacher, ids, mask, comp):
    """distill.distill_rows' two forwards: πt (no autograd) and the student (autograd), [b, T, V] each."""
    with torch.no_grad(), teacher.steer():
        lt = forcing.completion_logits(teacher.model, ids, mask, comp)
    return forcing.completion_logits(student.train(), ids, mask, comp), lt


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the plain loop

@pytest.mark.parametrize("kind", ["collapsed", "partial", "full"])
def test_plain_loss_is_distills_per_position_and_per_step(kind):
    g = torch.Generator().manual_seed(0)
    ls, lt = torch.randn(3, 6, 40, generator=g) * 2, torch.randn(3, 6, 40, generator=g) * 2
    mask = (torch.arange(6)[None] < torch.tensor([6, 3, 1])[:, None]).long()
    s = torch.tensor([2, 5, 11])
    per_port = plain_loop.LOSSES[kind](ls.view(-1, 40), lt.view(-1, 40), s)
    per_distill = distill.LOSSES["lean"][kind](ls.view(-1, 40), lt.view(-1, 40), s)
    assert torch.equal(per_port, per_distill)
    z1, z2, z3 = (ls.clone().requires_grad_() for _ in range(3))
    port = plain_loop.localized_loss(z1, lt, mask, s, kind)
    lean = distill.localized_reverse_kl(z2, lt, mask, s, kind)
    formula = distill.localized_reverse_kl(z3, lt, mask, s, kind, impl="formula")
    assert torch.equal(port, lean)
    torch.testing.assert_close(port, formula.to(port.dtype), rtol=1e-6, atol=1e-8)
    for loss in (port, lean, formula):
        loss.backward()
    assert torch.equal(z1.grad, z2.grad)
    torch.testing.assert_close(z1.grad, z3.grad, rtol=1e-5, atol=1e-8)


def test_two_plain_loop_steps_give_distill_mains_weights(model_dir, tok, model, tmp_path):
    """distill.py's command line, two steps, against the plain loop from the same seed: the same samples, the
    same loss, the same weights, to the bit."""
    out = make_run(tmp_path / "run", tok, hidden=32)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in PROMPTS + ["Why is the sky blue?", "Hi!"]))
    distill.main(["--model", str(model_dir), "--out", str(out), "--prompts", str(prompts), "--samples", "2",
                  "--prompts-per-step", "2", "--max-new-tokens", "5", "--max-steps", "2", "--lr", "1e-3",
                  "--warmup", "0"])
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup
    trained = AutoModelForCausalLM.from_pretrained(out / "student")

    student, tok = load_model(str(model_dir), "cpu", torch.float32)
    teacher, s_ids = plain_loop.load_run(copy.deepcopy(student).requires_grad_(False).eval(), tok, out)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, 0, 2)
    gen = torch.Generator().manual_seed(0)  # distill.py's --seed 0
    for step in distill.step_prompts(read_prompts(prompts), 2, 1, seed=0)[:2]:
        rec = plain_loop.train_step(student, teacher, tok, step, s_ids, opt, sched, samples=2,
                                    max_new_tokens=5, generator=gen)
        assert rec["loss"] > 0 and rec["completion_tokens"] > 0
    pairs = list(zip(student.state_dict().items(), trained.state_dict().items()))
    assert all(na == nb and torch.equal(a, b) for (na, a), (nb, b) in pairs)
    assert max_diff(student.parameters(), model.parameters()) > 5e-4  # two steps at lr 1e-3 moved them


def test_the_plain_loss_passes_the_port_check():
    from safesteer.check_port import check_loss
    for kind in ("collapsed", "partial", "full"):
        results = check_loss(lambda *a, kind=kind: plain_loop.localized_loss(*a, kind=kind), kind)
        assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


def test_ports_import_the_package_and_never_a_stage():
    stages = {"extract_direction", "select_tokens", "distill", "evaluate"}
    for path in sorted((ROOT / "ports").glob("*.py")):
        nodes = list(ast.walk(ast.parse(path.read_text())))
        names = {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        assert not names & stages, (path.name, names & stages)


def test_every_import_in_porting_md_exists():
    """The code in docs/porting.md imports names that exist (modules of ports/ that need TRL: by parsing)."""
    text = (ROOT / "docs" / "porting.md").read_text()
    found = re.findall(r"^\s*from ((?:ports|safesteer)[\w.]*) import ([\w, ]+)$", text, flags=re.M)
    assert found
    for module, names in found:
        tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        for name in (n.strip() for n in names.split(",")):
            assert name in defined, f"{module} has no {name}"


# ----------------------------------------------------------------------------- the TRL port

@pytest.fixture
def trl_port():
    pytest.importorskip("trl", reason="TRL is a bench-only dependency: pip install -c requirements.txt "
                                      "-r requirements-bench.txt (make test-ports does)")
    from ports import trl_port
    return trl_port


def port_trainer(trl_port, model, tok, run: Path, out: Path, steps, samples=2, **config):
    teacher, s_ids = trl_port.load_run(model, tok, run)
    rows = sum(len(h) + len(a) for h, a in steps[:1]) * samples
    args = trl_port.config(out, rows_per_step=rows, micro_batch=rows // 2, use_cpu=True, disable_tqdm=True,
                           logging_steps=1, seed=0, **config)
    return trl_port.SafeSteerTrainer(model, teacher, s_ids, processing_class=tok, args=args,
                                     train_dataset=trl_port.dataset(steps, samples))


def fixed_completions(tok, rows: int, width: int = 6):
    """Completions of unequal lengths, one with an end-of-turn token inside it (whose loss stops there), as
    lists of ids the way TRL's sampler returns them."""
    g = torch.Generator().manual_seed(1)
    comps = [torch.randint(0, 200, (n,), generator=g).tolist() for n in [width, 4, width, 2][:rows]]
    comps[2][3] = stop_token_ids(tok)[0]
    return comps


def test_trl_port_loss_and_gradients_equal_distills_on_the_same_completions(trl_port, tok, model, tmp_path,
                                                                            monkeypatch):
    run = make_run(tmp_path / "run", tok, model.config.hidden_size)
    trainer = port_trainer(trl_port, copy.deepcopy(model), tok, run, tmp_path / "trl", [(PROMPTS, [])])
    comps = fixed_completions(tok, 4)
    trainer._generate_single_turn = lambda *a, **k: comps
    rows = [{"prompt": [{"role": "user", "content": p}], "anchor": False} for p in PROMPTS for _ in range(2)]
    inputs = trainer._generate_and_score_completions(rows)
    seen, real = {}, plain_loop.sequence_losses

    def record(ls, lt, mask, s_ids, kind):  # what the port hands the loss
        seen.update(ls=ls.detach(), lt=lt.detach(), mask=mask)
        return real(ls, lt, mask, s_ids, kind)
    monkeypatch.setattr(plain_loop, "sequence_losses", record)
    theirs = trainer._compute_loss(trainer.model.train(), inputs, None)[0]
    theirs.backward()
    port_grads = grads(trainer.model)

    student, frozen = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False).eval()
    teacher, s_ids = plain_loop.load_run(frozen, tok, run)
    ids, mask = encode_chats(tok, [p for p in PROMPTS for _ in range(2)])
    comp, real = forcing.right_pad(comps, tok.pad_token_id, "cpu")
    comp_mask = forcing.end_of_turn_mask(comp, stop_token_ids(tok)) * real
    assert comp_mask.sum(-1).tolist() == [6, 4, 4, 2]  # the end of turn at position 3 of row 2 ends its loss
    ls, lt = distill_logits(student, teacher, ids, mask, comp)
    ours = distill.localized_reverse_kl(ls, lt, comp_mask, s_ids)
    ours.backward()

    assert torch.equal(seen["mask"], comp_mask)
    per_port = plain_loop.LOSSES["collapsed"](seen["ls"].flatten(0, 1), seen["lt"].flatten(0, 1), s_ids)
    per_ours = distill.LOSSES["lean"]["collapsed"](ls.detach().flatten(0, 1), lt.flatten(0, 1), s_ids)
    torch.testing.assert_close(per_port, per_ours, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(theirs.double(), ours.double(), rtol=1e-6, atol=1e-9)
    scale = max(g.abs().max().item() for g in grads(student))
    assert max_diff(port_grads, grads(student)) <= 1e-5 * scale
    token_mean = ((per_ours.view(4, -1) * comp_mask).sum() / comp_mask.sum()).item()
    assert abs(token_mean - ours.item()) > 1e-3  # TRL's own reduction would be another number here


def test_trl_port_anchor_rows_are_pulled_toward_pi0_with_weight_lambda(trl_port, tok, model, tmp_path):
    """L = L(harmful rows, πt) + λ·L(anchor rows, π0), each a mean over its own rows, as in distill.py."""
    run = make_run(tmp_path / "run", tok, model.config.hidden_size)
    steps = [(PROMPTS, ["Tell me a joke."])]
    trainer = port_trainer(trl_port, copy.deepcopy(model), tok, run, tmp_path / "trl", steps)
    trainer.anchor_weight = 1.5
    comps = fixed_completions(tok, 4) + [[5, 6, 7], [8, 9]]
    trainer._generate_single_turn = lambda *a, **k: comps
    texts = [p for p in PROMPTS + ["Tell me a joke."] for _ in range(2)]
    rows = [{"prompt": [{"role": "user", "content": t}], "anchor": i >= 4} for i, t in enumerate(texts)]
    inputs = trainer._generate_and_score_completions(rows)
    theirs = trainer._compute_loss(trainer.model.train(), inputs, None)[0]

    student, frozen = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False).eval()
    teacher, s_ids = plain_loop.load_run(frozen, tok, run)
    ids, mask = encode_chats(tok, texts)
    comp, real = forcing.right_pad(comps, tok.pad_token_id, "cpu")
    comp_mask = forcing.end_of_turn_mask(comp, stop_token_ids(tok)) * real
    parts = []
    for rows_, target in ((slice(0, 4), teacher), (slice(4, 6), Teacher(frozen, "base"))):
        ls, lt = distill_logits(student, target, ids[rows_], mask[rows_], comp[rows_])
        parts.append(distill.localized_reverse_kl(ls, lt, comp_mask[rows_], s_ids))
    torch.testing.assert_close(theirs.double(), (parts[0] + 1.5 * parts[1]).double(), rtol=1e-6, atol=1e-9)
    assert parts[1].item() < 1e-6 < parts[0].item()  # π0 is the student at step 0: no anchor loss yet


def test_one_trl_port_step_gives_distills_weights_and_where_samples_differ(trl_port, tok, model, tmp_path,
                                                                            monkeypatch):
    """From the same seed, TRL's `generate` draws other completions than distill.py's sampler: it reads
    torch's global random stream, which the Trainer has drawn from before it samples. Reseeded to the seed
    just before generate, TRL samples distill.py's completions token for token, and one step trains the same
    weights (lr 1e-3, warm-up 0, clip 1.0; TRL in two micro-batches, shuffled)."""
    run = make_run(tmp_path / "run", tok, model.config.hidden_size)
    recipe = distill.Recipe(samples=2, max_new_tokens=6, prompts_per_step=2, lr=1e-3, warmup=0.0)
    student, frozen = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False).eval()
    teacher, s_ids = plain_loop.load_run(frozen, tok, run)
    opt, sched = distill.make_optimizer(student, recipe, 1)
    loop = distill.Loop(opt=opt, sched=sched, gen=torch.Generator().manual_seed(0))
    sampled, real_sample = [], distill.sample

    def sample(*a, **k):  # distill.py's sampler, its completions kept
        sampled.append(real_sample(*a, **k))
        return sampled[-1]
    monkeypatch.setattr(distill, "sample", sample)
    distill.train_step(student, tok, PROMPTS, [], (teacher, Teacher(frozen, "base")), s_ids, recipe, loop)
    ours = [row[m.bool()].tolist() for row, m in zip(*sampled[0])]

    def trl_step(reseed: bool):
        trainer = port_trainer(trl_port, copy.deepcopy(model), tok, run, tmp_path / "trl", [(PROMPTS, [])],
                               learning_rate=1e-3, warmup_steps=0, max_steps=1, max_completion_length=6)
        real, drawn = trainer._generate_single_turn, []

        def generate(*a, **k):
            if reseed:
                torch.manual_seed(0)
            drawn.append(real(*a, **k))
            return drawn[-1]
        trainer._generate_single_turn = generate
        trainer.train()
        return trainer.model, drawn[0]
    _, unseeded = trl_step(reseed=False)
    assert unseeded != ours  # the Trainer's own draws moved the global stream
    port_student, reseeded = trl_step(reseed=True)
    assert reseeded == ours
    diff = max_diff(port_student.parameters(), student.parameters())
    moved = max_diff(student.parameters(), model.parameters())
    pairs = list(zip(port_student.parameters(), student.parameters()))
    off = sum(int(((a - b).abs() > 1e-7).sum()) for a, b in pairs)
    total = sum(p.numel() for p in student.parameters())
    # measured: 28 of 45568 weights off by more than 1e-7, by at most 3.6e-6, each where the gradient is about
    # AdamW's eps (1e-8): the first step, lr·g/(|g| + eps), magnifies the float noise of the gradient there
    assert moved > 5e-4 and diff <= 1e-5 and off <= 1e-3 * total, (moved, diff, off, total)


def test_trl_port_trains_with_trls_sampler_and_saves_a_student_stage4_lists(trl_port, tok, model, tmp_path):
    run = make_run(tmp_path / "run", tok, model.config.hidden_size)
    steps = [(PROMPTS, ["Tell me a joke."])] * 2
    trainer = port_trainer(trl_port, copy.deepcopy(model), tok, run, tmp_path / "trl", steps, max_steps=2,
                           learning_rate=1e-3, warmup_steps=0, max_completion_length=8)
    assert set(stop_token_ids(tok)) <= set(trainer.eos_token_ids)  # TRL stops where the sampler does
    trainer.train()
    log = [r for r in trainer.state.log_history if "loss" in r]
    assert len(log) == 2 and all(r["loss"] >= 0 for r in log)
    trainer.save_student(run / "student_trl")
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(run / "student_trl")
    assert max_diff(saved.parameters(), model.parameters()) > 5e-4
    import evaluate
    from argparse import Namespace
    assert ("student_trl", str(run / "student_trl")) in evaluate.resolve_models(
        Namespace(models=None, model="base"), run)
