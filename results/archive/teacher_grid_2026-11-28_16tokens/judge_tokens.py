"""How many greedy tokens the teacher grid's judge needs: four teachers of the bundled model (response
direction, blocks 16 and 18, c = 0.5 and 0.75) measured on harmful_val and harmless_val (32 + 32) at 16, 32
and 64 tokens.
Output: judge_tokens.txt. Usage, from the repository (the stages on the path):
    PYTHONPATH=. python results/archive/teacher_grid_2026-11-28_16tokens/judge_tokens.py
"""
import torch

import extract_direction as ed
from safesteer.directions import response_directions
from safesteer.files import read_prompts
from safesteer.models import BUNDLED_MODEL, load_model

args = ed.parse_args(["--out", "unused"])
model, tok = load_model(BUNDLED_MODEL, "cpu")
r = response_directions(model, tok, read_prompts(args.harmful, 128, 0), ed.REFUSAL_TEXT, ed.COMPLY_TEXT, 16)
harmful, harmless = read_prompts(args.harmful_val, 32, 0), read_prompts(args.harmless_val, 32, 0)
teachers = [{"layer": l, "position": -1, "coefficient": c}
            for l, c in ((16, 0.5), (16, 0.75), (18, 0.5), (18, 0.75))]
print("tokens | block | c | refusal harmful_val | refusal harmless_val | selectivity")
for n in (16, 32, 64):
    for g in ed.teacher_selectivity(model, tok, r, teachers, harmful, harmless, n):
        rates = f"{g['refusal_harmful']:.0%} | {g['refusal_harmless']:.0%}"
        print(f"{n} | {g['layer']} | {g['coefficient']} | {rates} | "
              f"{g['selectivity']:+.0%}")
