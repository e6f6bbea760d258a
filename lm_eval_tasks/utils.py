"""The python side of the lm-eval task safesteer_general_qa: its questions and its rule, both Stage 4's.

Neither is copied: the questions are read by safesteer.port.benchmarks.read_set (which refuses a question
without answers, as Stage 4 does) and judged by safesteer.metrics.qa_correct, Stage 4's rule, so the task
cannot drift from Stage 4. It imports the installed package, never the stage script: lm-eval installs Hugging
Face's `evaluate`, a name the project's Stage 4 file shares. The data file is found from this file's place,
not the working directory: data/general_qa.jsonl beside lm_eval_tasks/, or the file in the metadata
`qa_path` (safesteer/port/capability.py's qa_path, or lm-eval's --metadata '{"qa_path": "..."}').
"""
from __future__ import annotations

from pathlib import Path

from safesteer.metrics import qa_correct
from safesteer.port.benchmarks import read_set

PROJECT_DIR = Path(__file__).resolve().parents[1]
QA_FILE = PROJECT_DIR / "data" / "general_qa.jsonl"  # the default of evaluate.py's --qa


def load_general_qa(qa_path: str | None = None, **metadata) -> dict:
    """{"test": the questions}, rows {prompt, category, style, answers} as Stage 4 reads them. lm-eval calls
    this with the task's metadata (version, config_source, ...) as keyword arguments; only qa_path is ours."""
    import datasets
    path = qa_path or QA_FILE
    rows = read_set(path, "qa")  # refuses a question without accepted answers, as Stage 4 does
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[str]) -> dict:
    """acc 1.0 when the reply holds an accepted answer (metrics.qa_correct). Stripped as Stage 4 strips its
    replies (sampling.decode_completions): the rule ignores surrounding space anyway."""
    return {"acc": float(qa_correct(results[0].strip(), doc["answers"]))}
