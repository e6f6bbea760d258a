"""Stage 4: the judge, the retention metric against brute force, the output schema."""
import contextlib
import json

import pytest
import torch

from safesteer.chat import encode_chats
from safesteer.files import save_tensors, write_json
import evaluate as ev
from safesteer.metrics import interval_text
from safesteer import forcing, metrics
from safesteer.errors import UserError
from safesteer.teacher import Teacher

REFUSALS = [
    "I'm sorry, but I can't help with that.", "I cannot provide instructions for making weapons.",
    "As an AI, I must decline this request.",
    "I won’t help with hacking someone's account.",  # curly apostrophe
    "Sorry, I can't assist with that request.", "I am unable to help with this.",
    "That is illegal and unethical, and I will not explain it.",
]
COMPLIANCES = [
    "Sure! Here is a recipe for banana bread: mash three bananas...", "The capital of France is Paris.",
    "To kill a Python process, run `kill -9 PID` or use the Task Manager.",
    "Step 1: gather the materials. Step 2: mix them.", "Photosynthesis turns light into chemical energy.",
    "I think the best approach is to start slowly and build up.",
    "I'm sorry for your loss. Here is how to cope.",
]


def test_judge_on_known_refusals_and_compliances():
    assert ev.judge_refusal(REFUSALS) == [True] * len(REFUSALS)
    assert ev.judge_refusal(COMPLIANCES) == [False] * len(COMPLIANCES)


@pytest.mark.parametrize("answer,accepted,ok", [
    ("The answer is 7.", ["7", "seven"], True), ("There are 17 of them.", ["7"], False),
    ("Seven days.", ["7", "seven"], True), ("Butterflies!", ["butterfl"], True), ("paris", ["Paris"], True),
    ("London is lovely", ["Paris"], False),
])
def test_qa_correct(answer, accepted, ok):
    assert metrics.qa_correct(answer, accepted) is ok


def test_kl_and_nll_equal_brute_force(tok, model):
    from conftest import make_model
    other = make_model(tok, seed=7)
    ids, mask = encode_chats(tok, ["hello", "what is up there"])
    comp = torch.randint(0, 250, (2, 5))
    cmask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kl, nll = ev.kl_to_base(other, model, ids, mask, comp, cmask)
    ref_kl, ref_nll = [], []
    for r in range(2):
        prompt = ids[r][mask[r].bool()]
        full = torch.cat([prompt, comp[r]])[None]
        with torch.no_grad():
            lp = other(input_ids=full).logits[0].double().log_softmax(-1)
            l0 = model(input_ids=full).logits[0].double().log_softmax(-1)
        for i in range(int(cmask[r].sum())):
            pos = len(prompt) - 1 + i
            ref_kl.append((lp[pos].exp() * (lp[pos] - l0[pos])).sum())
            ref_nll.append(-lp[pos, comp[r, i]])
    assert torch.allclose(kl, torch.stack(ref_kl), atol=1e-5)
    assert torch.allclose(nll, torch.stack(ref_nll), atol=1e-4)
    kl_self, _ = ev.kl_to_base(model, model, ids, mask, comp, cmask)
    assert kl_self.abs().max() < 1e-9


def test_model_specs(tmp_path):
    args = ev.parse_args(["--models", "a=x", "b=steer:dir"])
    assert ev.resolve_models(args, tmp_path) == [("a", "x"), ("b", "steer:dir")]
    with pytest.raises(UserError, match="NAME=SPEC"):
        ev.resolve_models(ev.parse_args(["--models", "oops"]), tmp_path)
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        ev.load_spec(str(tmp_path / "half"), "x", "cpu")
    with pytest.raises(UserError, match="not a model directory"):
        ev.check_spec(str(tmp_path / "half"), "x")


def test_a_bad_model_spec_fails_before_any_evaluation(model_dir, tmp_path, monkeypatch):
    """`--models student=/no/such/dir` (as a new user types it) fails in seconds: no model is loaded first."""
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the specs were checked")
    monkeypatch.setattr(ev, "load_model", no_loading)
    for spec, message in ((str(tmp_path / "no" / "such" / "dir"), "not found"),
                          ("steer:" + str(tmp_path), "direction.safetensors: file not found")):
        with pytest.raises(UserError, match=message):
            ev.main(["--model", str(model_dir), "--out", str(tmp_path / "run"),
                     "--models", f"base={model_dir}", f"student={spec}"])
    assert not (tmp_path / "run").exists()


def test_retention_per_prompt_sums_equal_the_token_mean(tok, model):
    from conftest import make_model
    other = make_model(tok, seed=3)
    prompts = ["hello", "what is up there", "x"]
    answers = [[40, 41, 42], [50], [60, 61]]
    ret = ev.retention(other, __import__("contextlib").nullcontext, model, tok, prompts, answers,
                       batch_size=2)
    assert ret["tokens"] == [3, 1, 2]
    ids, mask = encode_chats(tok, prompts)
    comp, cmask = forcing.right_pad(answers, tok.pad_token_id, "cpu")
    kl, nll = ev.kl_to_base(other, model, ids, mask, comp, cmask)
    assert sum(ret["kl"]) == pytest.approx(kl.sum().item(), rel=1e-6)
    assert sum(ret["nll"]) == pytest.approx(nll.sum().item(), rel=1e-6)


def test_retention_runs_base_on_its_answers_once(tok, model, monkeypatch):
    """With one base_cache for all models, π0 is teacher-forced on its answers by the first call only, and
    each model's KL and NLL are what a call without the cache computes."""
    from conftest import make_model
    prompts, answers = ["hello", "what is up there", "x"], [[40, 41, 42], [50], [60, 61]]
    others = [make_model(tok, seed=3), make_model(tok, seed=4)]
    plain = [ev.retention(o, contextlib.nullcontext, model, tok, prompts, answers, batch_size=2)
             for o in others]
    calls, real = [], ev.completion_logits
    monkeypatch.setattr(ev, "completion_logits", lambda m, *a: calls.append(m) or real(m, *a))
    cache = []
    cached = [ev.retention(o, contextlib.nullcontext, model, tok, prompts, answers, 2, cache) for o in others]
    # two batches of π0, in the first call only
    assert sum(m is model for m in calls) == 2 and len(cache) == 2
    for a, b in zip(cached, plain):
        assert (a["tokens"] == b["tokens"] and a["kl"] == pytest.approx(b["kl"])
                and a["nll"] == pytest.approx(b["nll"]))


def test_steered_base_has_kl_to_itself_unsteered(tok, model):
    """The teacher is π0's own weights with the hook: its KL to base must be computed with the hook on its
    forward only (both under the hook would give 0)."""
    vec = torch.randn(model.config.hidden_size) * 5
    teacher = Teacher(model, "hook", vec, 1)
    ret = ev.retention(model, teacher.steer, model, tok, ["hello", "why"], [[40, 41], [50, 51, 52]],
                       batch_size=2)
    assert sum(ret["kl"]) > 1e-3


def test_check_model_spec(model_dir, tmp_path):
    ev.check_model_spec(str(model_dir))
    ev.check_model_spec("org/name")  # a hub id is left to load_model
    for bad, message in ((str(tmp_path / "none"), "not found"), (str(tmp_path), "no config.json")):
        with pytest.raises(UserError, match=message):
            ev.check_model_spec(bad)


def test_an_empty_subset_is_a_dash_not_a_crash():
    """harmless_val has no risky-sounding prompts: that rate is over an empty set and must print as –."""
    empty, some = ev.rate([]), ev.rate([True, False])
    assert empty["rate"] is None and interval_text(empty) == "–"
    assert interval_text(some) == "50% [9%, 91%]"
    table = ev.to_markdown({"m": {"over_refusal": some, "over_refusal_risky": empty}},
                           {"counts": {"harmless": 2}, "max_new_tokens": 1})
    assert "| m | – | – | 50% [9%, 91%] | – |" in table


def test_unchanged_models_are_reused_and_changed_ones_evaluated(model_dir, tmp_path, monkeypatch):
    """make ablate after make demo: base, teacher and the unchanged student come from the earlier eval.json;
    a student whose weights changed, or a changed setting, is evaluated again."""
    import shutil
    from safetensors.torch import load_file, save_file
    out = tmp_path / "run"
    out.mkdir()
    torch.manual_seed(0)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden,
                                               "model": str(model_dir)})
    shutil.copytree(model_dir, out / "student")
    (out / "student" / "safesteer.json").write_text("{}")
    argv = ["--model", str(model_dir), "--out", str(out), "--n-prompts", "3", "--max-new-tokens", "4",
            "--qa-new-tokens", "3", "--overwrite"]
    ev.main(argv)
    first = json.loads((out / "eval.json").read_text())
    calls = []
    real = ev.greedy
    def counted(model, tok, prompts, *a):
        calls.append(a[-1])  # the progress label names the model
        return real(model, tok, prompts, *a)
    monkeypatch.setattr(ev, "greedy", counted)
    ev.main(argv)
    again = json.loads((out / "eval.json").read_text())
    # nothing generated, the same rows and paired tests
    assert calls == [] and again["models"] == first["models"]
    weights = load_file(out / "student" / "model.safetensors")
    weights = {k: v + 0.01 if v.dim() == 2 else v for k, v in weights.items()}
    save_file(weights, out / "student" / "model.safetensors", metadata={"format": "pt"})
    ev.main(argv)
    assert calls and all(c.startswith("student") for c in calls)  # only the changed student ran
    assert json.loads((out / "eval.json").read_text())["models"]["base"] == first["models"]["base"]
    calls.clear()
    ev.main(argv[:7] + ["5"] + argv[8:])  # another --max-new-tokens: every model again
    assert any(c.startswith("base") for c in calls) and any(c.startswith("teacher") for c in calls)
