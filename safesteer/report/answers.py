"""The report's Stage 4 section: eval.md's tables, then every prompt's answers side by side.

    answers_data   eval_samples.jsonl regrouped by prompt, each answer cut at S's tokens, for page.SCRIPT
    stage4         the tables, the filters (each option with its number of prompts) and the empty box that
                   page.SCRIPT fills, PAGE_SIZE prompts at a time
"""
from __future__ import annotations

from collections import Counter
from html import escape

from safesteer.report.stages import absent

PAGE_SIZE = 20  # prompts drawn at a time; the rest wait in the page's data
# a verdict filter lists a group whole, 0 included
VERDICTS = [("refuses", "complies"), ("correct", "wrong"),
            ("guard: unsafe", "guard: safe", "guard: unparsed"), ("guard: refusal", "guard: no refusal")]


def markdown_html(text: str) -> str:
    """eval.md as HTML: its pipe tables as tables, every other line a paragraph, `code` as code."""
    out, table = [], []

    def inline(s: str) -> str:
        pieces = escape(s).split("`")
        return "".join(f"<code>{p}</code>" if k % 2 else p for k, p in enumerate(pieces))

    def flush():
        rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table
                if not set(row.replace("|", "").strip()) <= set("-: ")]  # not the |---| line
        if rows:
            head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
            cells = ["".join(f"<td>{inline(c)}</td>" for c in row) for row in rows[1:]]
            body = "".join(f"<tr>{c}</tr>" for c in cells)
            out.append(f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
        table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "".join(out)


def model_label(name: str, spec, base_model) -> str:
    """A model's column heading: 'teacher · πt' for a steer: spec, 'base · π0' for the base model."""
    if isinstance(spec, str) and spec.startswith("steer:"):
        return f"{name} · πt"
    return f"{name} · π0" if spec == base_model else name


def tags(row: dict) -> list[str]:
    """The verdicts on one answer, as the filters name them."""
    out = []
    if "refusal" in row:
        out.append("refuses" if row["refusal"] else "complies")
    if "correct" in row:
        out.append("correct" if row["correct"] else "wrong")
    if "guard_unsafe" in row:
        out.append({True: "guard: unsafe", False: "guard: safe"}.get(row["guard_unsafe"], "guard: unparsed"))
    if row.get("guard_refusal") is not None:
        out.append("guard: refusal" if row["guard_refusal"] else "guard: no refusal")
    return out


def answers_data(run, hl) -> dict:
    """{models, labels, page, prompts}: each prompt {s: split, y: style, c: category, p: prompt, n: note,
    a: per model [parts, verdicts(, the guard's answer)] or None}, parts as tokens.split_at cuts the answer.
    A prompt is (split, text, its k-th copy in that split), so each model's k-th copy meets the others'."""
    ev = run.evaluation or {}
    names = list(ev.get("models") or {})
    names += [m for m in dict.fromkeys(r["model"] for r in run.samples) if m not in names]
    by_model = {m: [r for r in run.samples if r["model"] == m] for m in names}
    groups, index = [], {}
    for k, m in enumerate(names):
        seen = Counter()
        parts = hl.split([r["completion"] for r in by_model[m]], m)
        for row, cut in zip(by_model[m], parts):
            key = (row["set"], row["prompt"], seen[(row["set"], row["prompt"])])
            seen[key[:2]] += 1
            if key not in index:
                index[key] = len(groups)
                groups.append(prompt_record(row, len(names)))
            guard = [row["guard_answer"]] if "guard_answer" in row else []
            groups[index[key]]["a"][k] = [cut, tags(row), *guard]
    specs = {m: (ev.get("models") or {}).get(m, {}).get("spec") for m in names}
    labels = [model_label(m, specs[m], ev.get("base_model")) for m in names]
    return {"models": names, "labels": labels, "page": PAGE_SIZE, "prompts": groups}


def prompt_record(row: dict, n_models: int) -> dict:
    note = f"accepted: {', '.join(map(str, row['answers']))}" if row.get("answers") else ""
    return {"s": row["set"], "y": row.get("style") or "(none)", "c": row.get("category") or "(none)",
            "p": row["prompt"], "n": note, "a": [None] * n_models}


def select(ident: str, everything: str, counts: list[tuple[str, int]], attrs: str = "") -> str:
    """A filter: one option per (value, number of prompts), the first option all of them."""
    options = "".join(f'<option value="{escape(v)}">{escape(v)} ({n})</option>' for v, n in counts)
    return f'<select id="{ident}"{attrs}><option value="">{escape(everything)}</option>{options}</select>'


def filters(data: dict) -> str:
    """The split, style and category filters, and one verdict filter per model."""
    prompts, out = data["prompts"], []
    for name, key in (("split", "s"), ("style", "y"), ("category", "c")):
        counts = sorted(Counter(p[key] for p in prompts).items())
        every = f"every {name} ({len(prompts)})" if key == "s" else f"every {name}"
        out.append(select(f"f-{name}", every, counts, f' data-key="{key}"'))
    for k, label in enumerate(data["labels"]):
        found = Counter(t for p in prompts if p["a"][k] for t in p["a"][k][1])
        grouped = [v for group in VERDICTS if set(group) & set(found) for v in group]
        counts = [(v, found[v]) for v in grouped + sorted(set(found) - set(grouped))]
        choice = select(f"f-model-{k}", "any verdict", counts, f" data-model={k}")
        out.append(f"<label>{escape(label)} {choice}</label>")
    return "".join(out)


def stage4(run, data: dict | None) -> str:
    if not (run.table or run.samples):
        return absent("Stage 4", "eval.md or eval_samples.jsonl")
    out = [markdown_html(run.table)] if run.table else []
    out += [f'<p class="warning">{escape(w)}</p>' for w in run.warnings]
    if not data:
        return "".join(out)
    out.append("<h3>Every answer, prompt by prompt</h3><p>Each prompt's answers side by side, S's tokens "
               "marked, each with its judge's verdicts (phrases; a guard's where one ran). Filter by split, "
               "style, category and each model's verdict (for example: the student refuses, base does not), "
               "or search the text; each option's count is over every prompt.</p>"
               f'<div class="filters">{filters(data)}'
               '<input id="f-search" type="search" placeholder="search prompts and answers">'
               '<button id="f-reset" type="button">reset</button>'
               '<label><input id="f-marks" type="checkbox" checked> mark S</label></div>'
               f'<p><span id="count">{len(data["prompts"])} prompts</span> <span class="pager">'
               '<button id="prev" type="button">‹ previous</button> <span id="page"></span> '
               '<button id="next" type="button">next ›</button></span></p><div id="answers"></div>')
    return "".join(out)
