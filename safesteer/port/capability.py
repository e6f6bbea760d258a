"""Capability scores from lm-evaluation-harness (lm-eval) for a model that is already loaded.

Stage 4 measures knowledge with its own general_qa accuracy. The harness adds its catalogue of tasks (each
downloads its data set, so only where a hub is reachable) and holds the same general_qa as a local task,
`safesteer_general_qa` (lm_eval_tasks/), which counts what Stage 4 counts: each question as one user turn in
the model's chat template, greedy decoding up to the end of turn or `max_new_tokens` tokens, correct when an
accepted answer appears as a word (evaluate.qa_correct). It reads data/general_qa.jsonl, nothing online.

An optional extra: `pip install -r requirements-lmeval.txt` (`make test-lm-eval` installs it and runs
tests/test_capability.py); `make demo` and `make test` never need it.

    lm_eval_scores      {task: {metric: value}} in plain floats (and each task's question count `n`)
    run_harness         lm-eval's own result, with every question, its prompt and the model's reply

Usage:
    from capability import lm_eval_scores
    from common import load_model
    model, tok = load_model("smollm2-135m")
    lm_eval_scores(model, tok, ["safesteer_general_qa"], batch_size=16, limit=None)
    # -> {"safesteer_general_qa": {"n": 60, "acc": 0.6, "acc_stderr": 0.0638}}  (Stage 4: 0.6 too)
"""
from __future__ import annotations

from pathlib import Path

from safesteer.chat import stop_token_ids
from safesteer.errors import UserError

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
INSTALL = "pip install -r requirements-lmeval.txt"


def import_lm_eval():
    """lm_eval, its HFLM wrapper and TaskManager; a one-line UserError with the install command if missing.
    Imported here, not at the top: the stages import this module, and most runs never call the harness."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"capability scores need lm-eval, which could not be imported ({e}); "
                        f"install it with `{INSTALL}`") from None
    return lm_eval, HFLM, TaskManager


def run_harness(model, tokenizer, tasks: list[str], batch_size: int, limit: int | None,
                chat_template: bool = True, max_new_tokens: int | None = None,
                qa_path: str | Path | None = None) -> dict:
    """lm-eval's simple_evaluate on `model` as it is (a steering hook that is on stays on).

    limit: the first `limit` questions of each task (lm-eval's --limit; Stage 4's --n draws a seeded subset).
    max_new_tokens: every generative task's max_gen_toks (lm-eval's --gen_kwargs); by default each task keeps
    its own, 24 for safesteer_general_qa as Stage 4's --qa-new-tokens. qa_path: the questions of
    safesteer_general_qa (default data/general_qa.jsonl, as Stage 4's --qa). Like lm-eval's command line, it
    seeds Python's, numpy's and torch's global generators."""
    lm_eval, HFLM, TaskManager = import_lm_eval()
    # The chat template writes BOS where the model wants one and chat.encode_chats adds none, so the harness
    # must not either (by default it lets the tokenizer prepend its BOS); enable_thinking=False as in
    # chat.render_chat, so that Qwen3 answers directly. Without the template the tokenizer's default stands.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=False if chat_template else None, enable_thinking=False)
    # Stage 4 ends an answer at the first of these ids (end of turn, eos, <|endoftext|>, ...); lm-eval alone
    # ends it at the eos token only, and an answer that ended with another one would run on.
    gen_kwargs = {"eos_token_id": stop_token_ids(tokenizer)}
    if max_new_tokens is not None:
        gen_kwargs["max_gen_toks"] = max_new_tokens
    # lm-eval hands the metadata to the task's data loader as keyword arguments (lm_eval_tasks/utils.py).
    # lm-eval's own catalogue is indexed too (a few seconds): its tasks work where a hub is reachable.
    metadata = {"qa_path": str(Path(qa_path).resolve())} if qa_path is not None else None
    manager = TaskManager(include_path=str(TASK_DIR), metadata=metadata)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(unknown)} (the local ones are in {TASK_DIR})")
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                   apply_chat_template=chat_template, gen_kwargs=gen_kwargs,
                                   task_manager=manager)


def plain_scores(results: dict) -> dict:
    """{task: {metric: float, "n": questions}} from lm-eval's result. Its keys name the filter ("acc,none" ->
    "acc"; another filter stays in the name); its name, alias and "N/A" standard errors (one question) go."""
    scores = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filtered = key.partition(",")
            if key == "sample_len":
                row["n"] = int(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric if filtered in ("", "none") else key] = float(value)
        scores[task] = row
    return scores


def lm_eval_scores(model, tokenizer, tasks: list[str], batch_size: int, limit: int | None,
                   chat_template: bool = True, max_new_tokens: int | None = None,
                   qa_path: str | Path | None = None) -> dict:
    """The harness's scores of `model` on `tasks`, JSON-able: {task: {metric: value}} (see run_harness)."""
    return plain_scores(run_harness(model, tokenizer, tasks, batch_size, limit, chat_template,
                                    max_new_tokens, qa_path))
