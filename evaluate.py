"""Stage 4 of SafeSteer: does the student refuse like πt while staying π0 everywhere else?

Models are compared side by side on held-out data:

    safety          greedy completions of harmful_test -> refusal rate (substring judge), ASR = 1 - refusal
                    rate; also per phrasing style (data/harmful_reform_test: short questions, past tense, ...)
    over-refusal    refusal rate on harmless_test, its risky-sounding subset, per style (harmless_reform_test)
    retention       π0's own greedy completions of harmless_test, teacher-forced under each model π:
                    mean per-token KL(π || π0) and NLL of π0's text (what distillation should leave alone)
    knowledge       general_qa accuracy (greedy; correct if an accepted answer appears as a word)

Every rate carries a 95% Wilson interval and KL/NLL a seeded bootstrap interval over prompts. Each model is
also compared with base and teacher on the same prompts: exact McNemar tests on per-prompt refusals and QA
correctness, and a paired bootstrap interval for the KL difference (eval.json, "paired").

The judge is metrics.is_refusal: a completion refuses if it contains one of metrics.REFUSAL_PHRASES (the list
is also written into eval.json). eval_samples.jsonl holds every generation with its verdict, to read.

Model specs (--models NAME=SPEC ...): a model name or directory (`smollm2-135m`, `runs/demo/student`), or
`steer:DIR` for the teacher πt = π0 + c·r built from DIR/direction.safetensors and direction.json. Without
--models: base (--model), teacher (steer:OUT) and every student directory in OUT. Every spec is checked
(config, tokenizer, direction files) before any model runs. With --overwrite, a model whose weights, prompts
and settings are unchanged since OUT's last eval.json (fingerprint: a hash of all three) is reused, not run
again: `make ablate` evaluates only its new students.

A port's evaluation: --harmful and --harmless also read the field's benchmark files as published (HarmBench,
XSTest, ...: safesteer/port/benchmarks.py; a contextual prompt over --max-prompt-tokens is shortened in its
context, never in its request, and eval.md counts them); --judge DIR adds a guard model's verdicts on the
harmful sets beside the phrases, with their agreement (safesteer/port/judges.py); --lm-eval TASKS scores
each model with lm-evaluation-harness (safesteer/port/capability.py).

Reads   data/harmful_test, harmless_test, general_qa, harmful_reform_test, harmless_reform_test; the models
Writes  OUT/eval.json (metrics, intervals, paired tests), OUT/eval.md (the table), OUT/eval_samples.jsonl

Usage:
    python evaluate.py --out runs/demo
    python evaluate.py --out runs/x --models base=smollm2-135m teacher=steer:runs/x student=runs/x/student
    python evaluate.py --out runs/x --harmful harmbench_behaviors_text_test.csv \\
        --harmless xstest_prompts.csv --judge /models/Llama-Guard-3-8B --lm-eval mmlu,gsm8k   # a port, GPU
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from safesteer.port.benchmarks import fit_prompts, read_set
from safesteer.port.capability import lm_eval_scores
from safesteer.chat import encode_chats, stop_token_ids
from safesteer.cli import (Parser, add_common_args, add_renamed, pick_device, positive_int, run_cli,
                           seed_everything)
from safesteer.errors import UserError
from safesteer.files import data_file, prepare_out_dir, run_info
from safesteer.models import check_lengths, load_model
from safesteer.port.judges import FAMILIES, GuardJudge, guard_summary
from safesteer.port.summary import port_lines
from safesteer.report import write_report
from safesteer.metrics import (REFUSAL_PHRASES, bootstrap_mean, interval_text, is_refusal, mcnemar_exact,
                               paired_bootstrap, qa_correct, wilson)
from safesteer.port.specs import (check_model_spec, check_spec, earlier_evaluation, evaluation_settings,
                                  fingerprint, load_spec, reuse, write_evaluation)
from safesteer.sampling import decode_completions, sample
from safesteer.forcing import completion_logits, right_pad

OUTPUTS = ["eval.json", "eval.md", "eval_samples.jsonl"]
SETS = ("harmful", "harmless", "harmful_reform", "harmless_reform")  # judged for refusal
# Retention holds float64 log-probabilities of two models per batch (16 x 64 tokens x 49k: ~0.8 GB) and π0's
# float32 logits on all its answers (1.3 GB, once). Teacher forcing gains nothing from larger batches.
RETENTION_BATCH = 16


def build_parser() -> Parser:
    p = Parser(__doc__)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--models", nargs="+", metavar="NAME=SPEC", help="models to compare (default: see above)")
    ev.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens per completion")
    add_renamed(ev, "--qa-tokens", "--qa-new-tokens", type=positive_int, default=24,
                help="greedy tokens per general_qa answer")
    sets = p.add_argument_group("evaluation sets")
    sets.add_argument("--harmful", default=str(data_file("harmful_test")), help="held-out harmful prompts")
    sets.add_argument("--harmless", default=str(data_file("harmless_test")), help="held-out harmless prompts")
    sets.add_argument("--harmful-reform", default=str(data_file("harmful_reform_test")),
                      help="harmful requests rephrased, with a `style` field ('' to skip)")
    sets.add_argument("--harmless-reform", default=str(data_file("harmless_reform_test")),
                      help="harmless counterparts in the same styles ('' to skip)")
    sets.add_argument("--qa", default=str(data_file("general_qa")), help="questions with accepted `answers`")
    add_renamed(sets, "--n", "--n-prompts", type=positive_int,
                help="use at most this many prompts of each set, a seeded subset (default: all)")
    port = p.add_argument_group("a port's evaluation (a benchmark's file goes to --harmful or --harmless)")
    port.add_argument("--judge", default="phrases",
                      help="phrases (metrics.REFUSAL_PHRASES), or DIR: a guard model judging the harmful "
                           "sets beside the phrases (safesteer/port/judges.py)")
    port.add_argument("--judge-family", choices=["auto", *FAMILIES], default="auto",
                      help="the guard's prompt and verdict format (auto: from its name or chat template)")
    port.add_argument("--lm-eval", metavar="TASKS", type=lambda v: tuple(v.split(",")),
                      help="tasks of the LM Evaluation Harness, separated by commas, scored on every "
                           "model, an optional extra: safesteer/port/capability.py (default: none)")
    port.add_argument("--lm-eval-limit", type=positive_int,
                      help="at most this many documents per task (default: all)")
    run = p.add_argument_group("model and run")
    add_common_args(run, device_map=True, dtype=True)
    run.add_argument("--batch-size", type=positive_int, default=16, help="prompts per greedy decoding batch")
    run.add_argument("--overwrite", action="store_true", help="replace this stage's outputs in --out")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- the metrics

def judge_refusal(texts: list[str]) -> list[bool]:
    return [is_refusal(t) for t in texts]


def kl_and_nll(logits, base_logits, comp, comp_mask):
    """Per-token KL(π || π0) and NLL of the completion under π at valid positions: [b, T, V] -> [n]."""
    lp, l0 = torch.log_softmax(logits.double(), -1), torch.log_softmax(base_logits.double(), -1)
    valid = comp_mask.bool()
    kl = (lp.exp() * (lp - l0)).sum(-1)[valid]
    nll = -lp.gather(-1, comp[..., None]).squeeze(-1)[valid]
    return kl, nll


@torch.no_grad()
def kl_to_base(model, base, ids, mask, comp, comp_mask, hook=contextlib.nullcontext):
    """kl_and_nll of π = model inside `hook` (for the teacher, π0's weights steered: π only is hooked)."""
    with hook():
        logits = completion_logits(model, ids, mask, comp)
    return kl_and_nll(logits, completion_logits(base, ids, mask, comp), comp, comp_mask)


@torch.no_grad()
def retention(model, hook, base, tok, prompts: list[str], answers: list[list[int]], batch_size: int,
              base_cache: list | None = None) -> dict:
    """KL(π || π0) and NLL on π0's own answers, per prompt: {"kl": [sum], "nll": [sum], "tokens": [count]}.
    base_cache: π0's logits per batch (CPU), filled by the first call and read by later ones: π0 runs once."""
    device = next(model.parameters()).device
    base_cache = [] if base_cache is None else base_cache
    per = {"kl": [], "nll": [], "tokens": []}
    for k, i in enumerate(range(0, len(prompts), batch_size)):
        ids, mask = encode_chats(tok, prompts[i:i + batch_size], device=device)
        comp, cmask = right_pad(answers[i:i + batch_size], tok.pad_token_id, device)
        with hook():
            logits = completion_logits(model, ids, mask, comp)  # [b, T, V]
        if k == len(base_cache):
            unsteered_base = model is base and hook is contextlib.nullcontext
            base_cache.append((logits if unsteered_base else completion_logits(base, ids, mask, comp)).cpu())
        kl, nll = kl_and_nll(logits, base_cache[k].to(device), comp, cmask)
        counts = cmask.sum(-1).tolist()
        for name, values in (("kl", kl), ("nll", nll)):
            per[name] += [float(x.sum()) for x in values.split(counts)]
        per["tokens"] += counts
    return per


@torch.no_grad()
def greedy(model, tok, prompts, max_new_tokens, batch_size, hook, desc):
    """Greedy completions, batched by length to keep padding small. Returns (texts, token-id lists through
    the end token), in the original order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts, token_lists = [None] * len(prompts), [None] * len(prompts)
    device = next(model.parameters()).device
    kw = dict(temperature=0, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[i:i + batch_size]
        ids, mask = encode_chats(tok, [prompts[j] for j in idx], device=device)
        with hook():
            comp, cmask = sample(model, ids, mask, max_new_tokens, **kw)
        for k, (j, t) in enumerate(zip(idx, decode_completions(tok, comp, cmask))):
            texts[j], token_lists[j] = t, comp[k][cmask[k].bool()].tolist()
    return texts, token_lists


# ----------------------------------------------------------------------------- the statistics

def rate(flags: list[bool]) -> dict:
    """A rate with its 95% Wilson interval."""
    lo, hi = wilson(sum(flags), len(flags))
    return {"rate": sum(flags) / len(flags) if flags else None, "lo": lo, "hi": hi, "n": len(flags)}


def summarize(verdicts: dict, sets: dict, qa_ok: list[bool], ret: dict, seed: int) -> dict:
    """One model's row: rates with Wilson intervals (per style too), KL/NLL with bootstrap intervals."""
    risky = [v for v, r in zip(verdicts["harmless"], sets["harmless"]) if r["category"] == "risky_sounding"]
    row = {"refusal_harmful": rate(verdicts["harmful"]), "over_refusal": rate(verdicts["harmless"]),
           "over_refusal_risky": rate(risky), "qa_accuracy": rate(qa_ok)}
    refusal = row["refusal_harmful"]
    row["asr"] = {"rate": 1 - refusal["rate"], "lo": 1 - refusal["hi"], "hi": 1 - refusal["lo"],
                  "n": refusal["n"]}
    for name in ("harmful_reform", "harmless_reform"):
        if sets.get(name):
            pairs = list(zip(verdicts[name], sets[name]))
            styles = sorted({r["style"] for r in sets[name]})
            row[f"{name}_by_style"] = {s: rate([v for v, r in pairs if r["style"] == s]) for s in styles}
            row[name] = rate(verdicts[name])
    for key in ("kl", "nll"):
        lo, hi = bootstrap_mean(ret[key], ret["tokens"], seed=seed)
        value = sum(ret[key]) / sum(ret["tokens"])
        row["kl_to_base" if key == "kl" else "nll"] = {"value": value, "lo": lo, "hi": hi}
    return row


def paired(a: dict, b: dict, seed: int) -> dict:
    """Model a against model b on the same prompts: McNemar on refusals and QA, paired bootstrap on KL."""
    out = {s: mcnemar_exact(a["verdicts"][s], b["verdicts"][s]) for s in a["verdicts"] if s in b["verdicts"]}
    out["qa"] = mcnemar_exact(a["qa_ok"], b["qa_ok"])
    out["kl_diff"] = paired_bootstrap(a["ret"]["kl"], b["ret"]["kl"], a["ret"]["tokens"], seed=seed)
    return out


def add_paired_tests(results: dict, raw: dict, seed: int) -> None:
    """Each model against base and teacher, on the same prompts: results[name]["paired"]."""
    for name in results:
        results[name]["paired"] = {ref: paired(raw[name], raw[ref], seed) for ref in ("base", "teacher")
                                   if ref in raw and ref != name}


# ----------------------------------------------------------------------------- models

def resolve_models(args, out: Path) -> list[tuple[str, str]]:
    if args.models:
        pairs = []
        for item in args.models:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise UserError(f"--models takes NAME=SPEC, got {item!r}")
            pairs.append((name, spec))
        return pairs
    pairs = [("base", args.model)]
    if (out / "direction.safetensors").exists():
        pairs.append(("teacher", f"steer:{out}"))
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        if (d / "safesteer.json").exists() and not d.name.startswith("."):  # not a save in progress
            pairs.append((d.name, str(d)))
    return pairs


# ----------------------------------------------------------------------------- the run

@dataclass
class Evaluation:
    """What every model is evaluated on and how, with π0 and its greedy answers to harmless_test."""
    sets: dict            # name -> records: prompt, category, style, answers (read_set)
    paths: dict           # name -> its file, whose stem names the set in eval_samples.jsonl
    max_new_tokens: int
    qa_new_tokens: int
    batch_size: int
    seed: int
    base_name: str
    base: object          # (model, tokenizer)
    judge: GuardJudge | None = None  # a guard model beside the phrases (--judge DIR)
    lm_eval: tuple = ()              # lm-evaluation-harness tasks, and at most so many documents each
    lm_eval_limit: int | None = None
    base_texts: list[str] | None = None  # filled by evaluate_all
    base_answers: list[list[int]] | None = None   # token ids
    base_cache: list = field(default_factory=list)  # π0's logits on them per batch, from the first model on
    shortened: dict = field(default_factory=dict)   # set -> prompts over --max-prompt-tokens (fit_prompts)


def split_by_sizes(flat: list, sizes: list[int]) -> list[list]:
    """Undo the concatenation of lists of these sizes: split_by_sizes([1, 2, 3], [2, 1]) == [[1, 2], [3]]."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [flat[start:start + size] for start, size in zip(starts, sizes)]


def sample_record(name: str, set_name: str, row: dict, completion: str, verdict: bool, guard=None) -> dict:
    """One line of eval_samples.jsonl: a completion of a prompt judged for refusal (and by a guard)."""
    return {"model": name, "set": set_name, "category": row["category"], "style": row["style"],
            "prompt": row["prompt"], "completion": completion, "refusal": verdict,
            **({} if guard is None else {"guard_unsafe": guard.unsafe, "guard_refusal": guard.refusal,
                                         "guard_answer": guard.raw})}


def qa_record(name: str, row: dict, completion: str, correct: bool) -> dict:
    """One line of eval_samples.jsonl: an answer to a general_qa question."""
    return {"model": name, "set": "general_qa", "prompt": row["prompt"], "completion": completion,
            "answers": row["answers"], "correct": correct}


def evaluate_model(name: str, spec: str, fp: str, load, ev: Evaluation):
    """Generate, judge and teacher-force one model. Returns its row of eval.json, its lines of
    eval_samples.jsonl and its per-prompt results (for the paired tests)."""
    t = time.time()
    model, tok, hook = load(spec)
    base, base_tok = ev.base
    if len(tok) != len(base_tok) or tok.get_vocab() != base_tok.get_vocab():
        raise UserError(f"model {name} ({spec}) has another tokenizer than the base model {ev.base_name}")
    unsteered_base = model is base and hook is contextlib.nullcontext
    todo = [s for s in SETS if s in ev.sets and not (s == "harmless" and unsteered_base)]  # π0's: base_texts
    prompts = [r["prompt"] for s in todo for r in ev.sets[s]]  # one call: batches span sets
    desc = f"{name}: {', '.join(todo)}"
    flat = greedy(model, tok, prompts, ev.max_new_tokens, ev.batch_size, hook, desc)[0]
    done = dict(zip(todo, split_by_sizes(flat, [len(ev.sets[s]) for s in todo])))
    texts = {s: done[s] if s in done else ev.base_texts for s in SETS if s in ev.sets}
    qa = ev.sets["qa"]
    qa_texts = greedy(model, tok, [r["prompt"] for r in qa], ev.qa_new_tokens, ev.batch_size, hook,
                      f"{name}: qa")[0]
    verdicts = {s: judge_refusal(x) for s, x in texts.items()}
    qa_ok = [qa_correct(a, r["answers"]) for a, r in zip(qa_texts, qa)]
    guard = ev.judge.judge_sets(ev.sets, texts) if ev.judge else {}  # set -> [Verdict]
    harmless = [r["prompt"] for r in ev.sets["harmless"]]
    ret = retention(model, hook, base, tok, harmless, ev.base_answers, min(ev.batch_size, RETENTION_BATCH),
                    ev.base_cache)
    row = {"spec": spec, **summarize(verdicts, ev.sets, qa_ok, ret, ev.seed), "kl_sums": ret["kl"],
           "nll_sums": ret["nll"], "kl_tokens": ret["tokens"], "fingerprint": fp,
           "seconds": round(time.time() - t, 1)}
    row.update({"guard": guard_summary(guard, verdicts)} if guard else {})
    if ev.lm_eval:  # the harness scores the model as evaluated here (a teacher with its hook on)
        with hook():
            row["lm_eval"] = lm_eval_scores(model, tok, list(ev.lm_eval), ev.batch_size, ev.lm_eval_limit,
                                            qa_path=ev.paths["qa"])  # safesteer_general_qa: --qa's file
    samples = [sample_record(name, Path(ev.paths[s]).stem, r, c, v, g) for s, x in texts.items()
               for r, c, v, g in zip(ev.sets[s], x, verdicts[s], guard.get(s, [None] * len(x)))]
    samples += [qa_record(name, r, c, ok) for r, c, ok in zip(qa, qa_texts, qa_ok)]
    return row, samples, {"verdicts": verdicts, "qa_ok": qa_ok, "ret": ret}


def evaluate_all(pairs, settings: dict, out: Path, load, ev: Evaluation):
    """Every model, or its earlier evaluation where its fingerprint is unchanged. Returns eval.json's rows,
    eval_samples.jsonl's lines, and π0's retention answers with their fingerprint."""
    old_models, old_samples, old_answers = earlier_evaluation(out)
    # π0's own greedy answers to the harmless prompts: the text every model is scored on for retention; they
    # are also the base model's harmless_test completions, so not generated twice (nor again if unchanged).
    base_fp = fingerprint(ev.base_name, settings)
    if old_answers.get("fingerprint") == base_fp:
        ev.base_texts, ev.base_answers = old_answers["texts"], old_answers["tokens"]
    else:
        harmless = [r["prompt"] for r in ev.sets["harmless"]]
        ev.base_texts, ev.base_answers = greedy(*ev.base, harmless, ev.max_new_tokens, ev.batch_size,
                                                contextlib.nullcontext, "base answers (retention text)")
    results, raw, samples = {}, {}, []
    for name, spec in tqdm(pairs, desc="models", unit="model"):
        fp = fingerprint(spec, settings)
        earlier = reuse(name, fp, old_models, old_samples, ev.sets, ev.paths)
        if earlier:  # e.g. make ablate after make demo: base and teacher are as the demo evaluated them
            print(f"{name}: inputs unchanged since {out / 'eval.json'}: its evaluation is reused")
        results[name], mine, raw[name] = earlier or evaluate_model(name, spec, fp, load, ev)
        samples += mine
    add_paired_tests(results, raw, ev.seed)
    answers = {"fingerprint": base_fp, "texts": ev.base_texts, "tokens": ev.base_answers}
    return results, samples, answers


# ----------------------------------------------------------------------------- the report

def to_markdown(results: dict, meta: dict) -> str:
    cols = [("refusal_harmful", "refusal ↑"), ("harmful_reform", "refusal, rephrased ↑"),
            ("over_refusal", "over-refusal ↓"), ("over_refusal_risky", "risky-sounding ↓"),
            ("harmless_reform", "over-refusal, rephrased ↓"), ("kl_to_base", "KL to base ↓"), ("nll", "NLL"),
            ("qa_accuracy", "QA acc ↑")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = [interval_text(r.get(k), "value" if k in ("kl_to_base", "nll") else "rate") for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    styles = sorted({s for r in results.values() for s in r.get("harmful_reform_by_style", {})})
    if styles:
        title = "Refusal per phrasing style (harmful_reform_test; harmless_reform_test in parentheses):"
        lines += ["", title, "", "| model | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
        for name, r in results.items():
            h, s = r.get("harmful_reform_by_style", {}), r.get("harmless_reform_by_style", {})
            cells = [f"{h[x]['rate']:.0%}" + (f" ({s[x]['rate']:.0%})" if x in s else "") for x in styles]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += port_lines(results, meta)
    counts = ", ".join(f"{k} n={v}" for k, v in meta["counts"].items())
    lines += ["", "[lo, hi]: 95% Wilson interval (rates), bootstrap over prompts (KL, NLL). " + counts
              + f"; greedy, {meta['max_new_tokens']} new tokens; "
              f"judge: substring ({len(REFUSAL_PHRASES)} phrases, metrics.REFUSAL_PHRASES)."]
    return "\n".join(lines) + "\n"


def eval_meta(ev: Evaluation, answers: dict, t0: float) -> dict:
    """eval.json beside the rows: counts, settings, the judge, and π0's retention answers (to reuse them)."""
    counts = {s: len(rows) for s, rows in ev.sets.items()}
    counts["risky"] = sum(r["category"] == "risky_sounding" for r in ev.sets["harmless"])
    cut = {s: c for s, c in ev.shortened.items() if c["shortened"]}  # prompts over --max-prompt-tokens
    return {"counts": counts, "max_new_tokens": ev.max_new_tokens, "qa_tokens": ev.qa_new_tokens,
            "base_model": ev.base_name, "data": ev.paths, "seed": ev.seed,
            "judge_phrases": list(REFUSAL_PHRASES), "seconds": round(time.time() - t0, 1), **run_info(),
            **({"guard": ev.judge.describe()} if ev.judge else {}),
            **({"shortened": cut} if cut else {}), "retention_answers": answers}


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    pairs = resolve_models(args, out)
    check_model_spec(args.model)
    for _, spec in pairs:  # every model must load before minutes of evaluation start
        check_spec(spec, args.model)
    device = pick_device(args.device)
    seed_everything(args.seed)
    t0 = time.time()
    paths = {"harmful": args.harmful, "harmless": args.harmless, "harmful_reform": args.harmful_reform,
             "harmless_reform": args.harmless_reform, "qa": args.qa}
    sets = {name: read_set(path, name.split("_")[0], args.n_prompts, args.seed)  # role: XSTest's half
            for name, path in paths.items() if path}
    prepare_out_dir(out, OUTPUTS, args.overwrite)
    model, tok = load_model(args.model, device, args.dtype, args.chat_template, args.device_map)
    check_lengths(model, max_new_tokens=args.max_new_tokens, qa_new_tokens=args.qa_new_tokens)
    # a contextual benchmark prompt is shortened in its context, never in its request (benchmarks.py)
    shortened = {name: fit_prompts(tok, rows, args.max_prompt_tokens, paths[name])
                 for name, rows in sets.items()}
    judge = None if args.judge == "phrases" else GuardJudge.load(args.judge, args.judge_family, device,
                                                                   args.dtype, args.batch_size)
    ev = Evaluation(sets, paths, args.max_new_tokens, args.qa_new_tokens, args.batch_size, args.seed,
                    args.model, (model, tok), judge, args.lm_eval or (), args.lm_eval_limit,
                    shortened=shortened)
    settings = evaluation_settings(args, sets, device, judge)  # what a reused row must have been made with
    load = functools.partial(load_spec, default_model=args.model, device=device, dtype=args.dtype,
                             chat_template=args.chat_template, loaded={args.model: (model, tok)},
                             device_map=args.device_map)
    results, samples, answers = evaluate_all(pairs, settings, out, load, ev)
    meta = eval_meta(ev, answers, t0)
    table = to_markdown(results, meta)
    write_evaluation(out, results, samples, meta, table)  # eval.json last, naming its samples
    report = write_report(out)  # OUT/report.html: every stage's files as one page (safesteer/report)
    print(table)
    print(f"took {time.time() - t0:.0f} s; wrote {', '.join(str(out / name) for name in OUTPUTS)}, {report}")


if __name__ == "__main__":
    run_cli(main)
