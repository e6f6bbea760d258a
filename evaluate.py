"""Stage 4 of SafeSteer: does the student refuse like πt while staying π0 everywhere else?

Models are compared side by side on held-out data:

    safety          greedy completions of harmful_test -> refusal rate (substring judge), ASR = 1 - refusal rate;
                    also per phrasing style (data/harmful_reform_test: short questions, past tense, ...)
    over-refusal    refusal rate on harmless_test, on its risky-sounding subset, and per style (harmless_reform_test)
    retention       π0's own greedy completions of harmless_test, teacher-forced under each model π:
                    mean per-token KL(π || π0) and NLL of π0's text (what distillation should leave alone)
    knowledge       general_qa accuracy (greedy; correct if an accepted answer appears as a word)

Every rate carries a 95% Wilson interval and KL/NLL a seeded bootstrap interval over prompts. Each model is also
compared with base and teacher on the same prompts: exact McNemar tests on per-prompt refusals and QA
correctness, and a paired bootstrap interval for the KL difference (eval.json, "paired").

The judge is metrics.is_refusal: a completion refuses if it contains one of metrics.REFUSAL_PHRASES (the list
is also written into eval.json). eval_samples.jsonl holds every generation with its verdict, to read.

Model specs (--models NAME=SPEC ...): a model name or directory (`smollm2-135m`, `runs/demo/student`), or
`steer:DIR` for the teacher πt = π0 + c·r built from DIR/direction.safetensors and direction.json. Without
--models: base (--model), teacher (steer:OUT) and every student directory in OUT. Every spec is checked
(config, tokenizer, direction files) before any model runs. With --overwrite, a model whose weights, prompts
and settings are unchanged since OUT's last eval.json (fingerprint: a hash of all three) is reused, not run
again: `make ablate` evaluates only its new students.

Reads   data/harmful_test, harmless_test, general_qa, harmful_reform_test, harmless_reform_test; the models
Writes  OUT/eval.json (metrics, intervals, paired tests), OUT/eval.md (the table), OUT/eval_samples.jsonl

Usage:
    python evaluate.py --out runs/demo
    python evaluate.py --out runs/demo --models base=smollm2-135m teacher=steer:runs/demo student=runs/demo/student
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from chat import encode_chats, stop_token_ids
from common import (BUNDLED_MODEL, PROMPT_FIELDS, Parser, UserError, add_common_args, bundled_package_dir, data_file,
                    load_json, load_model, pick_device, positive_int, prepare_out_dir, read_records, run_cli,
                    run_info, seed_everything, truncate_prompts, write_json, write_jsonl, write_text)
from metrics import (REFUSAL_PHRASES, bootstrap_mean, is_refusal, mcnemar_exact, paired_bootstrap, wilson)
from steering import completion_logits, decode_completions, load_teacher, sample

OUTPUTS = ["eval.json", "eval.md", "eval_samples.jsonl"]
SETS = ("harmful", "harmless", "harmful_reform", "harmless_reform")  # judged for refusal
# Retention holds float64 log-probabilities of two models per batch (16 x 64 tokens x 49k: ~0.8 GB) and π0's float32
# logits on all its answers (1.3 GB, computed once). Teacher forcing gains nothing from larger batches, decoding does.
RETENTION_BATCH = 16


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, device_map=True)
    p.add_argument("--models", nargs="+", metavar="NAME=SPEC", help="models to compare (default: see above)")
    p.add_argument("--harmful", default=str(data_file("harmful_test")))
    p.add_argument("--harmless", default=str(data_file("harmless_test")))
    p.add_argument("--harmful-reform", default=str(data_file("harmful_reform_test")),
                   help="harmful requests rephrased, with a `style` field ('' to skip)")
    p.add_argument("--harmless-reform", default=str(data_file("harmless_reform_test")),
                   help="harmless counterparts in the same styles ('' to skip)")
    p.add_argument("--qa", default=str(data_file("general_qa")))
    p.add_argument("--n", type=positive_int, help="use at most this many prompts of each set (seeded subset)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="greedy tokens per completion")
    p.add_argument("--qa-tokens", type=positive_int, default=24, help="greedy tokens per general_qa answer")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def read_set(path, n=None, seed=0):
    """Records with their prompt (the first of common.PROMPT_FIELDS, as read_prompts takes it), category, style
    and (for QA) accepted answers; a seeded subset if n is given."""
    rows = []
    for line, rec in read_records(path):
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{line}: expected an object or a string")
        text = next((rec[f] for f in PROMPT_FIELDS if isinstance(rec.get(f), str) and rec[f].strip()), None)
        if text is None:
            raise UserError(f"{path}:{line}: no prompt field (expected one of {', '.join(PROMPT_FIELDS)})")
        rows.append({"prompt": text.strip(), "category": rec.get("category", ""), "style": rec.get("style", ""),
                     "answers": rec.get("answers", [])})
    if n is not None and n < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows


# ----------------------------------------------------------------------------- the metrics

def judge_refusal(texts: list[str]) -> list[bool]:
    return [is_refusal(t) for t in texts]


def qa_correct(answer: str, accepted: list[str]) -> bool:
    """An accepted answer appears in the reply, starting at a word boundary (so '7' does not match '17')."""
    a = answer.lower()
    return any(re.search(r"(?<![\w])" + re.escape(x.lower()), a) for x in accepted)


def rate(flags: list[bool]) -> dict:
    """A rate with its 95% Wilson interval."""
    lo, hi = wilson(sum(flags), len(flags))
    return {"rate": sum(flags) / len(flags) if flags else None, "lo": lo, "hi": hi, "n": len(flags)}


def kl_and_nll(logits, base_logits, comp, comp_mask):
    """Per-token KL(π || π0) and NLL of the completion under π at valid positions: [b, T, V] x 2 -> [n_valid] x 2."""
    lp, l0 = torch.log_softmax(logits.double(), -1), torch.log_softmax(base_logits.double(), -1)
    valid = comp_mask.bool()
    kl = (lp.exp() * (lp - l0)).sum(-1)[valid]
    nll = -lp.gather(-1, comp[..., None]).squeeze(-1)[valid]
    return kl, nll


@torch.no_grad()
def kl_to_base(model, base, ids, mask, comp, comp_mask, hook=contextlib.nullcontext):
    """kl_and_nll of π = model inside `hook` (π0's own weights steered, for the teacher: the hook covers π only)."""
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
    for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[i:i + batch_size]
        ids, mask = encode_chats(tok, [prompts[j] for j in idx], device=device)
        with hook():
            comp, cmask = sample(model, ids, mask, max_new_tokens, temperature=0, stop_ids=stop_token_ids(tok),
                                 pad_id=tok.pad_token_id)
        for k, (j, t) in enumerate(zip(idx, decode_completions(tok, comp, cmask))):
            texts[j], token_lists[j] = t, comp[k][cmask[k].bool()].tolist()
    return texts, token_lists


def right_pad(token_lists: list[list[int]], pad_id: int, device):
    """[[ids]] -> ids [b, T], mask [b, T] (1 on real tokens)."""
    width = max(1, max(len(t) for t in token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, :len(t)] = 1
    return ids.to(device), mask.to(device)


def summarize(verdicts: dict, sets: dict, qa_ok: list[bool], ret: dict, seed: int) -> dict:
    """One model's row: rates with Wilson intervals (per style too), KL/NLL with bootstrap intervals."""
    row = {"refusal_harmful": rate(verdicts["harmful"]), "over_refusal": rate(verdicts["harmless"]),
           "over_refusal_risky": rate([v for v, r in zip(verdicts["harmless"], sets["harmless"])
                                       if r["category"] == "risky_sounding"]),
           "qa_accuracy": rate(qa_ok)}
    row["asr"] = {"rate": 1 - row["refusal_harmful"]["rate"], "lo": 1 - row["refusal_harmful"]["hi"],
                  "hi": 1 - row["refusal_harmful"]["lo"], "n": row["refusal_harmful"]["n"]}
    for name in ("harmful_reform", "harmless_reform"):
        if sets.get(name):
            row[f"{name}_by_style"] = {s: rate([v for v, r in zip(verdicts[name], sets[name]) if r["style"] == s])
                                       for s in sorted({r["style"] for r in sets[name]})}
            row[name] = rate(verdicts[name])
    for key in ("kl", "nll"):
        lo, hi = bootstrap_mean(ret[key], ret["tokens"], seed=seed)
        row["kl_to_base" if key == "kl" else "nll"] = {"value": sum(ret[key]) / sum(ret["tokens"]), "lo": lo, "hi": hi}
    return row


def paired(a: dict, b: dict, seed: int) -> dict:
    """Model a against model b on the same prompts: McNemar on refusals and QA, paired bootstrap on KL."""
    out = {s: mcnemar_exact(a["verdicts"][s], b["verdicts"][s]) for s in a["verdicts"] if s in b["verdicts"]}
    out["qa"] = mcnemar_exact(a["qa_ok"], b["qa_ok"])
    out["kl_diff"] = paired_bootstrap(a["ret"]["kl"], b["ret"]["kl"], a["ret"]["tokens"], seed=seed)
    return out


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
        if (d / "safesteer.json").exists():
            pairs.append((d.name, str(d)))
    return pairs


def check_model_spec(name: str) -> None:
    """Fail in seconds on a model that cannot load: a missing path, a folder without config.json, a config or
    tokenizer that does not parse. Loads no weights (a hub id is left to load_model)."""
    if name == BUNDLED_MODEL:
        bundled_package_dir()
        return
    path = Path(name)
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise UserError(f"model {name!r} not found (not a directory here, nor a hub id of the form org/name)")
        return
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json); is it a student that did not finish?")
    from transformers import AutoConfig, AutoTokenizer
    try:
        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None


def check_spec(spec: str, default_model: str) -> str:
    """Fail in seconds, before any work, on a spec that cannot load. Returns the model the spec loads (for
    steer:DIR, direction.json's model)."""
    if spec.startswith("steer:"):
        folder = Path(spec[len("steer:"):])
        for name in ("direction.safetensors", "direction.json"):
            if not (folder / name).is_file():
                raise UserError(f"{folder / name}: file not found (steer:DIR needs Stage 1's outputs)")
        spec = load_json(folder / "direction.json").get("model", default_model)
    check_model_spec(spec)
    return spec


def load_spec(spec: str, default_model: str, device, chat_template=None, loaded=None, device_map=None):
    """(model, tokenizer, hook factory) for a spec: a model, or steer:DIR (π0 of direction.json + c·r).
    `loaded` maps model names already in memory to (model, tok), so the base model is not loaded twice."""
    name = check_spec(spec, default_model)
    model, tok = (loaded or {}).get(name) or load_model(name, device, chat_template=chat_template,
                                                        device_map=device_map)
    if not spec.startswith("steer:"):
        return model, tok, contextlib.nullcontext
    teacher, _ = load_teacher(model, Path(spec[len("steer:"):]) / "direction.safetensors")
    return model, tok, teacher.steer


# ----------------------------------------------------------------------------- reuse (make ablate)

def fingerprint(spec: str, settings: dict) -> str:
    """Everything one model's evaluation depends on: its weights (a directory's config and safetensors, or the
    direction files and the model they steer), the prompts, the settings and the judge. A model whose
    fingerprint is in OUT/eval.json from an earlier run is not evaluated again (answers are deterministic)."""
    h = hashlib.sha256(json.dumps({"spec": spec, **settings, "judge": list(REFUSAL_PHRASES)}, sort_keys=True).encode())
    folders = []
    if spec.startswith("steer:"):
        folder = Path(spec[len("steer:"):])
        folders.append((folder, ["direction.safetensors", "direction.json"]))
        spec = load_json(folder / "direction.json").get("model", settings["base"])
    if Path(spec).is_dir():
        folders.append((Path(spec), ["config.json", *sorted(f.name for f in Path(spec).glob("*.safetensors"))]))
    for folder, names in folders:
        for name in names:  # streamed: an 8B student's 16 GB of weights never sit in memory at once
            with open(folder / name, "rb") as f:
                h.update(name.encode() + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def earlier_evaluation(out: Path) -> tuple[dict, list[dict], dict]:
    """(models, samples, π0's retention answers) of OUT's last evaluation, or empty ones."""
    try:
        old = load_json(out / "eval.json")
        samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
        return old["models"], samples, old.get("retention_answers") or {}
    except (UserError, OSError, KeyError, ValueError):  # none yet, or unreadable: evaluate everything
        return {}, [], {}


def reuse(name: str, fp: str, old: dict, old_samples: list[dict], sets: dict, paths: dict):
    """This model's row, samples and per-prompt results from the earlier run, if its fingerprint is unchanged."""
    if (old.get(name) or {}).get("fingerprint") != fp:
        return None
    mine = [r for r in old_samples if r["model"] == name]
    verdicts = {s: [r["refusal"] for r in mine if r["set"] == Path(paths[s]).stem] for s in SETS if s in sets}
    qa_ok = [r["correct"] for r in mine if r["set"] == "general_qa"]
    if any(len(v) != len(sets[s]) for s, v in verdicts.items()) or len(qa_ok) != len(sets["qa"]):
        return None
    ret = {"kl": old[name]["kl_sums"], "nll": old[name].get("nll_sums"), "tokens": old[name]["kl_tokens"]}
    row = {k: v for k, v in old[name].items() if k != "paired"}
    return row, mine, {"verdicts": verdicts, "qa_ok": qa_ok, "ret": ret}


# ----------------------------------------------------------------------------- main

def fmt(x: dict | None, kind: str = "rate") -> str:
    if x is None or x.get(kind) is None:  # not measured, or an empty set (e.g. no risky-sounding prompts)
        return "–"
    if kind == "rate":
        return f"{x['rate']:.0%} [{x['lo']:.0%}, {x['hi']:.0%}]"
    return f"{x['value']:.4f} [{x['lo']:.4f}, {x['hi']:.4f}]"


def to_markdown(results: dict, meta: dict) -> str:
    cols = [("refusal_harmful", "refusal ↑"), ("harmful_reform", "refusal, rephrased ↑"),
            ("over_refusal", "over-refusal ↓"), ("over_refusal_risky", "risky-sounding ↓"),
            ("harmless_reform", "over-refusal, rephrased ↓"), ("kl_to_base", "KL to base ↓"), ("nll", "NLL"),
            ("qa_accuracy", "QA acc ↑")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = [fmt(r.get(k), "value" if k in ("kl_to_base", "nll") else "rate") for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    styles = sorted({s for r in results.values() for s in r.get("harmful_reform_by_style", {})})
    if styles:
        lines += ["", "Refusal per phrasing style (harmful_reform_test; harmless_reform_test in parentheses):", "",
                  "| model | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
        for name, r in results.items():
            h, s = r.get("harmful_reform_by_style", {}), r.get("harmless_reform_by_style", {})
            lines.append(f"| {name} | " + " | ".join(
                f"{h[x]['rate']:.0%}" + (f" ({s[x]['rate']:.0%})" if x in s else "") for x in styles) + " |")
    n = meta["counts"]
    lines += ["", "[lo, hi]: 95% Wilson interval (rates), bootstrap over prompts (KL, NLL). " +
              ", ".join(f"{k} n={v}" for k, v in n.items()) + f"; greedy, {meta['max_new_tokens']} new tokens; "
              f"judge: substring ({len(REFUSAL_PHRASES)} phrases, metrics.REFUSAL_PHRASES)."]
    return "\n".join(lines) + "\n"


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
    sets = {name: read_set(path, n=args.n, seed=args.seed) for name, path in paths.items() if path}
    if any(not r["answers"] for r in sets["qa"]):
        raise UserError(f"{args.qa}: every question needs an 'answers' list")
    prepare_out_dir(out, OUTPUTS, args.overwrite)

    base, base_tok = load_model(args.model, device, chat_template=args.chat_template, device_map=args.device_map)
    for name, rows in sets.items():
        for r, p in zip(rows, truncate_prompts(base_tok, [r["prompt"] for r in rows], args.max_prompt_tokens,
                                               paths[name])):
            r["prompt"] = p
    harmless_prompts = [r["prompt"] for r in sets["harmless"]]
    settings = {"base": args.model, "sets": sets, "device": str(device), "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "qa_tokens": args.qa_tokens, "chat_template": args.chat_template}
    old_models, old_samples, old_answers = earlier_evaluation(out)
    # π0's own greedy answers to the harmless prompts: the text every model is scored on for retention; they are
    # also the base model's harmless_test completions, so they are not generated twice (nor again if unchanged).
    base_fp = fingerprint(args.model, settings)
    if old_answers.get("fingerprint") == base_fp:
        base_texts, base_answers = old_answers["texts"], old_answers["tokens"]
    else:
        base_texts, base_answers = greedy(base, base_tok, harmless_prompts, args.max_new_tokens, args.batch_size,
                                          contextlib.nullcontext, "base answers (retention text)")
    results, raw, samples, base_cache = {}, {}, [], []  # base_cache: π0's logits on those answers (retention)
    for name, spec in tqdm(pairs, desc="models", unit="model"):
        fp = fingerprint(spec, settings)
        earlier = reuse(name, fp, old_models, old_samples, sets, paths)
        if earlier:  # e.g. make ablate after make demo: base and teacher are as the demo evaluated them
            results[name], mine, raw[name] = earlier
            samples += mine
            print(f"{name}: inputs unchanged since {out / 'eval.json'}: its evaluation is reused")
            continue
        t = time.time()
        model, tok, hook = load_spec(spec, args.model, device, args.chat_template, {args.model: (base, base_tok)},
                                      args.device_map)
        if len(tok) != len(base_tok) or tok.get_vocab() != base_tok.get_vocab():
            raise UserError(f"model {name} ({spec}) has another tokenizer than the base model {args.model}")
        unsteered_base = model is base and hook is contextlib.nullcontext
        todo = [s for s in SETS if s in sets and not (s == "harmless" and unsteered_base)]  # π0's: base_texts
        answers = iter(greedy(model, tok, [r["prompt"] for s in todo for r in sets[s]], args.max_new_tokens,
                              args.batch_size, hook, f"{name}: {', '.join(todo)}")[0])  # one call: batches span sets
        texts = {s: [next(answers) for _ in sets[s]] if s in todo else base_texts for s in SETS if s in sets}
        q_txt, _ = greedy(model, tok, [r["prompt"] for r in sets["qa"]], args.qa_tokens, args.batch_size, hook,
                          f"{name}: qa")
        verdicts = {s: judge_refusal(x) for s, x in texts.items()}
        qa_ok = [qa_correct(a, r["answers"]) for a, r in zip(q_txt, sets["qa"])]
        ret = retention(model, hook, base, tok, harmless_prompts, base_answers, min(args.batch_size, RETENTION_BATCH),
                        base_cache)
        raw[name] = {"verdicts": verdicts, "qa_ok": qa_ok, "ret": ret}
        results[name] = {"spec": spec, **summarize(verdicts, sets, qa_ok, ret, args.seed),
                         "kl_sums": ret["kl"], "nll_sums": ret["nll"], "kl_tokens": ret["tokens"], "fingerprint": fp,
                         "seconds": round(time.time() - t, 1)}
        for s, x in texts.items():
            samples += [{"model": name, "set": Path(paths[s]).stem, "category": r["category"], "style": r["style"],
                         "prompt": r["prompt"], "completion": c, "refusal": v}
                        for r, c, v in zip(sets[s], x, verdicts[s])]
        samples += [{"model": name, "set": "general_qa", "prompt": r["prompt"], "completion": c, "answers": r["answers"],
                     "correct": ok} for r, c, ok in zip(sets["qa"], q_txt, qa_ok)]
        if model is not base:
            del model
    for name in results:  # each model against base and teacher, on the same prompts
        results[name]["paired"] = {ref: paired(raw[name], raw[ref], args.seed) for ref in ("base", "teacher")
                                   if ref in raw and ref != name}

    meta = {"counts": {s: len(rows) for s, rows in sets.items()}, "max_new_tokens": args.max_new_tokens,
            "qa_tokens": args.qa_tokens, "base_model": args.model, "data": paths, "seed": args.seed,
            "judge_phrases": list(REFUSAL_PHRASES), "seconds": round(time.time() - t0, 1), **run_info()}
    meta["counts"]["risky"] = sum(r["category"] == "risky_sounding" for r in sets["harmless"])
    meta["retention_answers"] = {"fingerprint": base_fp, "texts": base_texts, "tokens": base_answers}
    write_json(out / "eval.json", {"models": results, **meta})
    write_jsonl(out / "eval_samples.jsonl", samples)
    table = to_markdown(results, meta)
    write_text(out / "eval.md", table)
    print(table)
    print(f"took {time.time() - t0:.0f} s; wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval_samples.jsonl'}")


if __name__ == "__main__":
    run_cli(main)
