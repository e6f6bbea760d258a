"""Does the steered teacher πt = π0 + c·r actually refuse? A sweep over layers and coefficients.

For each (layer, position) candidate r[p, l] of Stage 1 and each coefficient c, greedy completions of the
harmful and harmless validation prompts are judged by the project's substring judge. A teacher worth distilling
refuses harmful prompts much more often than harmless ones.

Usage:
    python results/teacher_sweep.py > results/teacher_sweep.txt
    python results/teacher_sweep.py --kind response --layers 12 14 16 18 20 --coefficients 0.5 0.75 1 2 \
        > results/teacher_sweep_response.txt
    python results/teacher_sweep.py --layers 14 18 --coefficients 1 2 --tokens 32
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import chat  # noqa: E402
import metrics  # noqa: E402
import steering  # noqa: E402
from directions import PromptBatches, candidate_directions, response_directions  # noqa: E402
from extract_direction import COMPLY_TEXT, REFUSAL_TEXT  # noqa: E402


def refusal_rate(model, tok, prompts, layer, vec, c, tokens):
    texts = []
    for i in range(0, len(prompts), 16):
        ids, mask = chat.encode_chats(tok, prompts[i:i + 16])
        with steering.add_vector(model, layer, vec, c):
            comp, cm = steering.sample(model, ids, mask, tokens, temperature=0, stop_ids=chat.stop_token_ids(tok),
                                     pad_id=tok.pad_token_id)
        texts += steering.decode_completions(tok, comp, cm)
    return sum(map(metrics.is_refusal, texts)) / len(texts), texts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[10, 12, 14, 16, 18, 20])
    p.add_argument("--kind", choices=["prompt", "response"], default="prompt", help="as extract_direction.py --kind")
    p.add_argument("--position", type=int, default=-1)
    p.add_argument("--coefficients", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    model, tok = common.load_model(a.model)
    post = chat.post_instruction_ids(tok)
    read = lambda n: common.read_prompts(common.data_file(n))
    if a.kind == "response":
        r = response_directions(model, tok, read("harmful_train"), REFUSAL_TEXT, COMPLY_TEXT, 16)
        n_pos = 1
    else:
        r = candidate_directions(model, PromptBatches(tok, read("harmful_train"), 16, "cpu"),
                                 PromptBatches(tok, read("harmless_train"), 16, "cpu"), len(post))
        n_pos = len(post)
    hv, sv = read("harmful_val"), read("harmless_val")
    print(f"model {a.model}; r = Stage 1 --kind {a.kind}, position {a.position}; greedy, {a.tokens} tokens; "
          f"refusal = metrics.is_refusal on {len(hv)} harmful_val / {len(sv)} harmless_val prompts\n")
    base_h = refusal_rate(model, tok, hv, 0, torch.zeros(model.config.hidden_size), 0.0, a.tokens)[0]
    base_s = refusal_rate(model, tok, sv, 0, torch.zeros(model.config.hidden_size), 0.0, a.tokens)[0]
    print(f"base (no steering): harmful {base_h:.2f}  harmless {base_s:.2f}\n")
    print(f"{'layer':>5} {'c':>4} {'harmful':>8} {'harmless':>9}  first harmful completion")
    for layer in a.layers:
        vec = r[n_pos + a.position, layer].float()
        for c in a.coefficients:
            h, texts = refusal_rate(model, tok, hv, layer, vec, c, a.tokens)
            s, _ = refusal_rate(model, tok, sv, layer, vec, c, a.tokens)
            print(f"{layer:>5} {c:>4.2f} {h:>8.2f} {s:>9.2f}  {texts[0][:60]!r}", flush=True)


if __name__ == "__main__":
    main()
