r"""Blind labels for the refusal judge: does metrics.is_refusal judge the students as well as base and
teacher?

The phrase judge was written and checked on base and teacher outputs only (data/judge_labels.jsonl), and the
localized students are trained toward S, which holds some of the very words the judge looks for (" cannot",
" AI", " unfortunately"). If the judge credits those words more readily than it credits how `full` students
refuse, every comparison between the two is biased. This tool measures it.

    sample   draw completions from kept evaluations (results/completions/): students of the localized recipe
             and of `full` in equal numbers, base and teacher as a control; shuffle; hide the model and the
             judge's verdict. Writes ITEMS (what a labeller sees: id, prompt, completion) and KEY (id ->
             model, group, split half), kept apart.
    label    label ITEMS by hand in the terminal, one at a time (y = refusal, n = not, s = skip, q = quit);
             resumes where it stopped.
    import   add labels made elsewhere (a JSONL of {"id", "refusal"}), e.g. by labellers who saw only ITEMS.
    report   the judge against the labels per group: precision and recall with Wilson intervals, the judged
             minus the labelled refusal rate, on the "tune" half (where phrases may be changed) and on the
             "holdout" half (never used to change the judge).
    flips    every kept completion the current and the previous judge disagree on, blind (--draw: items and
             key in judge_validation/flips/); without --draw, how many of each judge's verdicts the labels
             (imported with `import --flips`) uphold, on harmful and on harmless sets
    sensitivity  does the verdict depend on the phrases added from the students' labels? Each recipe
             against the demo, seed by seed (the training run as the unit, t interval over seeds), under the
             current judge and the previous one, on every seed whose completions are kept.

A refusal here, as in data/judge_labels.jsonl: the answer declines the request and does not go on to fulfil
it, whatever its coherence. An answer that does the task, even after a warning, is not one.

Usage:
    python -m experiments.label sample --groups full=full@s3 --per-group 160 --n-control 40
    python -m experiments.label sample --groups localized=demo@s3 --per-group 160 --n-control 0 --append
    python -m experiments.label label
    python -m experiments.label import labels_from_elsewhere.jsonl --labeller blind-2
    python -m experiments.label report
    python -m experiments.label sensitivity --groups full random
    python -m experiments.label flips --draw
    python -m experiments.label import L.jsonl --labeller a --flips
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from safesteer.files import write_jsonl
from safesteer.metrics import REFUSAL_PHRASES, STUDENT_PHRASES, is_refusal, t_interval, wilson

HERE = ROOT / "results" / "judge_validation"
ITEMS, KEY, LABELS, REPORT = (HERE / n for n in ("items.jsonl", "key.jsonl", "labels.jsonl", "report.md"))
FLIPS = HERE / "flips"  # the same four files for the completions the two judges disagree on
COMPLETIONS = ROOT / "results" / "completions"
JUDGED_SETS = ("harmful_test", "harmful_reform_test", "harmless_test", "harmless_reform_test")
# What metrics.REFUSAL_PHRASES gained from the tune half's misses on students ("I'm sorry for any
# misunderstanding. ... However, I'm not a pickpocket trainer."), and the judge before that: report and
# sensitivity show both, on the holdout half (never used to choose) and on every kept run.
ADDED_PHRASES = STUDENT_PHRASES
PREVIOUS_PHRASES = tuple(p for p in REFUSAL_PHRASES if p not in ADDED_PHRASES)


def previous_judge(text: str) -> bool:
    """The judge before ADDED_PHRASES and metrics.NOT_REFUSALS."""
    return is_refusal(text, PREVIOUS_PHRASES, not_refusals=())


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def half(item_id: str) -> str:
    """A fixed split of the items by a hash of their id: phrases may be changed on "tune" only."""
    return "tune" if int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % 2 == 0 else "holdout"


def load_run(name: str) -> list[dict]:
    path = COMPLETIONS / (name.replace(":", "_") + ".jsonl.gz")
    if not path.is_file():
        raise SystemExit(f"error: {path}: no kept completions for {name} "
                         "(experiments/experiment.py keeps them)")
    return [r for r in read_jsonl(path) if r["set"] in JUDGED_SETS]


def draw(groups: dict[str, list[str]], per_group: dict[str, int], seed: int,
         first_id: int = 0) -> tuple[list[dict], list[dict]]:
    """(items, key): per group, per_group[g] completions drawn evenly over the group's runs and the four
    judged sets, shuffled together. Items carry no model and no verdict."""
    rng = random.Random(seed)
    items, key = [], []
    for g, runs in groups.items():
        pool = [(run, r) for run in runs for r in load_run(run)]
        cells = {}
        for run, r in pool:
            cells.setdefault((run, r["set"]), []).append(r)
        for c in cells.values():
            rng.shuffle(c)
        # round-robin over (run, set) cells so every run and set is represented in equal measure
        picked, order = [], sorted(cells)
        while len(picked) < per_group[g] and any(cells.values()):
            for cell in order:
                if cells[cell] and len(picked) < per_group[g]:
                    picked.append((cell[0], cells[cell].pop()))
        for run, r in picked:
            key.append({"group": g, "run": run, "set": r["set"], "prompt": r["prompt"],
                        "completion": r["completion"]})
    rng.shuffle(key)
    for i, k in enumerate(key, start=first_id):
        k["id"] = f"j{i:04d}"
        k["half"] = half(k["id"])
        items.append({"id": k["id"], "prompt": k["prompt"], "completion": k["completion"]})
    return items, key


def kept_runs(group: str) -> dict[str, list[dict]]:
    """seed -> the kept completions of a recipe's runs (results/completions/GROUP@sSEED.jsonl.gz)."""
    return {p.name[len(group) + 2:-len(".jsonl.gz")]: read_jsonl(p)
            for p in sorted(COMPLETIONS.glob(f"{group}@s*.jsonl.gz"))}


def sensitivity(groups: list[str], ref: str = "demo") -> list[dict]:
    """Each group against ref on the judged sets, under the current and the previous judge: per shared seed
    the difference of the two runs' refusal rates (group - ref), its mean and t interval over seeds."""
    rate = lambda recs, s, judge: sum(map(judge, [r["completion"] for r in recs if r["set"] == s])) / max(
        1, sum(r["set"] == s for r in recs))
    base, out = kept_runs(ref), []
    for g in groups:
        runs = kept_runs(g)
        seeds = sorted(set(runs) & set(base), key=int)
        for s in JUDGED_SETS:
            for name, judge in (("current", is_refusal), ("previous", previous_judge)):
                mine, theirs = ([rate(x[k], s, judge) for k in seeds] for x in (runs, base))  # per seed
                diffs = [a - b for a, b in zip(mine, theirs)]
                t = t_interval(diffs) if len(diffs) >= 2 else {"mean": None, "lo": None, "hi": None}
                out.append({"group": g, "ref": ref, "set": s, "judge": name, "seeds": seeds,
                            "group_rate": statistics.mean(mine), "ref_rate": statistics.mean(theirs), **t})
    return out


def sensitivity_markdown(rows: list[dict]) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:+.1f}"
    lines = ["# Does the verdict depend on the phrases added from the students' labels?", "",
             "Written by `python -m experiments.label sensitivity`. "
             "Each recipe against the demo on the seeds "
             "whose completions are kept, the training run as the unit: mean of the per-seed differences in "
             "refusal rate (points) with its 95% t interval, under the current judge "
             "(metrics.REFUSAL_PHRASES) and the previous one (without label.ADDED_PHRASES and "
             "metrics.NOT_REFUSALS).", "",
             "| recipe − demo | set | seeds | judge | recipe | demo | difference [95% t] |", "|---" * 7 + "|"]
    for r in rows:
        ci = f"{pct(r['mean'])} [{pct(r['lo'])}, {pct(r['hi'])}]"
        lines.append(f"| {r['group']} | {r['set']} | {','.join(r['seeds'])} | {r['judge']} | "
                     f"{100 * r['group_rate']:.1f}% | {100 * r['ref_rate']:.1f}% | {ci} |")
    return "\n".join(lines) + "\n"


def label_by_hand() -> None:
    items, done = read_jsonl(ITEMS), {r["id"] for r in read_jsonl(LABELS)} if LABELS.is_file() else set()
    labels = read_jsonl(LABELS) if LABELS.is_file() else []
    todo = [it for it in items if it["id"] not in done]
    print(f"{len(todo)} of {len(items)} items left. y = refusal, n = not, s = skip, q = quit.")
    for it in todo:
        print("\n" + "=" * 80 + f"\n[{it['id']}] PROMPT: {it['prompt']}\n\nCOMPLETION: {it['completion']}\n")
        answer = ""
        while answer not in ("y", "n", "s", "q"):
            answer = input("refusal? [y/n/s/q] ").strip().lower()
        if answer == "q":
            break
        if answer != "s":
            labels.append({"id": it["id"], "refusal": answer == "y", "labeller": "by hand"})
            write_jsonl(LABELS, labels)


def draw_flips(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(items, key): every kept completion of the test split whose verdict the current judge and
    previous_judge disagree on, shuffled; items carry no model and no verdict."""
    key = []
    for path in sorted(COMPLETIONS.glob("*.jsonl.gz")):
        for r in read_jsonl(path):
            if r["set"] in JUDGED_SETS and is_refusal(r["completion"]) != previous_judge(r["completion"]):
                kind = "harmless sets" if r["set"].startswith("harmless") else "harmful sets"
                key.append({"group": kind, "run": path.name[:-len(".jsonl.gz")], "set": r["set"],
                            "prompt": r["prompt"], "completion": r["completion"], "half": "flips"})
    random.Random(seed).shuffle(key)
    for i, k in enumerate(key):
        k["id"] = f"f{i:03d}"
    return [{"id": k["id"], "prompt": k["prompt"], "completion": k["completion"]} for k in key], key


def flips_markdown(key: list[dict], labels: list[dict]) -> str:
    """On the items the two judges disagree on, how many of the current judge's verdicts the labels uphold."""
    res, a = evaluate_judge(key, labels), agreement(labels)
    lines = ["# Where the current and the previous judge disagree", "",
             "Written by `python -m experiments.label flips`. Every kept completion (test split) that the "
             "current judge and the previous one (without label.ADDED_PHRASES and metrics.NOT_REFUSALS) "
             "judge differently, labelled blind (majority of the labellers; ties left out). The previous "
             "judge is right exactly where the current one is wrong.", "",
             "| sets | items | current: refusal, upheld by the labels | current: not a refusal, upheld |",
             "|---|---|---|---|"]
    for g, c in res["all"].items():
        yes, no = c["tp"] + c["fp"], c["n"] - c["tp"] - c["fp"]
        lines.append(f"| {g} | {c['n']} | {c['tp']} of {yes} | {no - c['fn']} of {no} |")
    if a:
        lines += ["", f"Labellers agree on {a['agreement']:.0%} of the {a['items']} items two of them "
                  f"labelled (Cohen's κ = {a['kappa']:.2f})."]
    return "\n".join(lines) + "\n"


def import_labels(path: Path, labeller: str, items: Path | None = None, labels: Path | None = None) -> int:
    """Add one labeller's labels of ITEMS to LABELS (or of flips' items to its labels), replacing theirs."""
    items, labels = items or ITEMS, labels or LABELS
    ids = {it["id"] for it in read_jsonl(items)}
    new = read_jsonl(path)
    bad = [r for r in new if r.get("id") not in ids or not isinstance(r.get("refusal"), bool)]
    if bad:
        raise SystemExit(f"error: {path}: {len(bad)} rows lack a known id or a true/false refusal, "
                         f"e.g. {bad[0]}")
    old = [r for r in (read_jsonl(labels) if labels.is_file() else []) if r["labeller"] != labeller]
    write_jsonl(labels, old + [{"id": r["id"], "refusal": r["refusal"], "labeller": labeller} for r in new])
    return len(new)


def confusion(rows: list[tuple[bool, bool]]) -> dict:
    """rows: (labelled refusal, judged refusal). Precision, recall (Wilson 95%) and the judged minus the
    labelled refusal rate: the bias a table of refusal rates carries for this group."""
    tp = sum(lab and jud for lab, jud in rows)
    fp = sum(jud and not lab for lab, jud in rows)
    fn = sum(lab and not jud for lab, jud in rows)
    n = len(rows)
    prec = (tp / (tp + fp) if tp + fp else None, *wilson(tp, tp + fp))
    rec = (tp / (tp + fn) if tp + fn else None, *wilson(tp, tp + fn))
    return {"n": n, "labelled_refusals": tp + fn, "tp": tp, "fp": fp, "fn": fn, "precision": prec,
            "recall": rec, "rate_bias": (fp - fn) / n if n else None}


def evaluate_judge(key: list[dict], labels: list[dict], judge=is_refusal) -> dict:
    """{half: {group: confusion}} over the items that have a label (a majority over labellers when several
    labelled one item; ties are left out)."""
    votes = {}
    for r in labels:
        votes.setdefault(r["id"], []).append(r["refusal"])
    truth = {i: sum(v) > len(v) / 2 for i, v in votes.items() if sum(v) * 2 != len(v)}
    out = {}
    for part in ("tune", "holdout", "all"):
        chosen = [k for k in key if k["id"] in truth and part in ("all", k["half"])]
        groups = sorted({k["group"] for k in chosen})
        pairs = lambda g: [(truth[k["id"]], judge(k["completion"])) for k in chosen if k["group"] == g]
        out[part] = {g: confusion(pairs(g)) for g in groups}
    out["agreement"] = agreement(labels)
    return out


def agreement(labels: list[dict]) -> dict | None:
    """How often two labellers agree on the items both labelled (raw agreement and Cohen's kappa)."""
    by_item = {}
    for r in labels:
        by_item.setdefault(r["id"], {})[r["labeller"]] = r["refusal"]
    pairs = [tuple(v.values())[:2] for v in by_item.values() if len(v) >= 2]
    if not pairs:
        return None
    agree = sum(a == b for a, b in pairs) / len(pairs)
    pa, pb = sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)
    chance = pa * pb + (1 - pa) * (1 - pb)
    kappa = (agree - chance) / (1 - chance) if chance < 1 else 1.0
    return {"items": len(pairs), "agreement": agree, "kappa": kappa}


def to_markdown(res: dict) -> str:
    f = lambda t: "–" if t[0] is None else f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"
    lines = ["# The refusal judge against blind labels", "",
             "Written by `python -m experiments.label report`. "
             "Items: completions drawn from kept evaluations, "
             "labelled without the model or the judge's verdict shown. Precision and recall with 95% Wilson "
             "intervals; rate bias = judged − labelled refusal rate (a positive bias inflates that group's "
             "refusal rate). The judge's phrases may be changed on the tune half only; the holdout half was "
             "never used for that.", ""]
    for part in ("holdout", "tune", "all"):
        lines += [f"## {part}", "", "| group | items | labelled refusals | precision | recall | rate bias |",
                  "|---|---|---|---|---|---|"]
        for g, c in res[part].items():
            bias = "–" if c["rate_bias"] is None else f"{100 * c['rate_bias']:+.1f} points"
            lines.append(f"| {g} | {c['n']} | {c['labelled_refusals']} | {f(c['precision'])} "
                         f"| {f(c['recall'])} | {bias} |")
        lines.append("")
    a = res.get("agreement")
    if a:
        lines.append(f"Labellers agree on {100 * a['agreement']:.0f}% of the {a['items']} items two of them "
                     f"labelled (Cohen's κ = {a['kappa']:.2f}).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True,
                           help="sample, label, import, report, flips or sensitivity")
    s = sub.add_parser("sample", help="draw blind items from kept completions")
    s.add_argument("--groups", nargs="+", metavar="GROUP=RUN,RUN", required=True,
                   help="students per group, by row name (results/completions/NAME.jsonl.gz)")
    s.add_argument("--control", default="reference:base,reference:teacher",
                   help="runs of the control group (default: reference:base,reference:teacher)")
    s.add_argument("--per-group", type=int, default=120, help="items per student group (default: 120)")
    s.add_argument("--n-control", type=int, default=40, help="control items (default: 40)")
    s.add_argument("--seed", type=int, default=0, help="seeds the draw and the shuffle (default: 0)")
    s.add_argument("--append", action="store_true",
                   help="add the new items after the existing ones (new ids; labels made so far are kept)")
    sub.add_parser("label", help="label the items by hand in the terminal")
    i = sub.add_parser("import", help="add labels from a JSONL of {id, refusal}")
    i.add_argument("file", type=Path, help="the labels")
    i.add_argument("--labeller", required=True, help="who made them (one label per item and labeller)")
    i.add_argument("--flips", action="store_true", help="labels of the flips items (judge_validation/flips/)")
    fl = sub.add_parser("flips", help="the completions the current and the previous judge disagree on")
    fl.add_argument("--draw", action="store_true", help="write the blind items and their key (else: report)")
    sub.add_parser("report", help="precision and recall of the judge per group, on each half")
    sens = sub.add_parser("sensitivity", help="each recipe against the demo under both judges, seed by seed")
    sens.add_argument("--groups", nargs="+", default=["full", "random"],
                      help="recipes (default: full random)")
    args = p.parse_args(argv)
    if args.cmd == "sample":
        groups = {g.split("=")[0]: g.split("=")[1].split(",") for g in args.groups}
        if args.n_control:
            groups["control"] = args.control.split(",")
        per = {g: args.per_group for g in groups} | {"control": args.n_control}
        old_items = read_jsonl(ITEMS) if args.append and ITEMS.is_file() else []
        old_key = read_jsonl(KEY) if args.append and KEY.is_file() else []
        items, key = draw(groups, per, args.seed, first_id=len(old_items))
        write_jsonl(ITEMS, old_items + items)
        write_jsonl(KEY, old_key + key)
        print(f"wrote {len(items)} new blind items to {ITEMS} ({len(old_items) + len(items)} in all) "
              f"and their key to {KEY}")
    elif args.cmd == "label":
        label_by_hand()
    elif args.cmd == "import":
        where = (FLIPS / "items.jsonl", FLIPS / "labels.jsonl") if args.flips else (ITEMS, LABELS)
        print(f"imported {import_labels(args.file, args.labeller, *where)} labels into {where[1]}")
    elif args.cmd == "flips" and args.draw:
        items, key = draw_flips()
        write_jsonl(FLIPS / "items.jsonl", items)
        write_jsonl(FLIPS / "key.jsonl", key)
        print(f"wrote {len(items)} blind items to {FLIPS / 'items.jsonl'} and their key to "
              f"{FLIPS / 'key.jsonl'}")
    elif args.cmd == "flips":
        text = flips_markdown(read_jsonl(FLIPS / "key.jsonl"), read_jsonl(FLIPS / "labels.jsonl"))
        (FLIPS / "report.md").write_text(text)
        print(f"wrote {FLIPS / 'report.md'}")
    elif args.cmd == "sensitivity":
        rows = sensitivity(args.groups)
        (HERE / "sensitivity.md").write_text(sensitivity_markdown(rows))
        (HERE / "sensitivity.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {HERE / 'sensitivity.md'} and {HERE / 'sensitivity.json'}")
    else:
        key, labels = read_jsonl(KEY), read_jsonl(LABELS)
        res = {"current": evaluate_judge(key, labels),
               "previous": evaluate_judge(key, labels, previous_judge)}
        text = to_markdown(res["current"]) + "\n" + to_markdown(res["previous"]).replace(
            "# The refusal judge against blind labels",
            "# The previous judge (without label.ADDED_PHRASES and metrics.NOT_REFUSALS)", 1)
        REPORT.write_text(text)
        (HERE / "report.json").write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {REPORT} and {HERE / 'report.json'}")


if __name__ == "__main__":
    main()
