"""Stage 2 of SafeSteer: the steered teacher πt and the sparse set S of safety tokens.

The teacher is the base model with Stage 1's hook: πt = π0 + c·r added at the input of block l*, at every
position. We sample M continuations of H tokens per prompt from πt, teacher-force each through πt and π0, and
at every valid continuation position compare the two next-token distributions over the whole vocabulary V:

    Δ(v)  = log πt(v) - log π0(v)                  contrastive log-probability   (--score delta, authors')
    κ(v)  = πt(v) · Δ(v)                            v's term of KL(πt || π0)       (--score kl, ours)

Δ alone favours rare tokens with large ratios; κ weighs each ratio by how much mass the teacher puts there.
Aggregation: each position votes for its top K' tokens by score, and S = the k tokens with most votes
(--aggregate vote), or S = the top k by mean score (--aggregate mean). Special tokens, positions after the
end of turn, and tokens whose mean πt probability is below a floor are never eligible.

Coverage: the share of the teacher's total-variation shift Σ_v |πt(v) - π0(v)| that falls on S, averaged over
positions; reported on the selection prompts and on harmful_val. It says how much of the teacher S can carry.

Reads   OUT/direction.safetensors + direction.json (Stage 1), a prompt file (default data/harmful_train)
Writes  OUT/safety_tokens.json   token_ids, tokens, votes, mean_delta, coverage, settings, vocabulary hash

Usage:
    python select_tokens.py --out runs/demo
    python select_tokens.py --out runs/x --score delta --prompts data/harmless_val.jsonl   # the authors' rule
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from safesteer.chat import encode_chats, special_token_ids, stop_token_ids, tokenizer_fingerprint
from safesteer.cli import (Parser, add_common_args, add_renamed, finite_float, non_negative_float,
                           pick_device, positive_int, run_cli, seed_everything)
from safesteer.errors import UserError
from safesteer.files import data_file, prepare_out_dir, read_prompts, run_info, truncate_prompts, write_json
from safesteer.models import check_lengths, load_model
from safesteer.sampling import sample
from safesteer.teacher import Teacher, load_teacher
from safesteer.forcing import completion_logits

OUTPUTS = ["safety_tokens.json"]
BATCH_SIZE = 32  # --batch-size: the batches, and so the draws, that select_again repeats


@dataclass(frozen=True)
class Selection:
    """How S is chosen from the teacher's samples; the command line's defaults are these."""
    score: str = "kl"           # delta: rank by Δ (authors'); kl: by πt·Δ (ours)
    aggregate: str = "vote"     # vote: each position votes for its top K' (paper); mean: the top mean score
    k: int = 50                 # |S| (paper: 50)
    k_vote: int = 200           # K' (paper: 200)
    prob_floor: float = 1e-6    # tokens whose mean πt probability is below this are never eligible


def build_parser() -> Parser:
    p = Parser(__doc__)
    paper = p.add_argument_group("the paper's recipe")
    paper.add_argument("--samples", type=positive_int, default=8, help="M: samples per prompt (paper: 8)")
    add_renamed(paper, "--horizon", "--max-new-tokens", type=positive_int, default=8,
                help="H, the paper's horizon: tokens per teacher continuation (paper: 8)")
    paper.add_argument("--k", type=positive_int, default=Selection.k, help="|S| (paper: 50)")
    paper.add_argument("--k-vote", type=positive_int, default=Selection.k_vote,
                       help="K': tokens each position votes for (paper: 200)")
    paper.add_argument("--prob-floor", type=non_negative_float, default=Selection.prob_floor,
                       help="drop tokens whose mean πt prob is below this")
    paper.add_argument("--coefficient", type=finite_float,
                       help="c in πt = π0 + c·r (default: from direction.json)")
    authors = p.add_argument_group("the authors' variants")
    authors.add_argument("--teacher", choices=["hook", "prompt"], default="hook",
                         help="hook: π0 + c·r (the method); prompt: π0 with a safety system prompt")
    authors.add_argument("--aggregate", choices=["vote", "mean"], default=Selection.aggregate,
                         help="vote: S = the most-voted tokens (paper); mean: S = the top k by mean score")
    ours = p.add_argument_group("ours")
    ours.add_argument("--score", choices=["delta", "kl"], default=Selection.score,
                      help="rank tokens by Δ (authors') or πt·Δ (ours)")
    ours.add_argument("--contrast",
                      help="a second prompt set (e.g. harmless): rank tokens by their vote share (or mean "
                           "score) on --prompts minus on this set, so S keeps what is specific to --prompts "
                           "(default: none)")
    ours.add_argument("--coverage-prompts", default=str(data_file("harmful_val")),
                      help="second prompt set on which the coverage of S is reported")
    # Default prompts and score differ from the authors' (harmless_val, delta): on the bundled model their S
    # held rare topical tokens with 0.0-0.3% of the teacher's shift; πt·Δ on harmful prompts holds 19-24%.
    data = p.add_argument_group("data")
    data.add_argument("--prompts", default=str(data_file("harmful_train")),
                      help="selection prompts (authors: harmless_val; ours: the distillation prompts)")
    data.add_argument("--n-prompts", type=positive_int, default=32,
                      help="at most this many prompts of each set")
    data.add_argument("--direction",
                      help="Stage 1's direction.safetensors (default: OUT/direction.safetensors)")
    run = p.add_argument_group("model and run")
    add_common_args(run, device_map=True)
    run.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help="sequences per forward pass")
    run.add_argument("--overwrite", action="store_true", help="replace this stage's outputs in --out")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# ----------------------------------------------------------------------------- the paper's method

@torch.no_grad()
def teacher_samples(model, tok, teacher: Teacher, prompts, m: int, h: int, batch_size: int,
                    gen) -> list[dict]:
    """M continuations of H tokens per prompt from πt at temperature 1. One dict per batch of sequences."""
    rows = [p for p in prompts for _ in range(m)]
    batches = []
    for i in tqdm(range(0, len(rows), batch_size), desc="sampling from the teacher", unit="batch"):
        chunk = rows[i:i + batch_size]
        ids, mask = teacher.encode(tok, chunk, device=model.device)
        with teacher.steer():
            comp, comp_mask = sample(model, ids, mask, h, temperature=1.0, generator=gen,
                                     stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
        batches.append({"prompts": chunk, "comp": comp, "comp_mask": comp_mask})
    return batches


@torch.no_grad()
def teacher_and_base_logprobs(model, tok, teacher: Teacher, batch: dict):
    """Teacher-force one batch through πt and π0. Returns log πt, log π0 at valid positions: [n_valid, V]."""
    ids_t, mask_t = teacher.encode(tok, batch["prompts"], device=model.device)
    ids_0, mask_0 = encode_chats(tok, batch["prompts"], device=model.device)
    with teacher.steer():
        lt = completion_logits(model, ids_t, mask_t, batch["comp"]).float()  # [b, H, V]
    l0 = completion_logits(model, ids_0, mask_0, batch["comp"]).float()
    valid = batch["comp_mask"].bool()  # through the first end of turn, inclusive
    return torch.log_softmax(lt[valid], -1), torch.log_softmax(l0[valid], -1)


def contrastive_logprobs(log_pt: torch.Tensor, log_p0: torch.Tensor) -> torch.Tensor:
    """Δ(v) = log πt(v) - log π0(v) at every position: [n, V]."""
    return log_pt - log_p0


def eligible_tokens(mean_pt: torch.Tensor, special_ids: list[int], vocab_size: int,
                    floor: float) -> torch.Tensor:
    """Tokens that may enter S: not special, in the tokenizer's vocabulary, mean πt above the floor: [V]."""
    ok = mean_pt >= floor
    ok[[i for i in special_ids if i < ok.numel()]] = False
    ok[vocab_size:] = False  # padded embedding rows beyond the tokenizer
    return ok


def vote(scores: torch.Tensor, eligible: torch.Tensor, k_vote: int, k: int):
    """Each position votes for its top K' eligible tokens; S = the k most-voted (votes > 0).

    scores: [n, V] -> (token ids [<= k], votes [V]). Ties in votes break by token id (stable sort).
    """
    masked = scores.masked_fill(~eligible, float("-inf"))
    k_vote = min(k_vote, int(eligible.sum()))
    top = masked.topk(k_vote, dim=-1).indices  # [n, K']
    votes = torch.bincount(top.flatten(), minlength=scores.shape[-1])
    order = torch.sort(votes, descending=True, stable=True).indices
    chosen = order[:k]
    return chosen[votes[chosen] > 0], votes


# ----------------------------------------------------------------------------- --aggregate mean (authors')

def mean_aggregate(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """S = the k eligible tokens with the highest mean score over positions."""
    mean = scores.mean(0).masked_fill(~eligible, float("-inf"))
    return mean.topk(min(k, int(eligible.sum()))).indices


# ----------------------------------------------------------------------------- ours: --score kl, coverage

def token_scores(log_pt: torch.Tensor, log_p0: torch.Tensor, rule: str) -> torch.Tensor:
    """The ranking score per (position, token): Δ (authors') or πt·Δ (ours, v's share of KL(πt || π0))."""
    delta = contrastive_logprobs(log_pt, log_p0)
    return delta if rule == "delta" else log_pt.exp() * delta


def tv_shift(log_pt: torch.Tensor, log_p0: torch.Tensor) -> torch.Tensor:
    """|πt(v) - π0(v)| at every position: [n, V]."""
    return (log_pt.exp() - log_p0.exp()).abs()


def coverage(shift: torch.Tensor, s_ids: torch.Tensor) -> torch.Tensor:
    """Per position, the share of the teacher's shift Σ_v |πt(v) - π0(v)| that falls on S: [n, V] -> [n]."""
    return shift[:, s_ids].sum(-1) / shift.sum(-1).clamp_min(1e-12)


def mean_coverage(model, tok, teacher, batches, s_ids) -> float:
    shares = [coverage(tv_shift(*teacher_and_base_logprobs(model, tok, teacher, b)), s_ids) for b in batches]
    return torch.cat(shares).mean().item()


# ----------------------------------------------------------------------------- S from the teacher's samples

def position_scores(model, tok, teacher, batches, rule: str):
    """Scores and the teacher's shift (for coverage, so πt and π0 run once) of every valid position, plus mean
    πt and mean Δ per token. Keeps two [n_valid, V] tensors in memory."""
    all_scores, shifts, sum_pt, sum_delta, n = [], [], 0, 0, 0
    for batch in tqdm(batches, desc="teacher-forcing πt and π0", unit="batch"):
        log_pt, log_p0 = teacher_and_base_logprobs(model, tok, teacher, batch)
        all_scores.append(token_scores(log_pt, log_p0, rule))
        shifts.append(tv_shift(log_pt, log_p0))
        sum_pt = sum_pt + log_pt.exp().sum(0)
        sum_delta = sum_delta + contrastive_logprobs(log_pt, log_p0).sum(0)
        n += log_pt.shape[0]
    if n == 0:
        raise UserError("the teacher's samples hold no valid positions")
    return torch.cat(all_scores), torch.cat(shifts), sum_pt / n, sum_delta / n  # [n, V], [n, V], [V], [V]


def select(model, tok, teacher, batches, rule: Selection = Selection(), contrast_batches=None) -> dict:
    """S from the teacher's samples; with contrast_batches (ours), from the difference to another set."""
    scores, shift, mean_pt, mean_delta = position_scores(model, tok, teacher, batches, rule.score)
    eligible = eligible_tokens(mean_pt, special_token_ids(tok), len(tok), rule.prob_floor)
    if contrast_batches is None:
        if rule.aggregate == "vote":
            s_ids, votes = vote(scores, eligible, rule.k_vote, rule.k)
        else:
            s_ids = mean_aggregate(scores, eligible, rule.k)
            votes = torch.zeros(scores.shape[-1], dtype=torch.long)
    else:
        c_scores = position_scores(model, tok, teacher, contrast_batches, rule.score)[0]
        if rule.aggregate == "vote":  # vote shares, so that sets of different sizes compare
            votes = vote(scores, eligible, rule.k_vote, rule.k)[1]
            rank = votes / len(scores) - vote(c_scores, eligible, rule.k_vote, rule.k)[1] / len(c_scores)
        else:
            votes = torch.zeros(scores.shape[-1], dtype=torch.long)
            rank = scores.mean(0) - c_scores.mean(0)
        rank = rank.masked_fill(~eligible, float("-inf"))
        s_ids = rank.topk(min(rule.k, int(eligible.sum()))).indices
        s_ids = s_ids[rank[s_ids] > 0]
    return {"ids": s_ids, "votes": votes, "mean_delta": mean_delta, "mean_score": scores.mean(0),
            "coverage": coverage(shift, s_ids).mean().item(), "n_positions": scores.shape[0],
            "n_eligible": int(eligible.sum())}


def select_again(model, tok, teacher: Teacher, settings: dict, prompts: list[str]) -> dict:
    """S selected again by this stage's rule as safety_tokens.json records it (score, aggregate, k, K', floor,
    M samples of H tokens from πt, drawn from the recorded seed), πt against `model` without the hook: the
    authors' teacher schedule calls it in Stage 3 (distill.py hands it to safesteer.scale.schedule)."""
    rule = Selection(settings["score"], settings["aggregate"], settings["k"], settings["k_vote"],
                     settings["prob_floor"])
    gen = torch.Generator().manual_seed(settings["seed"])  # what seed_everything hands the sampler here
    batches = teacher_samples(model, tok, teacher, prompts, settings["samples"], settings["horizon"],
                              BATCH_SIZE, gen)
    return select(model, tok, teacher, batches, rule)


# ----------------------------------------------------------------------------- the run

def recorded_settings(args, n_prompts: int, coefficient: float, direction: str, layer: int) -> dict:
    """The command line as safety_tokens.json records it, with what the teacher resolved to."""
    return {"teacher": args.teacher, "score": args.score, "aggregate": args.aggregate, "k": args.k,
            "k_vote": args.k_vote, "samples": args.samples, "horizon": args.max_new_tokens,
            "prob_floor": args.prob_floor, "prompts": args.prompts, "n_prompts": n_prompts,
            "contrast": args.contrast, "coverage_prompts": args.coverage_prompts, "coefficient": coefficient,
            "direction": direction, "layer": layer, "seed": args.seed}


def safety_tokens_json(sel: dict, cov: dict, tok, model, settings: dict, name: str, t0: float) -> dict:
    """safety_tokens.json: S with its votes and mean Δ, its coverage, and what it was made with and for."""
    s_ids = sel["ids"]
    ids = s_ids.tolist()
    return {"token_ids": ids, "tokens": [tok.decode([i]) for i in ids], "votes": sel["votes"][s_ids].tolist(),
            "mean_delta": sel["mean_delta"][s_ids].tolist(), "mean_score": sel["mean_score"][s_ids].tolist(),
            "coverage": cov, "vocab_size": len(tok), "model_vocab_size": model.config.vocab_size,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok), "settings": settings,
            "n_positions": sel["n_positions"], "n_eligible": sel["n_eligible"], "model": name,
            "seconds": time.time() - t0, **run_info()}


def print_summary(result: dict, path, t0: float) -> None:
    ids, cov, settings = result["token_ids"], result["coverage"], result["settings"]
    print(f"S: {len(ids)} tokens from {result['n_positions']} positions ({result['n_eligible']} eligible "
          f"tokens), score {settings['score']}, aggregate {settings['aggregate']}")
    print(f"{'token':>16} {'votes':>6} {'mean Δ':>8}")
    for t, v, d in list(zip(result["tokens"], result["votes"], result["mean_delta"]))[:20]:
        print(f"{t!r:>16} {v:>6} {d:>8.3f}")
    if len(ids) > 20:
        print(f"{'...':>16} ({len(ids) - 20} more in the file)")
    print(f"coverage of the teacher's shift (TV share on S): "
          f"selection prompts {cov['selection_prompts']:.1%}, harmful_val {cov['harmful_val']:.1%}")
    print(f"took {time.time() - t0:.0f} s; wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    gen = seed_everything(args.seed)
    t0 = time.time()
    prompts = read_prompts(args.prompts, args.n_prompts, args.seed)
    cov_prompts = read_prompts(args.coverage_prompts, args.n_prompts, args.seed)
    out = prepare_out_dir(args.out, OUTPUTS, args.overwrite)
    model, tok = load_model(args.model, device, chat_template=args.chat_template, device_map=args.device_map)
    check_lengths(model, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    prompts = truncate_prompts(tok, prompts, args.max_prompt_tokens, args.prompts)
    cov_prompts = truncate_prompts(tok, cov_prompts, args.max_prompt_tokens, args.coverage_prompts)
    direction = args.direction or out / "direction.safetensors"
    teacher, dmeta = load_teacher(model, direction, args.teacher, args.coefficient)
    print(f"teacher: {teacher.describe()}")
    draw = functools.partial(teacher_samples, model, tok, teacher, m=args.samples, h=args.max_new_tokens,
                             batch_size=args.batch_size, gen=gen)
    batches = draw(prompts)
    contrast = None
    if args.contrast:
        c_prompts = read_prompts(args.contrast, args.n_prompts, args.seed)
        contrast = draw(truncate_prompts(tok, c_prompts, args.max_prompt_tokens, args.contrast))
    rule = Selection(args.score, args.aggregate, args.k, args.k_vote, args.prob_floor)
    sel = select(model, tok, teacher, batches, rule, contrast_batches=contrast)
    cov_batches = draw(cov_prompts)
    cov = {"selection_prompts": sel["coverage"],
           "harmful_val": mean_coverage(model, tok, teacher, cov_batches, sel["ids"])}
    settings = recorded_settings(args, len(prompts), teacher.coefficient, str(direction), dmeta["layer"])
    result = safety_tokens_json(sel, cov, tok, model, settings, args.model, t0)
    path = write_json(out / "safety_tokens.json", result)
    print_summary(result, path, t0)


if __name__ == "__main__":
    run_cli(main)
