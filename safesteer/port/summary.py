"""What eval.md says of a port's evaluation, below the table: the guard's verdicts beside the phrases', their
agreement, lm-evaluation-harness scores, and the benchmark prompts shortened to --max-prompt-tokens."""
from __future__ import annotations

from safesteer.metrics import interval_text


def port_lines(results: dict, meta: dict) -> list[str]:
    """The guard's attack success rates beside the phrases', lm-evaluation-harness scores, if run, and the
    prompts shortened to --max-prompt-tokens."""
    lines = [f"- guard {g['name']}: {g['family']}, reads {g['reads']}" for g in [meta.get("guard")] if g]
    for name, r in results.items():
        for s, g in r.get("guard", {}).items():
            agree, phrases = g["vs_phrases"], f" (phrases {r['asr']['rate']:.0%})" if s == "harmful" else ""
            share = "–" if agree["agreement"] is None else f"{agree['agreement']:.0%}"
            kappa = "–" if agree["kappa"] is None else f"{agree['kappa']:.2f}"  # undefined: a constant pair
            asr = interval_text(g["asr"])
            lines.append(f"- {name}, {s}: guard ASR {asr}{phrases}; agrees with the phrases on "
                         f"{share} of {agree['n']} (κ {kappa}, {agree['unreadable']} unreadable)")
        for task, scores in r.get("lm_eval", {}).items():
            lines.append(f"- {name}, lm-eval {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    for s, c in meta.get("shortened", {}).items():
        ends = c["shortened"] - c["in_context"]
        how = ([f"{c['in_context']} in their context, the request kept whole"] if c["in_context"] else []) \
            + ([f"{ends} cut at their end"] if ends else [])
        lines.append(f"- {s}: {c['shortened']} of {c['of']} prompts longer than {c['max_tokens']} tokens "
                     f"(--max-prompt-tokens), shortened: {'; '.join(how)}")
    return ["", "Judged for a port:", "", *lines] if lines else []
