"""Does the steered teacher πt = π0 + c·r actually refuse? A sweep over blocks and coefficients.

Builds Stage 1's direction (`--kind prompt`: harmful - harmless prompts at the post-instruction positions, the
paper's; `--kind response`: prefilled refusal - compliance, ours) from the training prompts, then for each
block l and coefficient c decodes greedy answers to the harmful and harmless validation prompts with c·r added
at block l, and judges them with the project's judge (metrics.is_refusal). A teacher worth distilling refuses
harmful prompts much more often than harmless ones. Stage 1's --teacher-grid makes this choice automatically;
this table shows the whole grid, e.g. to see whether a new model's direction makes a refusing teacher at all.

Reads   data/harmful_train, harmless_train (the direction), harmful_val, harmless_val (the judge)
Prints  one line per (block, c): refusal of harmful_val and harmless_val, and the first harmful answer

Usage:
    python -m experiments.teacher_sweep > results/teacher_sweep.txt
    python -m experiments.teacher_sweep --kind response --layers 14 16 18 20 --coefficients 0.5 0.75 1 \\
        --max-new-tokens 24 > results/teacher_sweep_response.txt
    python -m experiments.teacher_sweep --model /models/Qwen3-4B-Instruct-2507 --layers 12 18 24 \
        --coefficients 1 2
"""
from __future__ import annotations


from safesteer.chat import encode_chats, post_instruction_ids, stop_token_ids
from safesteer.cli import Parser, add_renamed, non_negative_int, positive_int, run_cli
from safesteer.errors import UserError
from safesteer.files import data_file, read_prompts
from safesteer.hooks import add_vector, decoder_layers
from safesteer.models import BUNDLED_MODEL, load_model
from safesteer.sampling import decode_completions, sample

BATCH = 16  # prompts per greedy batch and per forward of the means


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help="'smollm2-135m' (bundled), a local transformers directory, or a hub id")
    p.add_argument("--kind", choices=["prompt", "response"], default="prompt",
                   help="as extract_direction.py --kind")
    p.add_argument("--layers", type=non_negative_int, nargs="+", default=[10, 12, 14, 16, 18, 20],
                   help="blocks l to steer at")
    p.add_argument("--position", type=int, default=-1,
                   help="--kind prompt: the post-instruction position of r (negative, -1 = the last)")
    p.add_argument("--coefficients", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0], help="values of c")
    add_renamed(p, "--tokens", "--max-new-tokens", type=positive_int, default=32,
                       help="greedy tokens per answer")
    p.add_argument("--n-train", type=positive_int, default=128,
                   help="at most this many prompts per training set, for the direction (as Stage 1)")
    p.add_argument("--n-val", type=positive_int, default=32,
                   help="at most this many harmful_val and harmless_val prompts to judge (as Stage 1)")
    return p.parse_args(argv)


def directions(model, tok, kind: str, harmful: list[str], harmless: list[str]):
    """Stage 1's candidates r [positions, L, hidden] (float64) and the number of positions (1 for
    response)."""
    from safesteer.directions import PromptBatches, candidate_directions, response_directions
    from extract_direction import COMPLY_TEXT, REFUSAL_TEXT
    if kind == "response":
        return response_directions(model, tok, harmful, REFUSAL_TEXT, COMPLY_TEXT, BATCH), 1
    n_pos = len(post_instruction_ids(tok))
    return candidate_directions(model, PromptBatches(tok, harmful, BATCH, "cpu"),
                                PromptBatches(tok, harmless, BATCH, "cpu"), n_pos), n_pos


def refusal_rate(model, tok, prompts: list[str], layer: int, vec, c: float, max_new_tokens: int):
    """Greedy answers with c·vec added at block `layer`, and the share the judge calls refusals."""
    from safesteer import metrics
    texts = []
    for i in range(0, len(prompts), BATCH):
        ids, mask = encode_chats(tok, prompts[i:i + BATCH])
        with add_vector(model, layer, vec, c):
            comp, cm = sample(model, ids, mask, max_new_tokens, temperature=0,
                                       stop_ids=stop_token_ids(tok), pad_id=tok.pad_token_id)
        texts += decode_completions(tok, comp, cm)
    return sum(map(metrics.is_refusal, texts)) / len(texts), texts


def sweep(model, tok, r, n_pos: int, position: int, layers, coefficients, harmful_val, harmless_val,
          max_new_tokens: int) -> list[dict]:
    """One row per (layer, c): refusal of the harmful and the harmless prompts, and the first harmful
    answer."""
    rows = []
    for layer in layers:
        vec = r[n_pos + position, layer].float()  # [hidden]
        for c in coefficients:
            h, texts = refusal_rate(model, tok, harmful_val, layer, vec, c, max_new_tokens)
            s, _ = refusal_rate(model, tok, harmless_val, layer, vec, c, max_new_tokens)
            rows.append({"layer": layer, "coefficient": c, "harmful": h, "harmless": s, "first": texts[0]})
    return rows


def main(argv=None):
    a = parse_args(argv)
    import torch
    model, tok = load_model(a.model)
    read = lambda name, n: read_prompts(data_file(name), n)
    harmful, harmless = read("harmful_train", a.n_train), read("harmless_train", a.n_train)
    hv, sv = read("harmful_val", a.n_val), read("harmless_val", a.n_val)
    n_layers = len(decoder_layers(model))
    if max(a.layers) >= n_layers:
        raise UserError(f"--layers: the model has blocks 0..{n_layers - 1}")
    r, n_pos = directions(model, tok, a.kind, harmful, harmless)
    if not -n_pos <= a.position <= -1:
        raise UserError(f"--position must be in -{n_pos}..-1 for --kind {a.kind}")
    print(f"model {a.model}; r = Stage 1 --kind {a.kind}, position {a.position}; "
          f"greedy, {a.max_new_tokens} tokens; "
          f"refusal = metrics.is_refusal on {len(hv)} harmful_val / {len(sv)} harmless_val prompts\n")
    zero = torch.zeros(model.config.get_text_config().hidden_size)
    base_h = refusal_rate(model, tok, hv, 0, zero, 0.0, a.max_new_tokens)[0]
    base_s = refusal_rate(model, tok, sv, 0, zero, 0.0, a.max_new_tokens)[0]
    print(f"base (no steering): harmful {base_h:.2f}  harmless {base_s:.2f}\n")
    print(f"{'layer':>5} {'c':>4} {'harmful':>8} {'harmless':>9}  first harmful completion")
    for row in sweep(model, tok, r, n_pos, a.position, a.layers, a.coefficients, hv, sv, a.max_new_tokens):
        print(f"{row['layer']:>5} {row['coefficient']:>4.2f} {row['harmful']:>8.2f} {row['harmless']:>9.2f}  "
              f"{row['first'][:60]!r}", flush=True)


if __name__ == "__main__":
    run_cli(main)
