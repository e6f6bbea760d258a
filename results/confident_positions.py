"""How often does Stage 3's teacher put almost no mass on R = V \\ S? (The positions where `collapsed` computed by
subtraction, log(1 - Σ_S q), was wrong.)

Samples the demo's Stage 3 positions (every step's 4 prompts x 4 samples x 48 tokens, seed 0) from a student
(default: π0, i.e. step 0), teacher-forces them through the demo's teacher, and counts positions with q(R) below
1e-4 and 1e-5, with the largest error of the old formula's log q(R) there. Prints one JSON line.

Usage:
    python results/confident_positions.py --run runs/demo
    python results/confident_positions.py --run runs/demo --student runs/demo/student
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distill  # noqa: E402
from chat import encode_chats, stop_token_ids  # noqa: E402
from common import data_file, load_model, read_prompts, seed_everything  # noqa: E402
from steering import completion_logits, load_teacher, sample  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="run directory with Stage 1 and 2 outputs")
    p.add_argument("--student", default="smollm2-135m", help="the model that samples (default: π0)")
    args = p.parse_args()
    run = Path(args.run)
    student, tok = load_model(args.student)
    base, _ = load_model("smollm2-135m")
    teacher, _ = load_teacher(base, run / "direction.safetensors")
    s = torch.tensor(json.loads((run / "safety_tokens.json").read_text())["token_ids"])
    in_s = torch.zeros(base.config.get_text_config().vocab_size, dtype=torch.bool)  # the logits' width
    in_s[s] = True
    gen = seed_everything(0)
    n = low4 = low5 = 0
    smallest, worst = 1.0, 0.0
    for prompts in distill.step_prompts(read_prompts(data_file("harmful_train")), 4, 1, 0):
        ids, mask = encode_chats(tok, [q for q in prompts for _ in range(4)])
        comp, cm = sample(student, ids, mask, 48, temperature=1.0, generator=gen, stop_ids=stop_token_ids(tok),
                          pad_id=tok.pad_token_id)
        with torch.no_grad(), teacher.steer():
            lt = completion_logits(base, ids, mask, comp).float()[cm.bool()]  # [positions, V]
        lq_r = lt.double().log_softmax(-1)[:, ~in_s].logsumexp(-1)  # exact log q(R)
        lse = torch.logsumexp(lt, -1)
        old = torch.log((1 - (lt[:, s] - lse[:, None]).double().exp().sum(-1)).clamp_min(1e-12))  # by subtraction
        q_r = lq_r.exp()
        n, low4, low5 = n + len(q_r), low4 + int((q_r < 1e-4).sum()), low5 + int((q_r < 1e-5).sum())
        smallest = min(smallest, q_r.min().item())
        if (q_r < 1e-4).any():
            worst = max(worst, (old - lq_r)[q_r < 1e-4].abs().max().item())
    print(json.dumps({"student": args.student, "positions": n, "q_R_below_1e-4": low4, "share": low4 / n,
                      "q_R_below_1e-5": low5, "smallest_q_R": smallest, "old_log_qR_max_abs_error": worst}))


if __name__ == "__main__":
    main()
