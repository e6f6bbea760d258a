# Run from the repository with the stages on the path: PYTHONPATH=. python results/archive/.../block16.py
import torch
import extract_direction as ed
from safesteer.files import read_prompts
from safesteer.models import load_model
from safetensors.torch import load_file
torch.set_num_threads(1)
model, tok = load_model("smollm2-135m", torch.device("cpu"))
hv = read_prompts("data/harmless_val.jsonl"); sv = read_prompts("data/harmful_val.jsonl")
for d in ["runs/demo"]:
    vec = load_file(f"{d}/direction.safetensors")["direction"]
    r = torch.zeros(1, 30, 576, dtype=torch.float64); r[0, 16] = vec.double()
    teachers = [{"position": -1, "layer": 16, "coefficient": c} for c in (0.5, 0.75)]
    g = ed.teacher_selectivity(model, tok, r, teachers, sv, hv, 16)
    for t in g: print(t)
