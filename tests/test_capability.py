"""safesteer/port/capability.py against Stage 4: the harness's safesteer_general_qa must count what
evaluate.py counts.

The harness tests need lm-eval, an optional extra (`make test-lm-eval` installs it and runs this file);
without it they are skipped and only the install hint is tested. A tiny random model answers in noise and
would score 0 on any real question, so the accepted answers are made from Stage 4's own replies: half the
questions accept the start of the reply Stage 4 got, half accept nothing the model says. The model is also
made to end some replies with <|eot_id|>, a stop id of Stage 4 that is neither eos nor pad, and its
tokenizer to add BOS on its own, so the test covers how the harness stops and what it feeds the model.
"""
import contextlib
import importlib.util
import json
import os
import sys
import types

import pytest
import torch
from tokenizers import processors

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub request would fail here: nothing is fetched
import evaluate  # the project's Stage 4 (lm-eval installs another package of that name)
from safesteer import metrics
from safesteer.port import capability
from safesteer.chat import render_chat
from safesteer.errors import UserError
from safesteer.files import data_file
from conftest import make_model, make_tokenizer  # noqa: E402

TASK = "safesteer_general_qa"
N_QUESTIONS, LIMIT, BATCH, NEW_TOKENS = 8, 6, 4, 24


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install -r "
                                                 "requirements-lmeval.txt (make test-lm-eval does)")


def end_turn_after(model, trigger: int, stop: int):
    """Make `model` say `stop` next whenever the token it reads is `trigger`: a forward hook on the embedding
    records the ids, one on the output head raises the stop's logit where they are the trigger. Both decoders
    (Stage 4's sampler, transformers' generate) call the model the same way; logits may cover only the last
    positions (logits_to_keep), so ids and logits are aligned from the right."""
    seen = {}

    def record(module, args, out):
        seen["ids"] = args[0]

    def boost(module, args, logits):  # [batch, k, vocab]
        hit = seen["ids"][:, -logits.shape[1]:] == trigger
        return logits + 100.0 * hit[..., None] * torch.nn.functional.one_hot(
            torch.tensor(stop), logits.shape[-1]).to(logits.dtype)
    model.model.embed_tokens.register_forward_hook(record)
    model.lm_head.register_forward_hook(boost)
    return model


def stage4_replies(model, tok, prompts: list[str]):
    """Stage 4's QA path: evaluate.greedy, as evaluate_model calls it for general_qa."""
    return evaluate.greedy(model, tok, prompts, NEW_TOKENS, BATCH, contextlib.nullcontext, "qa")


def bos_adding_tokenizer():
    """The ChatML test tokenizer, made to put BOS in front of whatever it encodes (as many tokenizers do)
    while its template writes none: Stage 4 adds no special tokens to a rendered chat, nor may the harness."""
    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("hi").input_ids[0] == tok.bos_token_id
    return tok


def test_harness_scores_what_stage4_scores(lm_eval, tmp_path):
    tok = bos_adding_tokenizer()
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot not in (tok.eos_token_id, tok.pad_token_id)
    questions = [r["prompt"] for r in evaluate.read_set(data_file("general_qa"))[:N_QUESTIONS]]
    plain = make_model(tok)
    trigger = stage4_replies(plain, tok, questions)[1][0][5]  # the sixth token of the first reply
    model = end_turn_after(make_model(tok), trigger, eot)
    texts, tokens = stage4_replies(model, tok, questions)
    assert any(t[-1] == eot for t in tokens[:LIMIT]), "no reply ends at <|eot_id|>: the stop is not covered"
    assert all(len(t) >= 3 for t in texts), "a reply too short to make an accepted answer from"
    # Even questions accept the first 3 characters of Stage 4's reply, odd ones an answer it never gives.
    answers = [[t[:3]] if i % 2 == 0 else ["qqqq"] for i, t in enumerate(texts)]
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text("".join(json.dumps({"question": q, "answers": a}) + "\n"
                               for q, a in zip(questions, answers)))
    correct = [metrics.qa_correct(t, a) for t, a in zip(texts, answers)][:LIMIT]
    assert correct == [True, False] * (LIMIT // 2)

    results = capability.run_harness(model, tok, [TASK], BATCH, LIMIT, max_new_tokens=NEW_TOKENS,
                                     qa_path=qa_file)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    # The same prompt (Stage 4's chat rendering), the same reply, the same verdict, question by question.
    assert [s["doc"]["prompt"] for s in samples] == questions[:LIMIT]
    assert [s["arguments"][0][0] for s in samples] == [render_chat(tok, q) for q in questions[:LIMIT]]
    assert [s["filtered_resps"][0].strip() for s in samples] == texts[:LIMIT]
    assert [s["acc"] == 1.0 for s in samples] == correct
    # ... and so exactly the same accuracy, in plain JSON-able numbers.
    scores = capability.plain_scores(results)
    assert scores[TASK]["acc"] == sum(correct) / LIMIT == 0.5
    assert scores[TASK]["n"] == LIMIT
    assert json.loads(json.dumps(scores)) == scores
    assert set(scores[TASK]) == {"acc", "acc_stderr", "n"}


def test_default_questions_are_found_from_any_directory_and_unknown_tasks_are_refused(lm_eval, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)  # the task finds data/general_qa.jsonl from its own place, not the cwd
    tok = make_tokenizer()
    scores = capability.lm_eval_scores(make_model(tok), tok, [TASK], batch_size=2, limit=2)
    assert scores[TASK]["n"] == 2 and 0.0 <= scores[TASK]["acc"] <= 1.0
    with pytest.raises(UserError, match="no task safesteer_nonexistent"):
        capability.lm_eval_scores(make_model(tok), tok, ["safesteer_nonexistent"], batch_size=2, limit=2)


def test_task_reads_stage4s_rule_even_where_the_name_evaluate_is_taken(lm_eval, monkeypatch):
    """lm-eval installs Hugging Face's `evaluate`; the task imports the package, never the stage's file, so
    that name does not matter, and its rule is Stage 4's own (metrics.qa_correct, which evaluate.py uses)."""
    monkeypatch.setitem(sys.modules, "evaluate", types.ModuleType("evaluate"))  # the other package
    spec = importlib.util.spec_from_file_location("task_utils", capability.TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.qa_correct is metrics.qa_correct
    doc = {"answers": ["Paris"]}
    assert utils.process_results(doc, [" It is Paris."]) == {"acc": 1.0}
    assert utils.process_results(doc, ["Comparison"]) == {"acc": 0.0}


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail, installed or not
    tok = make_tokenizer()
    with pytest.raises(UserError, match=r"pip install -r requirements-lmeval\.txt"):
        capability.lm_eval_scores(make_model(tok), tok, [TASK], batch_size=1, limit=1)


def test_stage4_hands_each_model_to_the_harness(lm_eval, model_dir, tmp_path):
    """`evaluate.py --lm-eval`: the harness scores the model Stage 4 loaded, on Stage 4's --qa file, and its
    accuracy is Stage 4's own. The questions accept the model's own reply on every other one (a tiny random
    model answers nothing right), so agreement means the same replies, not two zeros."""
    def run(qa):
        out = tmp_path / qa.stem
        evaluate.main(["--model", str(model_dir), "--out", str(out), "--models", f"base={model_dir}",
                       "--qa", str(qa), "--harmful", str(prompts), "--harmless", str(prompts),
                       "--harmful-reform", "", "--harmless-reform", "", "--max-new-tokens", "2",
                       "--lm-eval", TASK])
        samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
        return json.loads((out / "eval.json").read_text())["models"]["base"], out, samples
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "how are you"}\n')
    rows = [json.loads(line) for line in data_file("general_qa").read_text().splitlines()][:6]
    first = tmp_path / "qa.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = [s["completion"] for s in run(first)[2] if s["set"] == "general_qa"]
    for i, (r, reply) in enumerate(zip(rows, replies)):
        r["answers"] = [reply.strip()[:3] or "-"] if i % 2 == 0 else ["\u2603never said"]
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    row, out, _ = run(own)
    harness = row["lm_eval"][TASK]
    assert row["qa_accuracy"]["rate"] == 0.5 and (harness["n"], harness["acc"]) == (6, 0.5)
    assert f"lm-eval {TASK}: " in (out / "eval.md").read_text()
