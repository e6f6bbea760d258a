"""Memory model of Stage 3: peak memory of a distillation step predicted from a model's config, full vs LoRA.

What a step holds (bytes; P = parameters, b = micro-batch, S = prompt + completion tokens, T = completion,
V = vocabulary, h = hidden, I = MLP width, L = blocks, c = compute dtype's bytes: 2 for bf16 on a GPU, 4 on
the CPU):

    resident   full:  float32 student (4P) + its gradient (4P) + AdamW moments (8P) + a frozen float32 π0/πt
                      copy (4P: it computes as the student does, safesteer/scale/precision.py); on CUDA also
                      autocast's
                      cached bf16 copy of the weights (2P; not sharded, where FSDP2 casts each unit instead)
                      and, with foreach AdamW, its temporary (4P; 0 with the fused AdamW used on CUDA)
               LoRA:  one base copy (cP) + adapters A in float32 with gradient and moments (16A)
    sampling   KV cache 2·L·n·S·kv·d·c for the n rows decoded together, and their last logits: all of a
               step's (P + A)·G rows (A anchor prompts), or with --sample-batch N, min(N, (P + A)·G)
    training   checkpointed block inputs L·b·S·h·c, one block recomputed (b·S·(6h + 3I)·c + attention
               b·H·S²·c), teacher and student logits 2·b·T·V·c, the logits' gradient b·T·V·c, and the loss's
               chunk (256·V·4·2); in float32 (the CPU) the gradient and the loss's chunks are never held
               together: the largest of b·T·V·4, the chunk and the full KL's 5·128·V·4 (log_losses)
    CUDA       the context (~0.4 GiB), NCCL's buffers per rank under torchrun (~0.6 GiB), and the caching
               allocator's fragmentation (~20% of what a step allocates and frees)
    peak       resident + max(sampling, training) · (1.2 on CUDA) + CUDA's fixed costs

Sharded over N GPUs (distill.py --shard under torchrun, FSDP2 with one unit per block): resident / N, plus the
units gathered whole while they run, in bf16 on CUDA (FSDP2's mixed precision; the CPU gathers float32): the
root (embeddings, head; kept gathered through forward and backward) and two blocks (the running one and the
prefetched next), and with full fine-tuning π0's root too (FSDP2 leaves a root gathered after a forward, and
π0 has no backward); each rank samples (at most N rows at a time) and trains its rows / N. Not validated here
(the CPU tests check the numbers and dtypes of a sharded run, not its memory).

The CUDA terms are public measurements (issue 31), not measured here. The model is checked against measured
peaks on the CPU (`--validate`: the bundled 135M model and a tiny one, full and LoRA; measured = peak RSS of a
fresh process minus its RSS after imports, including those transformers makes on a model's first load:
~200 MB of host memory, import_on_first_load), and the table printed for the paper's models at the paper's
settings (4 prompts x 8 samples per step, plus README's 4 anchor prompts, micro-batch 8, 512 new tokens,
prompts ~128 tokens) against real cards' capacities in GiB.
The children run with a fixed malloc mmap threshold: glibc's default keeps freed blocks in the heap, and peak
RSS then counts memory that no tensor holds (+27% to +135% here with the default).

Usage:
    python -m bench.memory_model                 # the table
    python -m bench.memory_model --validate      # predicted vs measured on this CPU (a few minutes)
    python -m bench.memory_model --gpus 8        # per GPU when Stage 3 is sharded over 8 GPUs
    python -m bench.memory_model --sample-batch 16   # 16 of a step's rows sampled at a time
"""
import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from safesteer.scale.parallel import trainable
from safesteer.cli import Parser, add_renamed, non_negative_int, positive_int, run_cli
from safesteer.files import data_file, read_prompts, save_tensors, write_json
from safesteer.models import BUNDLED_MODEL, bundled_model_dir, load_model

GIB = 2 ** 30
# Configs of the paper's models and others, as their config.json give them (public model cards).
MODELS = {
    "Llama-3.2-3B-Instruct": dict(h=3072, I=8192, L=28, V=128256, H=24, kv=8, d=128, tied=True),
    "Qwen3-4B-Instruct": dict(h=2560, I=9728, L=36, V=151936, H=32, kv=8, d=128, tied=True),
    "Qwen2.5-7B-Instruct": dict(h=3584, I=18944, L=28, V=152064, H=28, kv=4, d=128, tied=False),
    "Llama-3-8B-Instruct": dict(h=4096, I=14336, L=32, V=128256, H=32, kv=8, d=128, tied=False),
    "Gemma-2-9B-it": dict(h=3584, I=14336, L=42, V=256000, H=16, kv=8, d=256, tied=True),
    "Llama-3.1-70B-Instruct": dict(h=8192, I=28672, L=80, V=128256, H=64, kv=8, d=128, tied=False),
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# What torch.cuda.mem_get_info reports as a card's total, in GiB (not the GB on the box).
CARDS = {"A10G/L4": 22.49, "3090/4090": 23.99, "A100-40GB": 39.39, "A100/H100-80GB": 79.15}
CUDA_CONTEXT = 0.4 * GIB  # the driver's context and cuBLAS/cuDNN workspaces, before any tensor
NCCL_BUFFERS = 0.6 * GIB  # per rank, under torchrun with more than one process
FRAGMENTATION = 0.2  # the caching allocator's reserved-but-unused share of what a step allocates and frees


def block_params(m: dict) -> int:
    """One decoder block of a Llama-style model: attention, gated MLP, two norms."""
    attn = m["h"] * m["H"] * m["d"] * 2 + m["h"] * m["kv"] * m["d"] * 2
    return attn + 3 * m["h"] * m["I"] + 2 * m["h"]


def root_params(m: dict) -> int:
    """What is not in a block: embeddings (and an untied head), the final norm."""
    return m["V"] * m["h"] * (1 if m["tied"] else 2) + m["h"]


def params(m: dict) -> int:
    return m["L"] * block_params(m) + root_params(m)


def lora_params(m: dict, rank: int) -> int:
    """Adapters A (in x r) and B (r x out) on q, k, v, o, gate, up, down of every block."""
    q, kv = m["H"] * m["d"], m["kv"] * m["d"]
    shapes = [(m["h"], q), (m["h"], kv), (m["h"], kv), (q, m["h"]), (m["h"], m["I"]), (m["h"], m["I"]),
              (m["I"], m["h"])]
    return m["L"] * sum(rank * (i + o) for i, o in shapes)


def predict(m: dict, *, lora_rank: int | None, c: int, rows: int, micro_batch: int, prompt: int, new: int,
            attn_s2: bool, shard: int = 1, cuda: bool = False, fused_adam: bool | None = None,
            world: int | None = None, sample_batch: int | None = None) -> dict:
    """Peak bytes of one step and its parts on one device (see the module docstring). rows: (P + A)·G,
    all the step's rows; cuda: add the CUDA terms; fused_adam: default on CUDA; world: processes (default:
    shard); sample_batch: distill.py --sample-batch (default: all rows at once)."""
    p, s = params(m), prompt + new
    fused_adam = cuda if fused_adam is None else fused_adam
    world = shard if world is None else world
    if lora_rank:
        a = lora_params(m, lora_rank)
        resident = {"weights": c * p / shard, "trainable (fp32 + grad + AdamW)": 16 * a / shard}
    else:
        resident = {"student fp32 + grad + AdamW": 16 * p / shard, "frozen π0/πt copy (fp32)": 4 * p / shard}
        if cuda and shard == 1:  # sharded, FSDP2's mixed precision casts a unit at a time instead
            resident["autocast's bf16 weight cache"] = 2 * p
        if not fused_adam and cuda:  # foreach AdamW's temporary; the CPU's AdamW is per-tensor (for loops)
            resident["AdamW foreach temporary"] = 4 * p / shard
    if shard > 1:  # gathered units in the compute dtype: root + two blocks (full fine-tuning: π0's root too)
        roots = 1 if lora_rank else 2
        resident["gathered units"] = (roots * root_params(m) + 2 * block_params(m)) * c
        rows, micro_batch = math.ceil(rows / shard), min(micro_batch, math.ceil(rows / shard))
    decoded = min(sample_batch or rows, rows)  # rows sampled at once
    kv = 2 * m["L"] * decoded * s * m["kv"] * m["d"] * c
    sampling = {"KV cache": kv, "last logits": decoded * m["V"] * 4 * 2}
    b = micro_batch
    training = {"checkpointed block inputs": m["L"] * b * s * m["h"] * c,
                "one block recomputed": b * s * (6 * m["h"] + 3 * m["I"]) * c * 2
                + (b * m["H"] * s * s * c * 2 if attn_s2 else 0),
                "teacher + student logits": 2 * b * new * m["V"] * c}
    # the loss chunk: losses._logsumexp's masked copy and exp(z - max)
    grad, chunk = b * new * m["V"] * c, 256 * m["V"] * 4 * 2
    if c == 4:  # float32 logits: the loss's backward writes into the gradient with no temporary, and the
        # chunks are freed before it; the full KL's 128-row chunks (log_losses' diagnostic, or the trained
        # loss) hold 5 [128, V] temporaries (log p, log q, exp, difference, product)
        training["logits gradient or loss chunks"] = max(grad, chunk, 5 * 128 * m["V"] * 4)
    else:  # bf16: the backward upcasts a chunk beside the gradient (not measured on a GPU: kept as the sum)
        training.update({"logits gradient": grad, "loss chunk": chunk})
    per_step = max(sum(sampling.values()), sum(training.values()))
    fixed = {}
    if cuda:
        fixed = {"CUDA context": CUDA_CONTEXT, "allocator fragmentation": FRAGMENTATION * per_step}
        if world > 1:
            fixed["NCCL buffers"] = NCCL_BUFFERS
    peak = sum(resident.values()) + per_step + sum(fixed.values())
    return {"resident": resident, "sampling": sampling, "training": training, "cuda": fixed, "peak": peak}


def hf_config(cfg) -> dict:
    t = cfg.get_text_config()
    d = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return dict(h=t.hidden_size, I=t.intermediate_size, L=t.num_hidden_layers, V=t.vocab_size,
                H=t.num_attention_heads, kv=t.num_key_value_heads, d=d, tied=bool(t.tie_word_embeddings))


# ----------------------------------------------------------------------------- validation on this CPU

def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM). Not getrusage's ru_maxrss: Linux keeps that across
    exec, so a child started by a parent holding 550 MB begins with a "peak" of 550 MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def import_on_first_load(model: str, lora: bool) -> None:
    """Import the code that loading `model` imports on first use, so that the baseline counts it: transformers
    imports a model's class lazily, and modeling_llama brings torch._dynamo, sympy, scipy and accelerate
    (~125 MB of modules on this CPU, whatever the model's size), the tokenizer's classes ~30 MB, peft ~10 MB.
    Host memory of any process that loads a model, not a step's and not a GPU's: left out of the measured
    peak, as the other imports are (a tokenizer loaded here and dropped; the run's own, ~15 MB, is
    measured)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    path = bundled_model_dir() if model == BUNDLED_MODEL else model
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # imports the model's module
    AutoTokenizer.from_pretrained(path)
    if lora:
        import peft  # noqa: F401


def child(spec: dict) -> None:
    """One real distillation step (plus its sampling) in this process; print RSS after imports and the
    peak."""
    import torch
    import distill
    from safesteer.chat import encode_chats
    import_on_first_load(spec["model"], bool(spec["lora"]))
    torch.manual_seed(0)
    base_rss = peak_rss_mb()
    out = Path(spec["out"])
    args = distill.parse_args(["--model", spec["model"], "--out", str(out)]
                              + (["--lora-rank", str(spec["lora"])] if spec["lora"] else []))
    student, tok, teacher, base, _ = distill.build_models(args, out, torch.device("cpu"))
    student.activation_checkpointing_enable()
    if spec["lora"]:
        student.enable_input_require_grads()
    opt = torch.optim.AdamW(trainable(student).values(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    distill.stop_token_ids = lambda tok: [-1]  # every row generates exactly `new` tokens
    prompts = read_prompts(data_file("harmful_train"))[:spec["prompts"]]
    recipe = distill.Recipe(samples=spec["samples"], max_new_tokens=spec["new"],
                            micro_batch=spec["micro_batch"])
    for _ in range(2):  # the second step has AdamW's moments allocated
        loop = distill.Loop(opt, sched, gen=torch.Generator().manual_seed(0))
        distill.train_step(student, tok, prompts, [], (teacher, base), torch.arange(100, 150), recipe, loop)
    prompt_len = max(len(encode_chats(tok, [p])[0][0]) for p in prompts)
    print(json.dumps({"base_rss_mb": base_rss, "peak_rss_mb": peak_rss_mb(),
                      "prompt": prompt_len, "config": hf_config(student.config)}))


def validate(tmp: Path) -> list[dict]:
    import torch
    rows = []
    cases = [("smollm2-135m", None), ("smollm2-135m", 16), ("tiny", None), ("tiny", 8)]
    for model, lora in cases:
        out = tmp / f"{model}_{lora}"
        out.mkdir(parents=True, exist_ok=True)
        if model == "tiny":  # a small Llama, built here: 8 blocks, hidden 256, SmolLM2's tokenizer
            from transformers import LlamaConfig, LlamaForCausalLM
            _, tok = load_model("smollm2-135m")
            cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768,
                              num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True)
            LlamaForCausalLM(cfg).save_pretrained(tmp / "tiny_model")
            tok.save_pretrained(tmp / "tiny_model")
            path = str(tmp / "tiny_model")
        else:
            path = model
        from transformers import AutoConfig
        hidden = (AutoConfig.from_pretrained(path) if model == "tiny" else None)
        hidden = hidden.hidden_size if hidden else 576
        save_tensors(out / "direction.safetensors", {"direction": torch.zeros(hidden)})
        write_json(out / "direction.json", {"layer": 2, "coefficient": 1.0})
        spec = {"model": path, "lora": lora, "out": str(out), "prompts": 4, "samples": 4, "new": 48,
                "micro_batch": 8}
        # glibc's dynamic mmap threshold keeps freed blocks below 32 MB in the heap, so peak RSS would count
        # memory no tensor holds any more; a fixed threshold returns it, and RSS follows live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
               "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", __spec__.name, "--child", json.dumps(spec)],
                             capture_output=True,
                             text=True, env=env)
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        got = json.loads(res.stdout.strip().splitlines()[-1])
        pred = predict(got["config"], lora_rank=lora, c=4, rows=16, micro_batch=8, prompt=got["prompt"],
                       new=48, attn_s2=True)
        measured = (got["peak_rss_mb"] - got["base_rss_mb"]) * 2 ** 20
        rows.append({"model": model, "mode": f"LoRA r={lora}" if lora else "full",
                     "predicted_mb": pred["peak"] / 2**20, "measured_mb": measured / 2**20,
                     "error": pred["peak"] / measured - 1})
    return rows


def table(rank: int, prompt: int, new: int, shard: int = 1, anchors: int = 4,
          sample_batch: int | None = None) -> list[dict]:
    """On CUDA, 4 prompts and `anchors` anchor prompts x 8 samples, sampled sample_batch rows at a time: the
    peak at micro-batch 8, the smallest card that holds it (CARDS, GiB), and the largest micro-batch (8, 4, 2,
    1) that fits an A10G/L4; per GPU of `shard`."""
    rows = []
    for name, m in MODELS.items():
        for mode in ("full", "LoRA"):
            def peak(mb):
                return predict(m, lora_rank=rank if mode == "LoRA" else None, c=2, rows=(4 + anchors) * 8,
                               micro_batch=mb, prompt=prompt, new=new, attn_s2=False, shard=shard,
                               cuda=True, sample_batch=sample_batch)["peak"] / GIB
            fits = [card for card, gib in CARDS.items() if peak(8) <= gib]
            mb_small = next((mb for mb in (8, 4, 2, 1) if peak(mb) <= CARDS["A10G/L4"]), None)
            rows.append({"model": name, "params_b": params(m) / 1e9, "mode": mode, "peak_gib": peak(8),
                         "fits": fits[0] if fits else "> 80 GB", "mb_small": mb_small,
                         "peak_small_gib": peak(mb_small) if mb_small else None})
    return rows


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--validate", action="store_true", help="also measure real steps on this CPU and compare")
    add_renamed(p, "--rank", "--lora-rank", type=positive_int, default=16, help="LoRA rank in the table")
    add_renamed(p, "--prompt", "--prompt-tokens", type=positive_int, default=128,
                help="prompt tokens per row in the table")
    add_renamed(p, "--new", "--max-new-tokens", type=positive_int, default=512,
                help="new tokens per row in the table (paper: 512)")
    p.add_argument("--anchor-per-step", type=non_negative_int, default=4,
                   help="anchor prompts per step in the table (README's command: 4); rows = (4 + A) x 8")
    p.add_argument("--sample-batch", type=positive_int,
                   help="rows sampled at a time, as distill.py's --sample-batch (default: all (4 + A) x 8)")
    add_renamed(p, "--shard", "--gpus", type=positive_int, default=1,
                help="per GPU when Stage 3 is sharded over this many GPUs (distill.py --shard)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # --validate's subprocess: one measured step, as JSON
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    where = f"per GPU, sharded over {args.gpus} GPUs (FSDP2)" if args.gpus > 1 else "on one GPU"
    sampled = f", sampled {args.sample_batch} rows at a time" if args.sample_batch else ""
    print(f"Stage 3 peak memory in GiB, bf16 {where}, (4 prompts + {args.anchor_per_step} anchors) x 8 "
          f"samples{sampled}, micro-batch 8, {args.prompt_tokens} + {args.max_new_tokens} tokens, gradient "
          f"checkpointing, memory-efficient attention, CUDA context and fragmentation; LoRA rank "
          f"{args.lora_rank} on q,k,v,o,gate,up,down")
    print("cards (GiB, as torch reports them): " + ", ".join(f"{k} {v}" for k, v in CARDS.items()))
    print(f"{'model':<24} {'params':>7} {'mode':<5} {'peak GiB':>9} {'smallest card':>15}   "
          f"on A10G/L4: micro-batch, peak GiB")
    rows = table(args.lora_rank, args.prompt_tokens, args.max_new_tokens, args.gpus, args.anchor_per_step,
                 args.sample_batch)
    for r in rows:
        small = f"{r['mb_small']}, {r['peak_small_gib']:.1f}" if r["mb_small"] else "does not fit"
        print(f"{r['model']:<24} {r['params_b']:>6.1f}B {r['mode']:<5} {r['peak_gib']:>9.1f} "
              f"{r['fits']:>15}   {small}")
    if args.validate:
        import tempfile
        print("\nvalidation on this CPU (float32; measured = peak RSS - RSS after imports; "
              "4 x 4 rows x 48 tokens):")
        print(f"{'model':<14} {'mode':<10} {'predicted MB':>13} {'measured MB':>12} {'error':>7}")
        with tempfile.TemporaryDirectory() as tmp:
            for r in validate(Path(tmp)):
                print(f"{r['model']:<14} {r['mode']:<10} {r['predicted_mb']:>13.0f} "
                      f"{r['measured_mb']:>12.0f} {r['error']:>+7.1%}")


if __name__ == "__main__":
    run_cli(main)
