"""The python side of the lm-eval task safesteer_general_qa: its questions and its rule, both Stage 4's.

Neither is copied: the questions are read by evaluate.read_set (benchmarks.py's, which refuses a question
without answers) and judged by evaluate.qa_correct, so the task cannot drift from Stage 4. The data file
is found from this file's place, not the working directory: data/general_qa.jsonl beside lm_eval_tasks/, or
the file in the metadata `qa_path` (capability.py's qa_path, or lm-eval's --metadata '{"qa_path": "..."}').
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
QA_FILE = PROJECT_DIR / "data" / "general_qa.jsonl"  # the default of evaluate.py's --qa


@functools.cache
def stage4():
    """The project's evaluate.py. Loaded from its file, not by name: lm-eval installs Hugging Face's package
    `evaluate` too, and `import evaluate` finds whichever comes first on sys.path."""
    path = PROJECT_DIR / "evaluate.py"
    loaded = sys.modules.get("evaluate")
    if loaded is not None and Path(getattr(loaded, "__file__", None) or "").resolve() == path:
        return loaded
    if str(PROJECT_DIR) not in sys.path:  # for evaluate.py's own imports (chat, common, ...)
        sys.path.append(str(PROJECT_DIR))  # last: the project's modules shadow no installed package
    spec = importlib.util.spec_from_file_location("safesteer_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_general_qa(qa_path: str | None = None, **metadata) -> dict:
    """{"test": the questions}, rows {prompt, category, style, answers} as Stage 4 reads them. lm-eval calls
    this with the task's metadata (version, config_source, ...) as keyword arguments; only qa_path is ours."""
    import datasets
    path = qa_path or QA_FILE
    rows = stage4().read_set(path, "qa")  # refuses a question without accepted answers, as Stage 4 does
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[str]) -> dict:
    """acc 1.0 when the reply holds an accepted answer (evaluate.qa_correct). Stripped as Stage 4 strips its
    replies (steering.decode_completions): the rule ignores surrounding space anyway."""
    return {"acc": float(stage4().qa_correct(results[0].strip(), doc["answers"]))}
