"""Model specs: the names Stage 4 compares models by, each checked in seconds before any work.

    NAME or DIR   a model: `smollm2-135m` (bundled), a transformers directory (`runs/demo/student`), a hub id
    steer:DIR     the teacher πt = π0 + c·r from DIR/direction.safetensors and DIR/direction.json (π0: the
                  model direction.json names)

    check_model_spec, check_spec   a missing path, a folder without config.json, a config or tokenizer that
                                   does not parse, missing direction files: an error in seconds, no weights
    load_spec                      (model, tokenizer, hook factory); a model in memory is not loaded again;
                                   each in the dtype it was saved in unless --dtype says (precision.py)
    fingerprint                    a hash of a spec's weights and settings: evaluate.py reuses the evaluation
                                   of a model whose fingerprint is unchanged (`make ablate`)
    judge_fingerprint              a guard's family, the text it reads and its weights: one of those settings
    earlier_evaluation, reuse      that evaluation, read back from eval.json and eval_samples.jsonl
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch

from safesteer.errors import UserError
from safesteer.files import load_json, sha256, write_json, write_jsonl, write_text
from safesteer.models import BUNDLED_MODEL, bundled_package_dir, load_model
from safesteer.scale.precision import saved_dtype, to_bf16_with_warning
from safesteer.teacher import load_teacher


def check_model_spec(name: str) -> None:
    """Fail in seconds on a model that cannot load: a missing path, a folder without config.json, a config or
    tokenizer that does not parse. Loads no weights (a hub id is left to load_model)."""
    if name == BUNDLED_MODEL:
        bundled_package_dir()
        return
    path = Path(name)
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") != 1:
            hint = "not a directory here, nor a hub id of the form org/name"
            raise UserError(f"model {name!r} not found ({hint})")
        return
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json); "
                        "is it a student that did not finish?")
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


def load_spec(spec: str, default_model: str, device, chat_template=None, loaded=None, device_map=None,
              dtype=None):
    """(model, tokenizer, hook factory) for a spec: a model, or steer:DIR (π0 of direction.json + c·r).
    `loaded` maps model names already in memory to (model, tok), so the base model is not loaded twice.
    dtype: None or "saved" keeps each checkpoint's dtype (float32 on the CPU), or "bf16" or "float32"."""
    name = check_spec(spec, default_model)
    loaded = loaded or {}
    if name in loaded:
        model, tok = loaded[name]
    elif dtype == "bf16" and not device_map and Path(name).is_dir() and saved_dtype(name) == torch.float32:
        # float32 weights rounded on request: first say how much of the update over π0 survives it
        model, tok = load_model(name, "cpu", torch.float32, chat_template)
        base = loaded.get(default_model, (None,))[0]
        model = to_bf16_with_warning(model, base, name).to(device)
    else:
        model, tok = load_model(name, device, dtype, chat_template, device_map)
    if not spec.startswith("steer:"):
        return model, tok, contextlib.nullcontext
    teacher, _ = load_teacher(model, Path(spec[len("steer:"):]) / "direction.safetensors")
    return model, tok, teacher.steer


def fingerprint(spec: str, settings: dict) -> str:
    """A hash of what a spec's results depend on: its weights (a directory's config and safetensors, or the
    direction files and the model they steer) and `settings` (for Stage 4: the prompts, the settings, the
    judge; settings["base"] is the model steer:DIR steers when direction.json names none)."""
    if settings.get("dtype") == "saved":  # the default leaves the hash as it was before --dtype existed
        settings = {k: v for k, v in settings.items() if k != "dtype"}
    h = hashlib.sha256(json.dumps({"spec": spec, **settings}, sort_keys=True).encode())
    folders = []
    if spec.startswith("steer:"):
        folder = Path(spec[len("steer:"):])
        folders.append((folder, ["direction.safetensors", "direction.json"]))
        spec = load_json(folder / "direction.json").get("model", settings["base"])
    if Path(spec).is_dir():
        weights = sorted(f.name for f in Path(spec).glob("*.safetensors"))
        folders.append((Path(spec), ["config.json", *weights]))
    for folder, names in folders:
        hash_files(h, folder, names)
    return h.hexdigest()


def hash_files(h, folder: Path, names: list[str]) -> None:
    """Add each file's name and sha256 to the hash h, in the order given."""
    for name in names:  # streamed: an 8B model's 16 GB of weights never sit in memory at once
        with open(folder / name, "rb") as f:
            h.update(name.encode() + hashlib.file_digest(f, "sha256").digest())


def judge_fingerprint(judge) -> dict:
    """What a guard's verdicts depend on (judges.GuardJudge), for Stage 4's fingerprint: its family, the text
    its inputs are made of (its chat template, or HarmBench's prompts) and its weights (config.json and the
    weight files). Another --judge or --judge-family, or the same directory with other files, runs again."""
    weights = None
    if judge.path is not None:
        folder = Path(judge.path)
        names = sorted(f.name for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
        h = hashlib.sha256()
        hash_files(h, folder, ["config.json", *names])
        weights = h.hexdigest()
    return {"family": judge.family_name, "format": hashlib.sha256(judge.format_text().encode()).hexdigest(),
            "weights": weights}


# ----------------------------------------------------------------------------- ours: reusing an evaluation

def earlier_evaluation(out: Path) -> tuple[dict, list[dict], dict]:
    """(models, samples, π0's retention answers) of OUT's last evaluation, or empty ones."""
    try:
        old = load_json(out / "eval.json")
        if old.get("samples_sha256") != sha256(out / "eval_samples.jsonl"):
            why = ("names no samples file (written before it did)" if "samples_sha256" not in old else
                   "was written with another eval_samples.jsonl (a stopped run?)")
            print(f"warning: {out / 'eval.json'} {why}: evaluating every model again", file=sys.stderr)
            return {}, [], {}
        samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
        return old["models"], samples, old.get("retention_answers") or {}
    except (UserError, OSError, KeyError, ValueError):  # none yet, or unreadable: evaluate everything
        return {}, [], {}


def reuse(name: str, fp: str, old: dict, old_samples: list[dict], sets: dict, paths: dict):
    """This model's row, samples and per-prompt results from the earlier run, if its fingerprint is equal."""
    if (old.get(name) or {}).get("fingerprint") != fp:
        return None
    mine = [r for r in old_samples if r["model"] == name]
    verdicts = {s: [r["refusal"] for r in mine if r["set"] == Path(paths[s]).stem] for s in sets if s != "qa"}
    qa_ok = [r["correct"] for r in mine if r["set"] == "general_qa"]
    if any(len(v) != len(sets[s]) for s, v in verdicts.items()) or len(qa_ok) != len(sets["qa"]):
        return None
    ret = {"kl": old[name]["kl_sums"], "nll": old[name].get("nll_sums"), "tokens": old[name]["kl_tokens"]}
    row = {k: v for k, v in old[name].items() if k != "paired"}
    return row, mine, {"verdicts": verdicts, "qa_ok": qa_ok, "ret": ret}


def evaluation_settings(args, sets: dict, device, judge) -> dict:
    """Everything but the weights that a model's row depends on, for its fingerprint: the prompts, the
    decoding, the phrases, the guard (another guard: its verdicts again) and lm-eval's tasks."""
    from safesteer.metrics import REFUSAL_PHRASES
    return {"base": args.model, "sets": sets, "device": str(device), "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, "qa_tokens": args.qa_new_tokens, "dtype": args.dtype,
            "chat_template": args.chat_template, "judge": [args.judge, *REFUSAL_PHRASES],
            **({"guard": judge_fingerprint(judge)} if judge else {}),
            "lm_eval": [args.lm_eval, args.lm_eval_limit]}


def write_evaluation(out: Path, results: dict, samples: list[dict], meta: dict, table: str) -> None:
    """eval_samples.jsonl, eval.md, then eval.json naming the samples it goes with (their sha256): a stop
    between the files leaves no mixed set that a later run would reuse (earlier_evaluation checks it)."""
    write_jsonl(out / "eval_samples.jsonl", samples)
    write_text(out / "eval.md", table)
    meta = {**meta, "samples_sha256": sha256(out / "eval_samples.jsonl")}
    write_json(out / "eval.json", {"models": results, **meta})
