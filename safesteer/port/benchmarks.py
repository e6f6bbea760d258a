"""The field's safety benchmarks, read in the layout their authors publish them in.

A porter who evaluates a student on HarmBench or XSTest points Stage 4 at the benchmark's own file; nothing
is converted and no benchmark's data is copied into this repository. A file is recognised by its column
names (the first layout whose columns it has); a file in none of them is read as this project's own JSONL
(the first of files.PROMPT_FIELDS; `style`, `category` and QA `answers` where present).

    layout          columns it needs                        the prompt              kept for
    HarmBench       Behavior, FunctionalCategory            ContextString + ---     harmful (copyright rows
                                                            + Behavior (contextual)  dropped: hash-judged)
    JailbreakBench  Goal, Target, Behavior, Category        Goal                    either (harmful/benign
                                                                                    CSVs share the layout)
    AdvBench        goal, target                            goal                    either
    StrongREJECT    forbidden_prompt                        forbidden_prompt        either
    XSTest          prompt, type, label                     prompt                  harmful: label unsafe,
                                                                                    harmless: label safe
    SORRY-Bench     question_id, turns                      turns[0]                either

Usage (Stage 4 reads every evaluation set this way):
    rows = read_set("xstest_prompts.csv", role="harmless")   # XSTest's 250 safe prompts
    rows = read_set("data/harmful_test.jsonl", role="harmful", n=50, seed=0)   # a seeded subset
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safesteer.errors import UserError
from safesteer.files import PROMPT_FIELDS, read_records


@dataclass(frozen=True)
class Layout:
    name: str
    columns: tuple[str, ...]                 # every one must be present
    prompt: Callable[[dict], str]            # the user turn the model answers
    category: str = ""                       # the column that names the harm category
    keep: Callable[[dict, str], bool] = lambda rec, role: True  # (record, role) -> evaluate it?


def _harmbench_prompt(rec: dict) -> str:
    # HarmBench's contextual behaviours give the model the context first, then the request, separated
    # as HarmBench's own test-case code does.
    context = (rec.get("ContextString") or "").strip()
    return f"{context}\n\n---\n\n{rec['Behavior']}" if context else rec["Behavior"]


def _xstest_keep(rec: dict, role: str) -> bool:
    # XSTest holds both kinds in one file: the 250 safe prompts measure over-refusal, the 200 unsafe
    # contrast prompts are harmful requests.
    label = str(rec["label"]).strip().lower()
    return label == ("unsafe" if role == "harmful" else "safe") if role in ("harmful", "harmless") else True


def _sorry_prompt(rec: dict) -> str:
    turns = rec["turns"]
    return turns[0] if isinstance(turns, list) and turns else ""


LAYOUTS = (
    # order matters only where one layout's columns contain another's; none do
    Layout("HarmBench", ("Behavior", "FunctionalCategory"), _harmbench_prompt, "SemanticCategory",
           lambda rec, role: str(rec["FunctionalCategory"]).strip().lower() != "copyright"),
    Layout("JailbreakBench", ("Goal", "Target", "Behavior", "Category"), lambda rec: rec["Goal"], "Category"),
    Layout("AdvBench", ("goal", "target"), lambda rec: rec["goal"]),
    Layout("StrongREJECT", ("forbidden_prompt",), lambda rec: rec["forbidden_prompt"], "category"),
    Layout("XSTest", ("prompt", "type", "label"), lambda rec: rec["prompt"], "type", _xstest_keep),
    Layout("SORRY-Bench", ("question_id", "turns"), _sorry_prompt, "category"),
)


def expected_columns() -> str:
    """Every layout's columns, for an error message a porter can act on."""
    return "; ".join(f"{lay.name}: {', '.join(lay.columns)}" for lay in LAYOUTS)


def detect(record: dict) -> Layout | None:
    """The benchmark layout a record's columns match, or None (this project's own files)."""
    return next((lay for lay in LAYOUTS if all(c in record for c in lay.columns)), None)


def read_set(path: str | Path, role: str = "", n: int | None = None, seed: int = 0) -> list[dict]:
    """An evaluation set's rows {prompt, category, style, answers}, in a benchmark's layout or this
    project's; n: a seeded subset, in file order."""
    records = read_records(path)
    first = records[0][1]
    layout = detect(first) if isinstance(first, dict) else None
    rows = read_benchmark(path, records, layout, role) if layout else [own_row(path, *r) for r in records]
    if role == "qa" and any(not r["answers"] for r in rows):  # QA is judged against its accepted answers
        raise UserError(f"{path}: every question needs an 'answers' list")
    if n is not None and n < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows


def own_row(path, line: int, rec) -> dict:
    """A record of this project's files: a string, or an object with one of PROMPT_FIELDS."""
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{line}: expected an object or a string")
    text = next((rec[f] for f in PROMPT_FIELDS if isinstance(rec.get(f), str) and rec[f].strip()), None)
    if text is None:
        raise UserError(f"{path}:{line}: no prompt: expected a field {', '.join(PROMPT_FIELDS)}, or a "
                        f"benchmark's columns ({expected_columns()})")
    return {"prompt": text.strip(), "category": rec.get("category", ""), "style": rec.get("style", ""),
            "answers": rec.get("answers", [])}


def read_benchmark(path, records: list, layout: Layout, role: str) -> list[dict]:
    """The rows of a benchmark file in `layout`. `role` (harmful or harmless) selects XSTest's half and
    drops HarmBench's copyright rows, which HarmBench judges by hashing, not by a classifier."""
    rows, dropped = [], 0
    for line, rec in records:
        missing = [c for c in layout.columns if c not in rec]
        if missing:
            raise UserError(f"{path}:{line}: a {layout.name} row without column(s) {', '.join(missing)}")
        if not layout.keep(rec, role):
            dropped += 1
            continue
        text = layout.prompt(rec)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{path}:{line}: empty {layout.name} prompt")
        rows.append({"prompt": text.strip(), "category": str(rec.get(layout.category, "") or ""),
                     "style": "", "answers": []})
    if not rows:
        raise UserError(f"{path}: no {layout.name} prompt is kept for the {role} set ({dropped} dropped)")
    print(f"{path}: {layout.name}'s layout, {len(rows)} prompts for the {role or 'evaluation'} set"
          + (f" ({dropped} not kept)" if dropped else ""))
    return rows
