"""What a training run spends, on one axis: tokens, an estimate of FLOPs, and seconds, step by step.

    step_tokens   one step's counts (train_log.jsonl's "tokens"): each prompt's real tokens once (its G
                  samples share them), the completion positions every forward pass computes (rows x the
                  step's width, padding included), and the tokens the student sampled (through each end
                  of turn)
    run_cost      the sums up to a step, and FLOPs ≈ 2·N·tokens per forward pass (N the model's weights;
                  attention's own FLOPs left out): the sampler's pass, the teacher's, and the student's
                  forward and backward (three passes), so 10·N·(prompt + completion positions) a step
"""
from __future__ import annotations

FORWARD_PASSES = 1 + 1 + 3  # the sampler, the teacher (πt, or π0 for an anchor row), the student's fwd + bwd


def step_tokens(prompt_mask, completions, sampled_mask, samples: int, world) -> dict:
    """prompt_mask [rows, plen] (rows in runs of G identical prompts), completions [rows, T], sampled_mask
    [rows, T]: the step's token counts, summed over ranks."""
    counts = [int(prompt_mask[::samples].sum()), completions.numel(), int(sampled_mask.sum())]
    return dict(zip(("prompt", "completion_positions", "sampled"), (int(c) for c in world.sum(counts))))


def run_cost(log: list[dict], n_weights: int) -> dict:
    """The cost of the steps in `log`: their tokens summed, the FLOPs estimate, and the seconds they took."""
    keys = ("prompt", "completion_positions", "sampled")
    tokens = {k: sum(r["tokens"][k] for r in log if "tokens" in r) for k in keys}
    flops = 2 * n_weights * FORWARD_PASSES * (tokens["prompt"] + tokens["completion_positions"])
    return {"steps": len(log), "tokens": tokens, "flops_estimate": float(flops),
            "seconds": round(sum(r["step_seconds"] for r in log), 1)}
