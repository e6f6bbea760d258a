"""The field's safety benchmarks, read in the layout their authors publish them in.

A porter who evaluates a student on HarmBench or XSTest points Stage 4 at the benchmark's own file; nothing
is converted and no benchmark's data is copied into the package. A file is recognised by its column names
(the first layout whose columns it has and none it must not have); a file in none of them is read as this
project's own JSONL (the first of files.PROMPT_FIELDS; `style`, `category` and QA `answers` where present),
and a CSV read that way says so.

    layout          columns it needs                        the request             kept for
    HarmBench       Behavior, FunctionalCategory            Behavior, after its     harmful (copyright rows
                                                            ContextString + ---     dropped: hash-judged)
    JailbreakBench  Goal, Target, Behavior, Category        Goal                    either (harmful/benign
                                                                                    CSVs share the layout)
    AdvBench        goal, target                            goal                    either
    StrongREJECT    forbidden_prompt                        forbidden_prompt        either
    XSTest          prompt, type, label (the current file)  prompt                  harmful: label unsafe,
                                                                                    harmless: label safe
    XSTest v2       id_v2, prompt, type (no label)          prompt                  harmful: type contrast_*
                                                                                    harmless: the others
    XSTest v1       id, prompt, type, focus, not label      prompt                  harmless (all 200 safe)
    SORRY-Bench     question_id, turns                      turns[0]                either

A benchmark's row keeps its request and its context (HarmBench's contextual behaviours) apart: the model
reads `prompt` (the context, ---, the request), which fit_prompts shortens in its context only; a guard reads
the request and the context as the file holds them. Tested on the published files (tests/fixtures/).

Usage (Stage 4 reads every evaluation set this way):
    rows = read_set("xstest_prompts.csv", role="harmless")   # XSTest's 250 safe prompts
    rows = read_set("data/harmful_test.jsonl", role="harmful", n=50, seed=0)   # a seeded subset
    fit_prompts(tok, rows, 512, "harmbench_behaviors_text_test.csv")  # 18 of 240 shortened in their context
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safesteer.errors import UserError
from safesteer.files import PROMPT_FIELDS, read_records, truncate_prompts


@dataclass(frozen=True)
class Layout:
    name: str
    columns: tuple[str, ...]                 # every one must be present
    prompt: Callable[[dict], str]            # the request the model answers
    category: str = ""                       # the column that names the harm category
    keep: Callable[[dict, str], bool] = lambda rec, role: True  # (record, role) -> evaluate it?
    context: Callable[[dict], str] = lambda rec: ""   # text the request is about, given before it
    absent: tuple[str, ...] = ()             # columns that mark another layout


def with_context(context: str, request: str) -> str:
    """The user turn of a contextual behaviour: the context first, then the request, separated as
    HarmBench's own test-case code does; a request without context alone."""
    context = context.strip()
    return f"{context}\n\n---\n\n{request}" if context else request


def _xstest_keep(rec: dict, role: str) -> bool:
    # XSTest holds both kinds in one file: the 250 safe prompts measure over-refusal, the 200 unsafe
    # contrast prompts are harmful requests. The current file labels them; v2 has only their type
    # (contrast_homonyms, ...); v1 has no contrast prompts at all.
    if role not in ("harmful", "harmless"):
        return True
    if "label" in rec:
        unsafe = str(rec["label"]).strip().lower() == "unsafe"
    else:
        unsafe = str(rec["type"]).strip().lower().startswith("contrast_")
    return unsafe == (role == "harmful")


def _sorry_prompt(rec: dict) -> str:
    turns = rec["turns"]
    return turns[0] if isinstance(turns, list) and turns else ""


LAYOUTS = (
    # order matters only where one layout's columns contain another's; none do
    Layout("HarmBench", ("Behavior", "FunctionalCategory"), lambda rec: rec["Behavior"], "SemanticCategory",
           lambda rec, role: str(rec["FunctionalCategory"]).strip().lower() != "copyright",
           context=lambda rec: rec.get("ContextString") or ""),
    Layout("JailbreakBench", ("Goal", "Target", "Behavior", "Category"), lambda rec: rec["Goal"], "Category"),
    Layout("AdvBench", ("goal", "target"), lambda rec: rec["goal"]),
    Layout("StrongREJECT", ("forbidden_prompt",), lambda rec: rec["forbidden_prompt"], "category"),
    Layout("XSTest", ("prompt", "type", "label"), lambda rec: rec["prompt"], "type", _xstest_keep),
    Layout("XSTest v2", ("id_v2", "prompt", "type"), lambda rec: rec["prompt"], "type", _xstest_keep,
           absent=("label",)),
    Layout("XSTest v1", ("id", "prompt", "type", "focus"), lambda rec: rec["prompt"], "type", _xstest_keep,
           absent=("label", "id_v2")),
    Layout("SORRY-Bench", ("question_id", "turns"), _sorry_prompt, "category"),
)


def expected_columns() -> str:
    """Every layout's columns, for an error message a porter can act on."""
    return "; ".join(f"{lay.name}: {', '.join(lay.columns)}" for lay in LAYOUTS)


def detect(record: dict) -> Layout | None:
    """The benchmark layout a record's columns match, or None (this project's own files)."""
    return next((lay for lay in LAYOUTS if all(c in record for c in lay.columns)
                 and not any(c in record for c in lay.absent)), None)


def read_set(path: str | Path, role: str = "", n: int | None = None, seed: int = 0) -> list[dict]:
    """An evaluation set's rows {prompt, category, style, answers}, in a benchmark's layout (which adds the
    row's request and context) or this project's; n: a seeded subset, in file order."""
    records = read_records(path)
    first = records[0][1]
    layout = detect(first) if isinstance(first, dict) else None
    if layout is None and Path(path).suffix.lower() == ".csv":  # a benchmark's file, perhaps a new version
        field = next((f for f in PROMPT_FIELDS if f in first), None)
        names = ", ".join(lay.name for lay in LAYOUTS)
        print(f"{path}: its columns ({', '.join(first)}) match no benchmark layout ({names}); "
              + (f"read as plain prompts from its {field!r} column" if field else "no prompt column"))
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
        request, context = layout.prompt(rec), layout.context(rec)
        if not isinstance(request, str) or not request.strip():
            raise UserError(f"{path}:{line}: empty {layout.name} prompt")
        rows.append({"prompt": with_context(context, request).strip(),
                     "category": str(rec.get(layout.category, "") or ""), "style": "", "answers": [],
                     "request": request, "context": context})
    if not rows:
        raise UserError(f"{path}: no {layout.name} prompt is kept for the {role} set ({dropped} dropped)")
    print(f"{path}: {layout.name}'s layout, {len(rows)} prompts for the {role or 'evaluation'} set"
          + (f" ({dropped} not kept)" if dropped else ""))
    return rows


def shorten_context(tok, context: str, request: str, max_tokens: int, source: str) -> str:
    """with_context(context, request) in at most max_tokens tokens, the context cut at its end and the
    request whole; the request alone over the limit is an error (raise --max-prompt-tokens)."""
    def length(text):
        return len(tok(text, add_special_tokens=False).input_ids)
    whole = with_context(context, request).strip()
    if length(whole) <= max_tokens:
        return whole
    ids = tok(context.strip(), add_special_tokens=False).input_ids
    room = max_tokens - length(with_context("x", request).strip()) + 1  # the separator counts, "x" does not
    while room > 0:
        cut = tok.decode(ids[:room]).rstrip("\ufffd").strip()  # no half of a character cut in two
        text = with_context(cut, request).strip()
        over = length(text) - max_tokens
        if over <= 0:
            return text
        room -= over  # a cut context may tokenize a little longer than its ids
    raise UserError(f"{source}: a request with its separator takes {length(with_context('x', request))} "
                    f"tokens, more than --max-prompt-tokens {max_tokens}: raise it ({request[:60]!r}...)")


def fit_prompts(tok, rows: list[dict], max_tokens: int, source: str) -> dict:
    """Every row's prompt in at most max_tokens tokens, in place. A contextual prompt is shortened in its
    context, never in its request; any other prompt longer than the limit is cut at its end, with a warning
    (files.truncate_prompts). Returns how many were shortened of how many, and how many in their context:
    {"shortened": 18, "in_context": 18, "of": 240, "max_tokens": 512}: HarmBench's test file, smollm2-135m."""
    plain = [r for r in rows if not r.get("context", "").strip()]
    cut = truncate_prompts(tok, [r["prompt"] for r in plain], max_tokens, source)
    shortened = sum(r["prompt"] != p for r, p in zip(plain, cut))
    for r, p in zip(plain, cut):
        r["prompt"] = p
    in_context = 0
    for r in rows:
        if r.get("context", "").strip():
            p = shorten_context(tok, r["context"], r["request"], max_tokens, source)
            in_context += p != r["prompt"]
            r["prompt"] = p
    if in_context:
        print(f"warning: {in_context} of {len(rows)} prompts in {source} were longer than {max_tokens} "
              "tokens and their context was shortened, their request kept whole (--max-prompt-tokens)",
              file=sys.stderr)
    return {"shortened": shortened + in_context, "in_context": in_context, "of": len(rows),
            "max_tokens": max_tokens}
