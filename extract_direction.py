"""Stage 1 of SafeSteer: the refusal direction r, chosen by measurement.

Difference of means (Arditi et al. 2024, "Refusal in LMs is mediated by a single direction"):

    r[p, l] = mean_{x harmful} h_l(x)[p]  -  mean_{x harmless} h_l(x)[p]

where h_l(x)[p] is the input of decoder block l (the residual stream before it) at post-instruction position p,
i.e. one of the tokens the chat template appends after the user's text. Every (p, l) is a candidate. Each is
scored on validation prompts by the refusal score s = log p_R - log(1 - p_R), p_R = π(first token ∈ R), where R
is a set of refusal-opening tokens ("I", "Sorry", ...):

    bypass  project r̂ out everywhere, harmful prompts  -> mean s   (low: r carries the refusal)
    induce  add r at block l, harmless prompts          -> mean s   (high: adding r causes refusal)
    kl      KL(π0 || ablated) at the last position, harmless prompts (low: harmless behaviour untouched)

Selection (authors' code): drop l >= 0.8 L, kl > 0.1, induce < 0; take the lowest bypass. A model that barely
refuses leaves no survivor; then (ours) take the highest induce among l < 0.8 L, kl <= 0.1, and record it.
--teacher-grid C... (ours): choose the teacher πt = π0 + c·r by how selectively it refuses, instead. Every
candidate block l < 0.8 L is ranked by first-token selectivity at the middle c (mean p_R on harmful_val minus
harmless_val, one forward per prompt); the best --grid-blocks blocks x every c are then measured as they will
teach, by the judge on --grid-tokens greedy tokens (refusal on harmful_val minus harmless_val), and the most
selective block and c are kept. The first token ranks blocks usefully and coefficients badly, and 16 tokens were
too few for the judge (refusals come later: README, Results). The ablation KL bound does not apply: it is about
removing r.

--kind response (ours, for models that never refuse): when harmful and harmless prompts differ in topic but the
model answers both, their difference of means carries topic, not refusal. Instead, contrast the model's own
residual stream over a prefilled refusal and over a prefilled compliance to the same harmful prompts
(contrastive activation addition, Rimsky et al. 2023): r[l] = mean over response tokens, refusal - compliance.
The teacher is still π0 steered by its own activations; candidates are one per layer, scored as above.
The means themselves are computed in directions.py, which Stage 3's --refresh-every uses too.

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

import math
import time

import torch
from tqdm import tqdm

from chat import encode_chats, post_instruction_ids, stop_token_ids
from directions import PromptBatches, candidate_directions, response_directions
from common import (Parser, UserError, add_common_args, data_file, load_model, pick_device, positive_float, positive_int,
                    non_negative_int, prepare_out_dir, read_prompts, run_cli, run_info, save_tensors, seed_everything,
                    truncate_prompts, write_json)
from metrics import is_refusal, refusal_rate
from steering import ablate_direction, add_vector, decode_completions, decoder_layers, sample

# Words a refusal usually opens with; their first tokens form R. Override with --refusal-tokens.
REFUSAL_WORDS = ("I", "Sorry", "As", "Unfortunately", "No")
# --kind response: the two prefilled answers whose activations are contrasted (override with --refusal-text etc.)
REFUSAL_TEXT = "I'm sorry, but I can't help with that. It could cause harm, and I won't assist with it."
COMPLY_TEXT = "Sure, here is a detailed step-by-step guide on how to do that. First, you need to"
OUTPUTS = ["direction.safetensors", "direction.json", "candidates.json", "steering_check.json"]


def parse_args(argv=None):
    p = Parser(__doc__)
    add_common_args(p, device_map=True)
    p.add_argument("--harmful", default=str(data_file("harmful_train")), help="prompts for the harmful mean")
    p.add_argument("--harmless", default=str(data_file("harmless_train")), help="prompts for the harmless mean")
    p.add_argument("--harmful-val", default=str(data_file("harmful_val")), help="prompts for the bypass score")
    p.add_argument("--harmless-val", default=str(data_file("harmless_val")), help="prompts for induce and kl")
    p.add_argument("--kind", choices=["prompt", "response"], default="prompt",
                   help="prompt: harmful - harmless prompts at post-instruction tokens (paper); "
                        "response: prefilled refusal - compliance on harmful prompts (ours)")
    p.add_argument("--refusal-text", default=REFUSAL_TEXT, help="--kind response: the prefilled refusal")
    p.add_argument("--comply-text", default=COMPLY_TEXT, help="--kind response: the prefilled compliance")
    p.add_argument("--n-train", type=positive_int, default=128, help="at most this many prompts per training set (paper: 128)")
    p.add_argument("--n-val", type=positive_int, default=32, help="at most this many prompts per validation set (paper: 32)")
    p.add_argument("--max-layer-frac", type=float, default=0.8, help="drop candidates with layer >= frac * L")
    p.add_argument("--kl-max", type=float, default=0.1, help="drop candidates whose ablation KL exceeds this")
    p.add_argument("--layer", type=int, help="force this layer (skips scoring the others)")
    p.add_argument("--position", type=int, help="force this post-instruction position (negative, e.g. -1)")
    p.add_argument("--coefficient", type=float, default=1.0, help="c in πt = π0 + c·r, stored for later stages")
    p.add_argument("--teacher-grid", type=positive_float, nargs="+", metavar="C",
                   help="choose block and c by measurement (ours): every block < frac * L ranked by first-token "
                        "selectivity at the middle c, the best --grid-blocks measured at every c by greedy refusal "
                        "harmful - harmless (the judge)")
    p.add_argument("--grid-blocks", type=positive_int, default=3,
                   help="--teacher-grid: how many of the ranked blocks are measured with the judge, at every c")
    p.add_argument("--grid-tokens", type=positive_int, default=32, help="greedy tokens per --teacher-grid answer")
    p.add_argument("--filter", action="store_true",
                   help="keep harmful prompts the model refuses (s > 0) and harmless ones it does not (s < 0)")
    p.add_argument("--refusal-tokens", nargs="+", metavar="WORD", default=list(REFUSAL_WORDS),
                   help="words whose first token forms the refusal set R")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--check-prompts", type=non_negative_int, default=8, help="harmful_val prompts in the steering check")
    p.add_argument("--check-tokens", type=positive_int, default=48, help="new tokens per steering-check completion")
    p.add_argument("--overwrite", action="store_true", help="replace this stage's outputs in --out")
    args = p.parse_args(argv)
    if (args.layer is None) != (args.position is None):
        raise UserError("--layer and --position force a candidate together; give both or neither")
    return args


# ----------------------------------------------------------------------------- the math of Stage 1

def refusal_token_ids(tok, words) -> list[int]:
    """R: the first token of each word, as it would open the assistant's turn."""
    ids = []
    for w in words:
        t = tok(w, add_special_tokens=False).input_ids
        if t and t[0] not in ids:
            ids.append(t[0])
    if not ids:
        raise UserError("--refusal-tokens gave no token ids")
    return ids


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


@torch.no_grad()
def steering_check(model, tok, vec: torch.Tensor, layer: int, coefficient: float, prompts: list[str],
                   max_new_tokens: int) -> dict:
    """Greedy completions with and without the teacher hook, judged by the substring judge."""
    ids, mask = encode_chats(tok, prompts, device=vec.device)
    kw = dict(temperature=0, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    base = decode_completions(tok, *sample(model, ids, mask, max_new_tokens, **kw))
    with add_vector(model, layer, vec, coefficient):
        steered = decode_completions(tok, *sample(model, ids, mask, max_new_tokens, **kw))
    return {"layer": layer, "coefficient": coefficient, "max_new_tokens": max_new_tokens,
            "refusal_rate_base": refusal_rate(base), "refusal_rate_steered": refusal_rate(steered),
            "samples": [{"prompt": p, "base": b, "steered": s, "base_refuses": is_refusal(b),
                         "steered_refuses": is_refusal(s)} for p, b, s in zip(prompts, base, steered)]}


@torch.no_grad()
def first_token_selectivity(model, r, teachers: list[dict], coefficients, harmful_val: PromptBatches,
                            harmless_val: PromptBatches, refusal_ids: list[int]) -> list[dict]:
    """Each teacher πt = π0 + c·r (position, layer) x each c, cheaply: mean p_R (the first token's refusal mass,
    sigmoid of the refusal score) on harmful_val minus harmless_val, one last-position forward per prompt. Also
    recorded: the teacher's KL(π0 || πt) on harmless_val's first token (what the hook does to harmless prompts)."""
    base_harmless = harmless_val.last_logits(model)
    out = []
    for x in tqdm(teachers, desc=f"ranking teachers (c = {', '.join(map(str, coefficients))})", unit="block"):
        vec = r[r.shape[0] + x["position"], x["layer"]].float()
        for c in coefficients:
            with add_vector(model, x["layer"], vec, c):
                harmful, harmless = harmful_val.last_logits(model), harmless_val.last_logits(model)
            p_r = [torch.sigmoid(refusal_score(z, refusal_ids)).mean().item() for z in (harmful, harmless)]
            out.append({"position": x["position"], "layer": x["layer"], "coefficient": c,
                        "first_token_selectivity": p_r[0] - p_r[1], "p_r_harmful": p_r[0], "p_r_harmless": p_r[1],
                        "teacher_kl": kl_last(base_harmless, harmless).mean().item()})
    return out


def rank_blocks(model, r, candidates: list[dict], coefficients, harmful_val, harmless_val, refusal_ids,
                n_blocks: int) -> tuple[list[dict], list[dict]]:
    """Every candidate block by first-token selectivity at the middle c; returns (all of them ranked, the
    n_blocks best x every c: the teachers the judge measures)."""
    mid = sorted(coefficients)[len(coefficients) // 2]
    ranked = sorted(first_token_selectivity(model, r, candidates, [mid], harmful_val, harmless_val, refusal_ids),
                    key=lambda t: -t["first_token_selectivity"])
    return ranked, [{"position": t["position"], "layer": t["layer"], "coefficient": c}
                    for t in ranked[:n_blocks] for c in coefficients]


@torch.no_grad()
def teacher_selectivity(model, tok, r, teachers: list[dict], harmful: list[str], harmless: list[str],
                        max_tokens: int = 32) -> list[dict]:
    """Each teacher (position, layer, coefficient) measured as it will teach: greedy refusal (the judge) on
    harmful and harmless validation prompts. selectivity = refusal(harmful) - refusal(harmless): a teacher that
    refuses everything teaches over-refusal."""
    ids, mask = encode_chats(tok, harmful + harmless, device=next(model.parameters()).device)  # one batch: fewer steps
    kw = dict(temperature=0, stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
    out = []
    for t in tqdm(teachers, desc="measuring teachers", unit="teacher"):
        vec = r[r.shape[0] + t["position"], t["layer"]].float()
        with add_vector(model, t["layer"], vec, t["coefficient"]):
            texts = decode_completions(tok, *sample(model, ids, mask, max_tokens, **kw))
        rates = refusal_rate(texts[:len(harmful)]), refusal_rate(texts[len(harmful):])
        out.append({**t, "refusal_harmful": rates[0], "refusal_harmless": rates[1], "selectivity": rates[0] - rates[1]})
    return out


def best_teacher(grid: list[dict]) -> dict:
    """Highest selectivity; ties go to less harmless refusal, then the smaller c."""
    return max(grid, key=lambda g: (round(g["selectivity"], 9), -g["refusal_harmless"], -g["coefficient"]))


def filter_by_score(model, batches: PromptBatches, prompts: list[str], refusal_ids, keep_refused: bool):
    scores = refusal_score(batches.last_logits(model), refusal_ids)
    return [p for p, s in zip(prompts, scores.tolist()) if (s > 0) == keep_refused]


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    seed_everything(args.seed)
    t0 = time.time()
    harmful = read_prompts(args.harmful, args.n_train, args.seed)  # inputs first: a bad file leaves no output
    harmless = read_prompts(args.harmless, args.n_train, args.seed)
    harmful_val = read_prompts(args.harmful_val, args.n_val, args.seed)
    harmless_val = read_prompts(args.harmless_val, args.n_val, args.seed)
    out = prepare_out_dir(args.out, OUTPUTS, args.overwrite)
    model, tok = load_model(args.model, device, chat_template=args.chat_template, device_map=args.device_map)
    harmful, harmless, harmful_val, harmless_val = (
        truncate_prompts(tok, ps, args.max_prompt_tokens, src) for ps, src in
        ((harmful, args.harmful), (harmless, args.harmless), (harmful_val, args.harmful_val),
         (harmless_val, args.harmless_val)))
    n_layers = len(decoder_layers(model))
    post = post_instruction_ids(tok)
    pos_names = [tok.decode([i]) for i in post]
    refusal_ids = refusal_token_ids(tok, args.refusal_tokens)
    print(f"model {args.model}: {n_layers} layers, hidden {model.config.hidden_size}; "
          f"post-instruction tokens {pos_names}")
    print(f"refusal tokens R: {[tok.decode([i]) for i in refusal_ids]} (ids {refusal_ids})")
    n_pos = 1 if args.kind == "response" else len(post)
    if args.layer is not None and not (0 <= args.layer < n_layers and -n_pos <= args.position < 0):
        raise UserError(f"--layer must be in 0..{n_layers - 1} and --position in -{n_pos}..-1")

    bs = args.batch_size
    enc = lambda prompts: PromptBatches(tok, prompts, bs, device)
    if args.filter:  # authors' option: keep only prompts the base model already treats the "right" way
        harmful = filter_by_score(model, enc(harmful), harmful, refusal_ids, keep_refused=True)
        harmless = filter_by_score(model, enc(harmless), harmless, refusal_ids, keep_refused=False)
        print(f"--filter kept {len(harmful)} harmful and {len(harmless)} harmless prompts")
        if not harmful or not harmless:
            raise UserError("--filter left an empty prompt set (the model refuses none of the harmful prompts?)")

    if args.kind == "response":
        r = response_directions(model, tok, harmful, args.refusal_text, args.comply_text, bs)  # [1, L, hidden]
        pos_names = ["<response mean>"]
    else:
        r = candidate_directions(model, enc(harmful), enc(harmless), n_pos)  # [n_pos, L, hidden] float64
    if args.layer is not None:
        cands = [(n_pos + args.position, args.layer)]
    else:
        cands = [(p, l) for p in range(n_pos) for l in range(n_layers)]
    # A candidate whose r is exactly zero (the prompt direction at block 0: both means are the same template
    # tokens' embeddings) has nothing to add or ablate, and its scores would be NaN: skip it, and say so.
    skipped = [{"position": p - n_pos, "layer": l, "reason": "zero direction"} for p, l in cands if not r[p, l].any()]
    cands = [(p, l) for p, l in cands if r[p, l].any()]
    if not cands:
        raise UserError("every candidate direction is zero (identical harmful and harmless activations)")
    hv, sv = enc(harmless_val), enc(harmful_val)
    base_scores = {"harmful_val": refusal_score(sv.last_logits(model), refusal_ids).mean().item(),
                   "harmless_val": refusal_score(hv.last_logits(model), refusal_ids).mean().item()}
    t_grid = time.time()
    grid = ranked = None
    if args.teacher_grid:
        # The teacher is chosen by how selectively it refuses (ours): every block below the cut-off (or the one
        # --layer forces) is ranked by first-token selectivity, the best --grid-blocks x every c are measured.
        # The ablation scores do not enter (they bound what removing r does, not what adding c·r does to a
        # teacher, which the judge's harmless refusals measure); the chosen candidate is scored below.
        blocks = [{"position": p - n_pos, "layer": l} for p, l in cands
                  if args.layer is not None or l < args.max_layer_frac * n_layers]
        if not blocks:
            raise UserError(f"no candidate block below {args.max_layer_frac} L for --teacher-grid")
        ranked, top = rank_blocks(model, r, blocks, args.teacher_grid, sv, hv, refusal_ids, args.grid_blocks)
        grid = teacher_selectivity(model, tok, r, top, harmful_val, harmless_val, args.grid_tokens)
        choice = best_teacher(grid)
        cands = [(n_pos + choice["position"], choice["layer"])]
    t_grid, t_score = time.time() - t_grid, time.time()
    rows = score_candidates(model, r, cands, sv, hv, refusal_ids, pos_names)
    t_score = time.time() - t_score
    coefficient = args.coefficient
    if grid:
        best, coefficient = rows[0], choice["coefficient"]
        rule = "forced+selectivity" if args.layer is not None else "selectivity"
    elif args.layer is not None:
        best, rule = rows[0], "forced"
    else:
        best, rule = select_direction(rows, n_layers, args.max_layer_frac, args.kl_max)
    p_idx = n_pos + best["position"]
    vec = r[p_idx, best["layer"]].float()

    check = steering_check(model, tok, vec, best["layer"], coefficient, harmful_val[:args.check_prompts],
                           args.check_tokens) if args.check_prompts else None
    meta = {
        "model": args.model, "layer": best["layer"], "position": best["position"], "position_token": best["token"],
        "coefficient": coefficient, "teacher_grid": grid and choice, "norm": vec.norm().item(),
        "hidden_size": model.config.hidden_size,
        "n_layers": n_layers, "kind": args.kind, "selection_rule": rule, "fallback_used": rule.startswith("fallback"),
        "scores": {k: best[k] for k in ("bypass", "induce", "kl")}, "base_refusal_scores": base_scores,
        "refusal_tokens": [tok.decode([i]) for i in refusal_ids], "refusal_token_ids": refusal_ids,
        "filter": args.filter, "max_layer_frac": args.max_layer_frac, "kl_max": args.kl_max,
        "response_texts": {"refusal": args.refusal_text, "comply": args.comply_text} if args.kind == "response" else None,
        "data": {"harmful": args.harmful, "harmless": args.harmless, "harmful_val": args.harmful_val,
                 "harmless_val": args.harmless_val, "n_harmful": len(harmful), "n_harmless": len(harmless),
                 "n_harmful_val": len(harmful_val), "n_harmless_val": len(harmless_val)},
        "steering_check": None if check is None else {k: check[k] for k in ("refusal_rate_base", "refusal_rate_steered")},
        "seed": args.seed, "seconds": {"total": time.time() - t0, "scoring": t_score, "n_candidates": len(rows),
                                             "teacher_grid": t_grid},
        **run_info(),
    }
    save_tensors(out / "direction.safetensors", {"direction": vec})
    write_json(out / "candidates.json", {"n_layers": n_layers, "positions": pos_names, "base_refusal_scores": base_scores,
                                         "candidates": rows, "skipped": skipped,
                                         "teachers_ranked": ranked, "teachers": grid})
    if check is not None:
        write_json(out / "steering_check.json", check)
    write_json(out / "direction.json", meta)

    print(f"chosen: layer {best['layer']}, position {best['position']} ({best['token']!r}), rule {rule}; "
          f"bypass {best['bypass']:.3f}, induce {best['induce']:.3f}, kl {best['kl']:.4f}, |r| {meta['norm']:.2f}")
    for g in grid or []:
        print(f"  teacher block {g['layer']}, c = {g['coefficient']}: refuses {g['refusal_harmful']:.0%} harmful_val, "
              f"{g['refusal_harmless']:.0%} harmless_val, selectivity {g['selectivity']:+.0%}")
    print(f"base refusal score: harmful_val {base_scores['harmful_val']:.3f}, harmless_val {base_scores['harmless_val']:.3f}")
    if check is not None:
        print(f"steering check ({len(check['samples'])} harmful_val prompts, greedy): refusal "
              f"{check['refusal_rate_base']:.0%} base -> {check['refusal_rate_steered']:.0%} steered (c = {coefficient})")
    print((f"teacher grid in {t_grid:.0f} s; " if grid else "")
          + f"scored {len(rows)} candidates in {t_score:.0f} s; total {time.time() - t0:.0f} s")
    print(f"wrote {out / 'direction.safetensors'}, {out / 'direction.json'}, {out / 'candidates.json'}"
          + (f", {out / 'steering_check.json'}" if check is not None else ""))


if __name__ == "__main__":
    run_cli(main)
