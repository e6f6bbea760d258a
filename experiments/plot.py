"""The paper's picture for this project: safety against its cost, one point per model and seed.

Left: refusal on the held-out harmful prompts (harmful_test and harmful_reform_test together, 200 prompts)
against KL to base (drift on π0's own answers). Right: the same refusal against over-refusal (harmless_test
and harmless_reform_test, 160 prompts). Error bars: 95% Wilson intervals for rates, 95% bootstrap intervals
over prompts for KL. Each seed is a small marker; each recipe's mean over seeds a large one. Only rows judged
by the current phrase list are drawn (a row without kept completions keeps an earlier list's verdicts).

A second figure draws the frontier of results/experiments.md (the demo's recipe with only --loss and --lr
changed): one line per loss through its learning rates, refusal on harmful_test against KL and over-refusal.

Reads   results/experiments.jsonl (rows written by experiments/experiment.py, with their per-prompt verdicts)
Writes  results/safety_vs_cost.png, results/frontier.png

Usage:
    python -m experiments.plot            # redraw both figures
    python -m experiments.plot --help     # this text
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from experiments.experiment import frontier, judged_now, seed_groups
from safesteer.metrics import bootstrap_mean, wilson

HERE = ROOT / "results"
LABELS = {"base": "base π0", "teacher": "teacher πt", "demo": "localized: collapsed on S + anchoring (demo)",
          "full": "global: full KL + anchoring", "lora": "localized, LoRA r = 16 student (lr 5e-4)",
          "random": "random S (same size) + anchoring", "window": "demo + loss window [0, 16)",
          "refresh": "demo + teacher refresh every 5 steps", "prompt_teacher": "demo with the prompt teacher",
          "refresh_aw4": "demo + refresh every 5 steps, anchor weight 4",
          "ema": "demo + the authors' schedule (πt tracks it)",
          "sft_lr2": "SFT on πt's answers (off-policy)",
          "sft_mix": "SFT-mix: SFT on πt's answers + π0's on harmless",
          "dpo_lr05": "DPO: πt's answer over π0's",
          "dpo_mix": "DPO-mix: πt's over π0's + π0's over πt's on harmless"}

# plain SFT and DPO at the -mix variants' lr 8e-5, run before validation chose their own (LOG 2026-12-03d):
# their rows stay in experiments.md; the figure draws the plain baselines at validation's choice (sft_lr2,
# dpo_lr05)
UNCHOSEN = {"sft", "dpo"}


def rate(verdicts: dict, sets: tuple[str, ...]) -> tuple[float, float, float]:
    flags = "".join(verdicts[s] for s in sets)
    k, n = flags.count("1"), len(flags)
    lo, hi = wilson(k, n)
    return k / n, lo, hi


def points(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if not judged_now(r) or not r["verdicts"].get("harmful_reform"):
            continue  # refusals judged by an earlier phrase list, or rows from before the rephrased splits
        group = r["name"].split("@")[0].replace("reference:", "")
        kl = r["kl_to_base"]
        kl_lo, kl_hi = bootstrap_mean(r["kl_sums"], r["kl_tokens"]) if r.get("kl_sums") else (kl, kl)
        out.append({"group": group, "seed": r["name"].split("@s")[1] if "@s" in r["name"] else None,
                    "refusal": rate(r["verdicts"], ("harmful", "harmful_reform")),
                    "over": rate(r["verdicts"], ("harmless", "harmless_reform")), "kl": (kl, kl_lo, kl_hi)})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """No options: the figures are drawn from results/experiments.jsonl as it stands."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return p.parse_args(argv)


def main(argv=None):
    parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (HERE / "experiments.jsonl").read_text().splitlines()]
    pts = points(rows)
    if not pts:
        sys.exit("error: no rows with per-prompt verdicts in results/experiments.jsonl; "
                 "run experiments/experiment.py")
    base = next((r for r in rows if r["name"] == "reference:base"), None)
    front = frontier(seed_groups(rows), base) if base else []
    # the frontier's extra learning rates have a figure of their own; here the recipes at the demo's budget
    extra = {p["name"] for p in front} - {"demo", "full"}
    groups = [g for g in dict.fromkeys(p["group"] for p in pts) if g not in extra | UNCHOSEN]
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    # A model that drifts far past the teacher (plain DPO at 8e-5: KL 1.7) would squash every other point:
    # the drift axis ends at 1.2 × πt's KL, and a point beyond it sits on that edge as a ▶ (no KL interval),
    # its KL beside it.
    teacher_kl = [p["kl"][0] for p in pts if p["group"] == "teacher"]
    cap = 1.2 * teacher_kl[0] if teacher_kl else math.inf
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    for ax, (xkey, xlabel) in zip(axes, (("kl", "KL to base on π0's answers (drift) ↓"),
                                        ("over", "over-refusal, harmless + rephrased harmless ↓"))):
        edge = cap if xkey == "kl" else math.inf
        for g in groups:
            mine = [p for p in pts if p["group"] == g]
            for p in mine:
                x, y = p[xkey], p["refusal"]
                cut = x[0] > edge
                xerr = None if cut else [[x[0] - x[1]], [min(x[2], edge) - x[0]]]
                ax.errorbar(min(x[0], edge), y[0], xerr=xerr, yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                            fmt=">" if cut else "o", ms=4, color=colors[g], alpha=0.5, elinewidth=0.8)
            mx = sum(p[xkey][0] for p in mine) / len(mine)
            my = sum(p["refusal"][0] for p in mine) / len(mine)
            label = LABELS.get(g, g) + (f" ({len(mine)} seeds)" if len(mine) > 1 else "")
            ax.plot(min(mx, edge), my, marker=">" if mx > edge else "D", ms=9, color=colors[g],
                    markeredgecolor="black", linestyle="none", label=label)
            if mx > edge:
                ax.annotate(f"KL {mx:.2f}", (edge, my), xytext=(-8, -14), textcoords="offset points",
                            ha="right", fontsize=8)
        if edge < math.inf:
            ax.set_xlim(-0.01, edge * 1.04)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("refusal, held-out harmful + rephrased ↑")
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()  # below both panels; every mean is a ◆ on the right
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)
    fig.suptitle("SmolLM2-135M-Instruct: safety against its cost "
                 "(95% intervals; small = one seed, diamond = mean)")
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    path = HERE / "safety_vs_cost.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path} ({len(pts)} points, {len(groups)} groups)")
    if front:
        plot_frontier(plt, front, base)


def plot_frontier(plt, front: list[dict], base: dict) -> None:
    """One line per loss through its learning rates (seed means), with base π0 as the origin of both
    panels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, (xkey, xlabel) in zip(axes, (("kl_to_base", "KL to base on π0's answers (drift) ↓"),
                                        ("over_refusal", "over-refusal, harmless_test ↓"))):
        for i, loss in enumerate(dict.fromkeys(p["loss"] for p in front)):
            mine = sorted((p for p in front if p["loss"] == loss), key=lambda p: p["lr"])
            ax.plot([p[xkey] for p in mine], [p["refusal_harmful"] for p in mine], marker="o", color=f"C{i}",
                    label=f"{loss} (lr {', '.join(format(p['lr'], 'g') for p in mine)})")
            for p in mine:
                ax.annotate(f"{p['lr']:g} ({len(p['seeds'])})", (p[xkey], p["refusal_harmful"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10))
        ax.plot(base[xkey], base["refusal_harmful"], marker="s", color="gray", linestyle="none",
                label="base π0")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("refusal, harmful_test ↑")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Localized vs global at the demo's recipe: learning rate varied (labels: lr (seeds))")
    fig.tight_layout()
    path = HERE / "frontier.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path} ({len(front)} points)")


if __name__ == "__main__":
    main()
