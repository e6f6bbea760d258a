"""Stage 1 of SafeSteer: the refusal direction r, chosen by measurement.

Difference of means (Arditi et al. 2024, "Refusal in LMs is mediated by a single direction"):

    r[p, l] = mean_{x harmful} h_l(x)[p]  -  mean_{x harmless} h_l(x)[p]

where h_l(x)[p] is the input of decoder block l (the residual stream before it) at post-instruction position
p, i.e. one of the tokens the chat template appends after the user's text. Every (p, l) is a candidate. Each
is scored on validation prompts by the refusal score s = log p_R - log(1 - p_R), p_R = π(first token ∈ R),
where R is a set of refusal-opening tokens ("I", "Sorry", ...):

    bypass  project r̂ out everywhere, harmful prompts  -> mean s   (low: r carries the refusal)
    induce  add r at block l, harmless prompts          -> mean s   (high: adding r causes refusal)
    kl      KL(π0 || ablated) at the last position, harmless prompts (low: harmless behaviour untouched)

Selection (authors' code): drop l >= 0.8 L, kl > 0.1, induce < 0; take the lowest bypass. A model that barely
refuses leaves no survivor; then (ours) take the highest induce among l < 0.8 L, kl <= 0.1, and record it.
--teacher-grid C... (ours): choose the teacher πt = π0 + c·r by how selectively it refuses, instead. Every
candidate block l < 0.8 L is ranked by first-token selectivity at the middle c (mean p_R on harmful_val minus
harmless_val, one forward per prompt); the best --grid-blocks blocks x every c are measured as they will
teach, by the judge's refusal rate on --grid-new-tokens greedy tokens, and the most selective block and c are
kept. The first token ranks blocks usefully and coefficients badly; 16 tokens were too few for the judge
(refusals come later). The ablation KL bound is about removing r: it does not apply.

--kind response (ours, for models that never refuse): when harmful and harmless prompts differ in topic but
the model answers both, their difference of means carries topic, not refusal. Instead, contrast the model's
own residual stream over a prefilled refusal and over a prefilled compliance to the same harmful prompts
(contrastive activation addition, Rimsky et al. 2023): r[l] = mean over response tokens, refusal - compliance.
The teacher is still π0 steered by its own activations; candidates are one per layer, scored as above. The
means themselves are computed in safesteer/directions.py, which Stage 3's --refresh-every uses too.

Reads   data/harmful_train, harmless_train (means), harmful_val, harmless_val (scores)
Writes  OUT/direction.safetensors  tensor "direction" [hidden], float32, the raw r[p*, l*]
        OUT/direction.json         layer, position, coefficient, norm, scores, rule, data, seed, versions
        OUT/candidates.json        every candidate with its three scores
        OUT/steering_check.json    greedy completions of harmful_val prompts with and without πt = π0 + c·r

Usage:
    python extract_direction.py --out runs/demo
    python extract_direction.py --out runs/demo --layer 18 --position -1 --overwrite   # force a candidate
    python extract_direction.py --out runs/demo --kind response --teacher-grid 0.5 0.75 1.0   # the demo's
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from safesteer.artifacts import model_fingerprint
from safesteer.chat import encode_chats, post_instruction_ids, refusal_token_ids, stop_token_ids
from safesteer.directions import PromptBatches, ablate_direction, candidate_directions, response_directions
from safesteer.cli import (Parser, add_common_args, add_renamed, finite_float, non_negative_int, pick_device,
                           positive_float, positive_int, run_cli, seed_everything)
from safesteer.errors import UserError
from safesteer.files import (data_file, prepare_out_dir, read_prompts, run_info, save_tensors,
                             truncate_prompts, write_json)
from safesteer.models import check_lengths, load_model
from safesteer.metrics import is_refusal, refusal_rate
from safesteer.hooks import add_vector, decoder_layers
from safesteer.sampling import decode_completions, sample

# Words a refusal usually opens with; their first tokens form R. Override with --refusal-tokens.
REFUSAL_WORDS = ("I", "Sorry", "As", "Unfortunately", "No")
# --kind response: the two prefilled answers whose activations are contrasted (--refusal-text, --comply-text)
REFUSAL_TEXT = "I'm sorry, but I can't help with that. It could cause harm, and I won't assist with it."
COMPLY_TEXT = "Sure, here is a detailed step-by-step guide on how to do that. First, you need to"
OUTPUTS = ["direction.safetensors", "direction.json", "candidates.json", "steering_check.json"]


def build_parser() -> Parser:
    p = Parser(__doc__)
    paper = p.add_argument_group("the paper's recipe")
    paper.add_argument("--n-train", type=positive_int, default=128,
                       help="at most this many prompts per training set (paper: 128)")
    paper.add_argument("--n-val", type=positive_int, default=32,
                       help="at most this many prompts per validation set (paper: 32)")
    paper.add_argument("--refusal-tokens", nargs="+", metavar="WORD", default=list(REFUSAL_WORDS),
                       help="words whose first token forms the refusal set R")
    paper.add_argument("--max-layer-frac", type=finite_float, default=0.8,
                       help="drop candidates with layer >= frac * L")
    paper.add_argument("--kl-max", type=finite_float, default=0.1,
                       help="drop candidates with a larger ablation KL")
    paper.add_argument("--coefficient", type=finite_float, default=1.0,
                       help="c in πt = π0 + c·r, stored for later stages")
    paper.add_argument("--layer", type=int, help="force this layer (default: chosen by the scores)")
    paper.add_argument("--position", type=int, help="force this position too, e.g. -1 (default: chosen)")
    authors = p.add_argument_group("the authors' variants")
    authors.add_argument("--filter", action="store_true",
                         help="keep the harmful prompts π0 refuses (s > 0), the harmless ones it does not")
    ours = p.add_argument_group("ours")
    ours.add_argument("--kind", choices=["prompt", "response"], default="prompt",
                      help="prompt: harmful - harmless prompts at post-instruction tokens (paper); "
                           "response: prefilled refusal - compliance on harmful prompts (ours)")
    ours.add_argument("--refusal-text", default=REFUSAL_TEXT, help="--kind response: the prefilled refusal")
    ours.add_argument("--comply-text", default=COMPLY_TEXT, help="--kind response: the prefilled compliance")
    ours.add_argument("--teacher-grid", type=positive_float, nargs="+", metavar="C",
                      help="choose block and c by how selectively the teacher refuses, as described above "
                           "(default: off, the authors' rule)")
    ours.add_argument("--grid-blocks", type=positive_int, default=3,
                      help="--teacher-grid: how many ranked blocks the judge measures, at every c")
    add_renamed(ours, "--grid-tokens", "--grid-new-tokens", type=positive_int, default=32,
                help="greedy tokens per --teacher-grid answer")
    add_renamed(ours, "--check-prompts", "--n-check-prompts", type=non_negative_int, default=8,
                help="harmful_val prompts in the steering check (0: no check)")
    add_renamed(ours, "--check-tokens", "--check-new-tokens", type=positive_int, default=48,
                help="new tokens per steering-check completion")
    data = p.add_argument_group("data")
    add_renamed(data, "--harmful", "--harmful-train", default=str(data_file("harmful_train")),
                help="prompts for the harmful mean")
    add_renamed(data, "--harmless", "--harmless-train", default=str(data_file("harmless_train")),
                help="prompts for the harmless mean")
    data.add_argument("--harmful-val", default=str(data_file("harmful_val")),
                      help="prompts for the bypass score")
    data.add_argument("--harmless-val", default=str(data_file("harmless_val")),
                      help="prompts for induce and kl")
    run = p.add_argument_group("model and run")
    add_common_args(run, device_map=True)
    run.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    run.add_argument("--overwrite", action="store_true", help="replace this stage's outputs in --out")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if (args.layer is None) != (args.position is None):
        raise UserError("--layer and --position force a candidate together; give both or neither")
    return args


# ----------------------------------------------------------------------------- the paper's method

def refusal_score(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """s = log p_R - log(1 - p_R) with p_R = Σ_{v∈R} π(v), in float64. logits: [n, vocab] -> [n].

    log(1 - p_R) is a logsumexp over the tokens outside R, never a subtraction (exact when p_R is near 1)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    in_r = torch.zeros(logp.shape[-1], dtype=torch.bool, device=logp.device)
    in_r[refusal_ids] = True
    return logp[:, in_r].logsumexp(-1) - logp[:, ~in_r].logsumexp(-1)


def kl_last(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(π0 || π) per prompt, float64. [n, vocab] x 2 -> [n]."""
    lp0 = torch.log_softmax(base_logits.double(), dim=-1)
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (lp0.exp() * (lp0 - lp)).sum(-1)


@torch.no_grad()
def score_candidates(model, r: torch.Tensor, cands: list[tuple[int, int]], harmful_val: PromptBatches,
                     harmless_val: PromptBatches, refusal_ids: list[int], pos_names: list[str]) -> list[dict]:
    """bypass, induce and kl of every candidate (p, l); p indexes r's first axis."""
    base_harmless = harmless_val.last_logits(model)
    n_pos = r.shape[0]
    rows = []
    for p, l in tqdm(cands, desc="scoring candidates", unit="cand"):
        vec = r[p, l].float()
        with ablate_direction(model, vec):
            bypass = refusal_score(harmful_val.last_logits(model), refusal_ids).mean().item()
            kl = kl_last(base_harmless, harmless_val.last_logits(model)).mean().item()
        with add_vector(model, l, vec):
            induce = refusal_score(harmless_val.last_logits(model), refusal_ids).mean().item()
        rows.append({"position": p - n_pos, "token": pos_names[p], "layer": l, "norm": vec.norm().item(),
                     "bypass": bypass, "induce": induce, "kl": kl})
    return rows


def select_direction(rows: list[dict], n_layers: int, max_layer_frac: float = 0.8, kl_max: float = 0.1):
    """Authors' rule: among l < frac·L, kl <= kl_max, induce >= 0, no NaN, the lowest bypass.
    Fallback (ours): among l < frac·L, kl <= kl_max, the highest induce. Returns (row, rule)."""
    def finite(r):
        return all(math.isfinite(r[k]) for k in ("bypass", "induce", "kl"))
    base = [r for r in rows if r["layer"] < max_layer_frac * n_layers and finite(r) and r["kl"] <= kl_max]
    survivors = [r for r in base if r["induce"] >= 0]
    if survivors:
        return min(survivors, key=lambda r: r["bypass"]), "authors"
    if base:
        return max(base, key=lambda r: r["induce"]), "fallback_highest_induce"
    raise UserError(f"no candidate has layer < {max_layer_frac} L and kl <= {kl_max}; "
                    "force one with --layer/--position or loosen --kl-max")


# ----------------------------------------------------------------------------- the authors' variant: --filter

def filter_prompt_sets(model, batches, sets: dict, refusal_ids: list[int]) -> dict:
    """--filter: keep the harmful prompts π0 refuses (s > 0) and the harmless ones it does not (s < 0)."""
    kept = {}
    for name, refused in (("harmful", True), ("harmless", False)):
        scores = refusal_score(batches(sets[name]).last_logits(model), refusal_ids)
        kept[name] = [p for p, s in zip(sets[name], scores.tolist()) if (s > 0) == refused]
    print(f"--filter kept {len(kept['harmful'])} harmful and {len(kept['harmless'])} harmless prompts")
    if not kept["harmful"] or not kept["harmless"]:
        raise UserError("--filter left an empty prompt set (the model refuses none of the harmful prompts?)")
    return {**sets, **kept}


# ----------------------------------------------------------------------------- ours: πt chosen by selectivity

@torch.no_grad()
def first_token_selectivity(model, r, teachers: list[dict], coefficients, harmful_val: PromptBatches,
                            harmless_val: PromptBatches, refusal_ids: list[int]) -> list[dict]:
    """Each teacher πt = π0 + c·r (position, layer) x each c, cheaply: mean p_R (sigmoid of s) on harmful_val
    minus harmless_val, one forward per prompt; also its KL(π0 || πt) on harmless_val's first token."""
    base_harmless = harmless_val.last_logits(model)
    out = []
    for x in tqdm(teachers, desc=f"ranking teachers (c = {', '.join(map(str, coefficients))})", unit="block"):
        vec = r[r.shape[0] + x["position"], x["layer"]].float()
        for c in coefficients:
            with add_vector(model, x["layer"], vec, c):
                harmful, harmless = harmful_val.last_logits(model), harmless_val.last_logits(model)
            p_r = [torch.sigmoid(refusal_score(z, refusal_ids)).mean().item() for z in (harmful, harmless)]
            out.append({"position": x["position"], "layer": x["layer"], "coefficient": c,
                        "first_token_selectivity": p_r[0] - p_r[1], "p_r_harmful": p_r[0],
                        "p_r_harmless": p_r[1], "teacher_kl": kl_last(base_harmless, harmless).mean().item()})
    return out


def rank_blocks(model, r, candidates: list[dict], coefficients, harmful_val, harmless_val, refusal_ids,
                n_blocks: int) -> tuple[list[dict], list[dict]]:
    """Every candidate block by first-token selectivity at the middle c; returns (all of them ranked, the
    n_blocks best x every c: the teachers the judge measures)."""
    mid = sorted(coefficients)[len(coefficients) // 2]
    scored = first_token_selectivity(model, r, candidates, [mid], harmful_val, harmless_val, refusal_ids)
    ranked = sorted(scored, key=lambda t: -t["first_token_selectivity"])
    return ranked, [{"position": t["position"], "layer": t["layer"], "coefficient": c}
                    for t in ranked[:n_blocks] for c in coefficients]


@torch.no_grad()
def teacher_selectivity(model, tok, r, teachers: list[dict], harmful: list[str], harmless: list[str],
                        max_tokens: int = 32) -> list[dict]:
    """Each teacher (position, layer, coefficient) measured as it will teach: greedy refusal (the judge) on
    harmful and harmless validation prompts. selectivity = refusal(harmful) - refusal(harmless): a teacher
    that refuses everything teaches over-refusal."""
    device = next(model.parameters()).device
    ids, mask = encode_chats(tok, harmful + harmless, device=device)  # one batch: fewer decoding steps
    kw = dict(temperature=0, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    out = []
    for t in tqdm(teachers, desc="measuring teachers", unit="teacher"):
        vec = r[r.shape[0] + t["position"], t["layer"]].float()
        with add_vector(model, t["layer"], vec, t["coefficient"]):
            texts = decode_completions(tok, *sample(model, ids, mask, max_tokens, **kw))
        rates = refusal_rate(texts[:len(harmful)]), refusal_rate(texts[len(harmful):])
        out.append({**t, "refusal_harmful": rates[0], "refusal_harmless": rates[1],
                    "selectivity": rates[0] - rates[1]})
    return out


def best_teacher(grid: list[dict]) -> dict:
    """Highest selectivity; ties go to less harmless refusal, then the smaller c."""
    return max(grid, key=lambda g: (round(g["selectivity"], 9), -g["refusal_harmless"], -g["coefficient"]))


def choose_teacher(model, tok, r, cands, sets: dict, val: tuple, refusal_ids: list[int], recipe: Recipe):
    """--teacher-grid: the blocks below the cut-off (or the one --layer forces) ranked by first-token
    selectivity, the best --grid-blocks x every c measured by the judge. Returns (ranked, grid, winner)."""
    n_pos, n_layers = r.shape[:2]
    blocks = [{"position": p - n_pos, "layer": l} for p, l in cands
              if recipe.layer is not None or l < recipe.max_layer_frac * n_layers]
    if not blocks:
        raise UserError(f"no candidate block below {recipe.max_layer_frac} L for --teacher-grid")
    ranked, top = rank_blocks(model, r, blocks, recipe.teacher_grid, *val, refusal_ids, recipe.grid_blocks)
    harmful, harmless = sets["harmful_val"], sets["harmless_val"]
    grid = teacher_selectivity(model, tok, r, top, harmful, harmless, recipe.grid_new_tokens)
    return ranked, grid, best_teacher(grid)


@torch.no_grad()
def steering_check(model, tok, vec: torch.Tensor, layer: int, coefficient: float, prompts: list[str],
                   max_new_tokens: int) -> dict:
    """Greedy completions with and without the teacher hook, judged by the substring judge."""
    ids, mask = encode_chats(tok, prompts, device=vec.device)
    kw = dict(temperature=0, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    base = decode_completions(tok, *sample(model, ids, mask, max_new_tokens, **kw))
    with add_vector(model, layer, vec, coefficient):
        steered = decode_completions(tok, *sample(model, ids, mask, max_new_tokens, **kw))
    samples = [{"prompt": p, "base": b, "steered": s, "base_refuses": is_refusal(b),
                "steered_refuses": is_refusal(s)} for p, b, s in zip(prompts, base, steered)]
    return {"layer": layer, "coefficient": coefficient, "max_new_tokens": max_new_tokens,
            "refusal_rate_base": refusal_rate(base), "refusal_rate_steered": refusal_rate(steered),
            "samples": samples}


# ----------------------------------------------------------------------------- the run

@dataclass
class Recipe:
    """How Stage 1 finds and chooses r: the command line's settings (their defaults are in build_parser)."""
    kind: str
    refusal_text: str
    comply_text: str
    max_layer_frac: float
    kl_max: float
    coefficient: float
    layer: int | None
    position: int | None
    filter: bool
    teacher_grid: list[float] | None
    grid_blocks: int
    grid_new_tokens: int
    batch_size: int


def survey(model, tok, name: str, refusal_words: list[str], recipe: Recipe) -> tuple[list[str], list[int]]:
    """(the names of r's positions, R), printed with L; a forced candidate is checked against them."""
    post = post_instruction_ids(tok)
    names = [tok.decode([i]) for i in post]
    n_layers, refusal_ids = len(decoder_layers(model)), refusal_token_ids(tok, refusal_words)
    hidden = model.config.hidden_size
    print(f"model {name}: {n_layers} layers, hidden {hidden}; post-instruction tokens {names}")
    print(f"refusal tokens R: {[tok.decode([i]) for i in refusal_ids]} (ids {refusal_ids})")
    n_pos = 1 if recipe.kind == "response" else len(post)
    if recipe.layer is not None and not (0 <= recipe.layer < n_layers and -n_pos <= recipe.position < 0):
        raise UserError(f"--layer must be in 0..{n_layers - 1} and --position in -{n_pos}..-1")
    return ["<response mean>"] if recipe.kind == "response" else names, refusal_ids


def list_candidates(r: torch.Tensor, layer: int | None, position: int | None):
    """(p, l) indices into r: all of them, or the one --layer and --position force; and those skipped."""
    n_pos, n_layers = r.shape[:2]
    every = [(p, l) for p in range(n_pos) for l in range(n_layers)]
    cands = every if layer is None else [(n_pos + position, layer)]
    # A candidate whose r is exactly zero (the prompt direction at block 0: both means are the same template
    # tokens' embeddings) has nothing to add or ablate, and its scores would be NaN: skip it, and say so.
    zero = [(p, l) for p, l in cands if not r[p, l].any()]
    skipped = [{"position": p - n_pos, "layer": l, "reason": "zero direction"} for p, l in zero]
    cands = [c for c in cands if c not in zero]
    if not cands:
        raise UserError("every candidate direction is zero (identical harmful and harmless activations)")
    return cands, skipped


def find_direction(model, tok, sets: dict, batches, pos_names: list[str], refusal_ids: list[int],
                   recipe: Recipe) -> tuple[torch.Tensor, dict, dict, dict]:
    """The stage, from prompts to the chosen r[p*, l*] (float32 [hidden]); also returns the choice (for
    direction.json), every score (candidates.json) and the seconds taken."""
    if recipe.kind == "response":  # ours: [1, L, hidden]
        r = response_directions(model, tok, sets["harmful"], recipe.refusal_text, recipe.comply_text,
                                recipe.batch_size)
    else:  # the paper's: [n_pos, L, hidden], float64
        r = candidate_directions(model, batches(sets["harmful"]), batches(sets["harmless"]), len(pos_names))
    cands, skipped = list_candidates(r, recipe.layer, recipe.position)
    val = batches(sets["harmful_val"]), batches(sets["harmless_val"])
    base = {name: refusal_score(v.last_logits(model), refusal_ids).mean().item()
            for name, v in zip(("harmful_val", "harmless_val"), val)}
    t_grid, ranked, grid, teacher = time.time(), None, None, None
    if recipe.teacher_grid:  # ours: the teacher chosen by how selectively it refuses
        ranked, grid, teacher = choose_teacher(model, tok, r, cands, sets, val, refusal_ids, recipe)
        cands = [(r.shape[0] + teacher["position"], teacher["layer"])]
    t_grid, t_score = time.time() - t_grid, time.time()
    rows = score_candidates(model, r, cands, *val, refusal_ids, pos_names)
    seconds = {"scoring": time.time() - t_score, "n_candidates": len(rows), "teacher_grid": t_grid}
    forced = recipe.layer is not None
    if teacher:
        best, rule = rows[0], "forced+selectivity" if forced else "selectivity"
    elif forced:
        best, rule = rows[0], "forced"
    else:
        best, rule = select_direction(rows, r.shape[1], recipe.max_layer_frac, recipe.kl_max)
    vec = r[r.shape[0] + best["position"], best["layer"]].float()
    coefficient = teacher["coefficient"] if teacher else recipe.coefficient
    scores = {k: best[k] for k in ("bypass", "induce", "kl")}
    choice = {"layer": best["layer"], "position": best["position"], "position_token": best["token"],
              "coefficient": coefficient, "teacher_grid": teacher, "norm": vec.norm().item(),
              "hidden_size": vec.numel(), "n_layers": r.shape[1], "kind": recipe.kind, "selection_rule": rule,
              "fallback_used": rule.startswith("fallback"), "scores": scores, "base_refusal_scores": base}
    candidates = {"n_layers": r.shape[1], "positions": pos_names, "base_refusal_scores": base,
                  "candidates": rows, "skipped": skipped, "teachers_ranked": ranked, "teachers": grid}
    return vec, choice, candidates, seconds


def direction_json(choice: dict, name: str, fingerprint: str | None, refusal_tokens: dict, recipe: Recipe,
                   data: dict, check: dict | None, seed: int, seconds: dict) -> dict:
    """direction.json: the choice, how it was made, and on what (the model's name and fingerprint, which the
    later stages check)."""
    texts = {"refusal": recipe.refusal_text, "comply": recipe.comply_text}
    rates = None if check is None else {k: check[k] for k in ("refusal_rate_base", "refusal_rate_steered")}
    settings = {"filter": recipe.filter, "max_layer_frac": recipe.max_layer_frac, "kl_max": recipe.kl_max,
                "response_texts": texts if recipe.kind == "response" else None}
    return {"model": name, "model_fingerprint": fingerprint, **choice, **refusal_tokens, **settings,
            "data": data, "steering_check": rates, "seed": seed, "seconds": seconds, **run_info()}


def print_summary(out, choice: dict, teachers: list[dict] | None, check: dict | None, seconds: dict,
                  t0: float) -> None:
    c, s, base = choice, choice["scores"], choice["base_refusal_scores"]
    print(f"chosen: layer {c['layer']}, position {c['position']} ({c['position_token']!r}), "
          f"rule {c['selection_rule']}; bypass {s['bypass']:.3f}, induce {s['induce']:.3f}, "
          f"kl {s['kl']:.4f}, |r| {c['norm']:.2f}")
    for g in teachers or []:
        print(f"  teacher block {g['layer']}, c = {g['coefficient']}: refuses {g['refusal_harmful']:.0%} "
              f"harmful_val, {g['refusal_harmless']:.0%} harmless_val, selectivity {g['selectivity']:+.0%}")
    print(f"base refusal score: harmful_val {base['harmful_val']:.3f}, "
          f"harmless_val {base['harmless_val']:.3f}")
    if check is not None:
        print(f"steering check ({len(check['samples'])} harmful_val prompts, greedy): refusal "
              f"{check['refusal_rate_base']:.0%} base -> {check['refusal_rate_steered']:.0%} steered "
              f"(c = {c['coefficient']})")
    grid = f"teacher grid in {seconds['teacher_grid']:.0f} s; " if c["teacher_grid"] else ""
    print(f"{grid}scored {seconds['n_candidates']} candidates in {seconds['scoring']:.0f} s; "
          f"total {time.time() - t0:.0f} s")
    written = OUTPUTS if check is not None else OUTPUTS[:3]  # no steering_check.json without the check
    print(f"wrote {', '.join(str(out / name) for name in written)}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    t0 = time.time()
    recipe = Recipe(**{name: getattr(args, name) for name in Recipe.__dataclass_fields__})
    files = {"harmful": args.harmful_train, "harmless": args.harmless_train, "harmful_val": args.harmful_val,
             "harmless_val": args.harmless_val}
    sets = {name: read_prompts(path, args.n_val if name.endswith("_val") else args.n_train, args.seed)
            for name, path in files.items()}  # inputs first: a bad file leaves no output
    out = prepare_out_dir(args.out, OUTPUTS, args.overwrite)
    model, tok = load_model(args.model, device, chat_template=args.chat_template, device_map=args.device_map)
    check_lengths(model, max_prompt_tokens=args.max_prompt_tokens, check_new_tokens=args.check_new_tokens,
                  grid_new_tokens=args.grid_new_tokens)
    sets = {name: truncate_prompts(tok, ps, args.max_prompt_tokens, files[name]) for name, ps in sets.items()}
    pos_names, refusal_ids = survey(model, tok, args.model, args.refusal_tokens, recipe)
    batches = functools.partial(PromptBatches, tok, batch_size=args.batch_size, device=device)
    if args.filter:  # the authors' option: keep only prompts the base model already treats the "right" way
        sets = filter_prompt_sets(model, batches, sets, refusal_ids)
    vec, choice, candidates, seconds = find_direction(model, tok, sets, batches, pos_names, refusal_ids,
                                                      recipe)
    check = None
    if args.n_check_prompts:
        check = steering_check(model, tok, vec, choice["layer"], choice["coefficient"],
                               sets["harmful_val"][:args.n_check_prompts], args.check_new_tokens)
    refusal = {"refusal_tokens": [tok.decode([i]) for i in refusal_ids], "refusal_token_ids": refusal_ids}
    data = {**files, **{f"n_{name}": len(ps) for name, ps in sets.items()}}
    seconds = {"total": time.time() - t0, **seconds}
    meta = direction_json(choice, args.model, model_fingerprint(model), refusal, recipe, data, check,
                          args.seed, seconds)
    save_tensors(out / "direction.safetensors", {"direction": vec})
    write_json(out / "candidates.json", candidates)
    if check is not None:
        write_json(out / "steering_check.json", check)
    write_json(out / "direction.json", meta)
    print_summary(out, choice, candidates["teachers"], check, seconds, t0)


if __name__ == "__main__":
    run_cli(main)
