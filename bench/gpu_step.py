"""One Stage 3 step of any model, for a GPU: step time, tokens/s, peak memory, and the memory model's error.

Runs a warm-up step and a measured one through distill.train_step with gradient checkpointing (bf16 on CUDA:
float32 master weights for full fine-tuning, a bf16 base with --lora-rank), sampling exactly --max-new-tokens
tokens per row.
Peak memory on a GPU: torch.cuda.max_memory_allocated (tensors), max_memory_reserved (what the caching
allocator holds, fragmentation included) and the card's used memory from torch.cuda.mem_get_info (the CUDA
context too); on the CPU the process's peak RSS above its RSS after imports. The prediction is
bench/memory_model.py's for the same config and settings, compared with the card's used memory on a GPU.

Nothing has run it on a GPU yet; on the CPU it runs the bundled model.

Usage:
    python -m bench.gpu_step                                            # bundled model, CPU, small settings
    python -m bench.gpu_step --model /models/Llama-3-8B-Instruct --lora-rank 16 --samples 8 \
        --max-new-tokens 512 --micro-batch 4
"""
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from safesteer.scale.parallel import trainable
from safesteer.cli import Parser, add_renamed, pick_device, positive_int, run_cli
from safesteer.files import data_file, read_prompts, save_tensors, write_json
from safesteer.models import BUNDLED_MODEL, bundled_model_dir
import distill
from bench import memory_model
from safesteer.chat import encode_chats


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help="'smollm2-135m' (bundled), a local transformers directory, or a hub id")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if available")
    p.add_argument("--lora-rank", type=positive_int,
                   help="train LoRA adapters of this rank, not all weights (default: full fine-tuning)")
    add_renamed(p, "--prompts", "--prompts-per-step", type=positive_int, default=4,
                help="P, prompts per step (paper: 4)")
    p.add_argument("--samples", type=positive_int, default=4, help="G, samples per prompt (paper: 8)")
    add_renamed(p, "--new", "--max-new-tokens", type=positive_int, default=48,
                help="new tokens per sample (paper: 512)")
    p.add_argument("--micro-batch", type=positive_int, default=8,
                   help="sequences per forward/backward")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        from transformers import AutoConfig
        model_dir = bundled_model_dir() if args.model == "smollm2-135m" else args.model
        cfg = AutoConfig.from_pretrained(model_dir)
        save_tensors(out / "direction.safetensors",
                            {"direction": torch.zeros(cfg.get_text_config().hidden_size)})
        write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0})
        dargs = distill.parse_args(["--model", args.model, "--out", str(out), "--device", device.type]
                                   + (["--lora-rank", str(args.lora_rank)] if args.lora_rank else []))
        student, tok, teacher, base, _ = distill.build_models(dargs, out, device)
    student.activation_checkpointing_enable()
    if args.lora_rank:
        student.enable_input_require_grads()
    opt = torch.optim.AdamW(trainable(student).values(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    recipe = distill.Recipe(samples=args.samples, max_new_tokens=args.max_new_tokens,
                            micro_batch=args.micro_batch)
    loop = distill.Loop(opt, sched, gen=torch.Generator().manual_seed(0))
    distill.stop_token_ids = lambda tok: [-1]  # every row generates exactly --max-new-tokens tokens
    prompts = read_prompts(data_file("harmful_train"))
    times = []
    per_step = args.prompts_per_step
    for i in range(2):  # a warm-up step, then the measured one
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        rec = distill.train_step(student, tok, prompts[i * per_step:(i + 1) * per_step], [], (teacher, base),
                                 torch.arange(100, 150, device=device), recipe, loop)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    rows = per_step * args.samples
    cuda_mb = {}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        cuda_mb = {"allocated_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                   "reserved_peak_mb": round(torch.cuda.max_memory_reserved() / 2**20),
                   "card_used_mb": round((total - free) / 2**20), "card_total_mb": round(total / 2**20)}
        measured = cuda_mb["card_used_mb"]  # the allocator keeps its reserved peak; plus the context
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    prompt = max(len(encode_chats(tok, [q])[0][0]) for q in prompts[:2 * per_step])
    pred = memory_model.predict(memory_model.hf_config(student.config), lora_rank=args.lora_rank,
                                c=2 if device.type == "cuda" else 4, rows=rows, micro_batch=args.micro_batch,
                                prompt=prompt, new=args.max_new_tokens,
                                attn_s2=device.type != "cuda", cuda=device.type == "cuda")["peak"] / 2**20
    print(json.dumps({"model": args.model, "device": device.type, "lora_rank": args.lora_rank,
                      "step_seconds": round(times[-1], 2),
                      "tokens_per_s": round(rows * args.max_new_tokens / times[-1], 1),
                      "phases": rec["seconds"], "peak_memory_mb": round(measured), **cuda_mb,
                      "predicted_mb": round(pred),
                      "memory_model_error": round(pred / measured - 1, 3)}, indent=1))


if __name__ == "__main__":
    run_cli(main)
