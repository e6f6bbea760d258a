"""One prepared check of what only a GPU can show (issue 31): <= 5 minutes on one GPU, nothing downloaded.

Random-weight models built from the configs of Qwen3-4B and Llama-3-8B (a memory check needs only the shapes)
and of a ~0.5B model (Qwen2.5-0.5B's shapes) for the numbers and timings. It measures, in bf16 on CUDA:

    kl_floor     KL(πs ‖ π0) at step 0 of full fine-tuning: the float32 frozen π0 under the student's
                 autocast (precision.frozen_copy), against the old pure-bf16 copy, and in float32 (0)
    merge        a LoRA student on a bf16 base after a few AdamW steps at lr 1e-5: the merged model's logits
                 against the adapter model's, merged in float32 (precision.merge_lora) and in place in bf16
    eval_dtype   a float32 student 25 Adam-sized steps at lr 1e-6 from π0, evaluated in float32 and in bf16:
                 the share of its changed weights that rounding keeps, and its drift KL(πs ‖ π0) in each
    packing      the student's forward + backward at G = 8 samples x 512 new tokens, packed behind the tree
                 mask and a row per sample (seconds, peak memory)
    memory       one LoRA step (distill.train_step) of each big model: allocated, reserved and the card's
                 used memory against bench/memory_model.py's prediction

and writes them to one JSON file. `--tiny` runs everything at tiny sizes on the CPU (tests/test_gpu_check.py).
No GPU has run it yet.

Usage:
    python -m bench.gpu_check                      # on a GPU: results/gpu_check.json
    python -m bench.gpu_check --tiny --out /tmp/check.json
"""
import copy
import gc
import json
import time

import torch

from safesteer.cli import Parser, pick_device, run_cli
from safesteer.errors import UserError
from safesteer.files import PROJECT_DIR, data_file, read_prompts, run_info, write_json
import distill
from bench import memory_model
from safesteer.chat import encode_chats
from safesteer.scale.precision import frozen_copy, merge_lora, surviving_update
from safesteer.teacher import Teacher
from safesteer.forcing import completion_logits, packing_path

# The shapes of each model's config.json (public model cards); the weights are random.
CONFIGS = {
    "Qwen3-4B": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=True, rope_theta=5_000_000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=40960),
    "Llama-3-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                       tie_word_embeddings=False, rope_theta=500_000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192),
    "0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=320)
# Sizes: the paper's G = 8 and 512 new tokens on a GPU; a few tokens with --tiny.
SIZES = {"gpu": dict(samples=8, new=512, kl_new=64, memory_prompts=2, micro_batch=4, lora_rank=16),
         "tiny": dict(samples=2, new=6, kl_new=6, memory_prompts=2, micro_batch=2, lora_rank=2)}
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def byte_tokenizer():
    """Every byte a token, plus ChatML's special tokens: a chat tokenizer built here, so nothing downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
    tok.padding_side = "left"
    return tok


def build(name: str, tok, device, dtype, tiny: bool):
    """A random-weight model with `name`'s shapes (TINY's with --tiny), in `dtype`, made on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kwargs = {**CONFIGS[name], **(TINY if tiny else {})}
    cfg = AutoConfig.for_model(**kwargs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no host copy of an 8B model
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def batch(tok, n_prompts: int, samples: int, new: int, vocab: int, device):
    """n_prompts harmful prompts, each `samples` times, and random completions of `new` tokens."""
    prompts = read_prompts(data_file("harmful_train"))[:n_prompts]
    ids, mask = encode_chats(tok, [p for p in prompts for _ in range(samples)], device=device)
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(0, min(vocab, len(tok)), (len(ids), new), generator=gen).to(device)
    return ids, mask, comp


def mean_kl(p_logits, q_logits) -> float:
    """Mean over positions of KL(p ‖ q), from logits [b, T, V], in float64."""
    return distill.full_kl_formula(p_logits.flatten(0, 1), q_logits.flatten(0, 1)).mean().item()


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def kl_floor(tok, device, tiny, size) -> dict:
    """KL(πs ‖ π0) at step 0, both computed as Stage 3 computes them (student with autograd, π0 without)."""
    student = build("0.5B", tok, device, torch.float32, tiny)
    ids, mask, comp = batch(tok, 2, size["samples"], size["kl_new"], student.config.vocab_size, device)

    def kl(frozen, amp: bool) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            ls = completion_logits(student.train(), ids, mask, comp)
            with torch.no_grad():
                lt = completion_logits(frozen, ids, mask, comp)
        return mean_kl(ls.detach(), lt)
    frozen = frozen_copy(student)
    out = {"float32_copy_autocast": kl(frozen, True), "float32_no_autocast": kl(frozen, False)}
    out["bf16_copy_autocast (before)"] = kl(frozen.to(torch.bfloat16), True)
    return out


def lora(model, rank: int):
    from peft import LoraConfig, get_peft_model
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def merge(tok, device, tiny, size) -> dict:
    """Merged vs adapter logits after 5 AdamW steps at lr 1e-5 on a bf16 base: error / size of the update."""
    student = lora(build("0.5B", tok, device, torch.bfloat16, tiny), size["lora_rank"])
    ids, _, _ = batch(tok, 2, 1, 0, student.config.vocab_size, device)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(5):
        student(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    student.eval()

    def logits(model):
        with torch.no_grad():
            return model.to(device, torch.float32)(input_ids=ids).logits.double()
    exact = logits(copy.deepcopy(student))
    with student.disable_adapter():
        update = (exact - logits(copy.deepcopy(student).get_base_model())).abs().max().item()
    fp32 = logits(merge_lora(copy.deepcopy(student)))
    with torch.no_grad():
        in_place = logits(student.merge_and_unload())  # the bf16 weights, as merged before
    return {"update_max_logit": update, "float32_merge_error": (fp32 - exact).abs().max().item() / update,
            "bf16_in_place_error (before)": (in_place - exact).abs().max().item() / update}


def eval_dtype(tok, device, tiny, size) -> dict:
    """A float32 student 25 Adam-sized steps at lr 1e-6 away from π0, evaluated in float32 and in bf16."""
    base = build("0.5B", tok, device, torch.float32, tiny)
    student = copy.deepcopy(base)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # Adam moves each weight by about lr per step, whatever its gradient's scale
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=device).sign() * 25 * 1e-6)
    ids, mask, comp = batch(tok, 2, 2, size["kl_new"], base.config.vocab_size, device)

    def drift(s, b) -> float:
        with torch.no_grad():
            return mean_kl(completion_logits(s, ids, mask, comp), completion_logits(b, ids, mask, comp))
    out = {"changed_weights_kept_by_bf16": surviving_update(student, base),
           "drift_float32": drift(student, base)}
    out["drift_bf16"] = drift(student.to(torch.bfloat16), base.to(torch.bfloat16))
    return out


def packing(tok, device, tiny, size) -> dict:
    """The student's forward + backward on one prompt's G samples, packed and a row per sample."""
    student = build("0.5B", tok, device, torch.float32, tiny).train()
    student.activation_checkpointing_enable()
    ids, mask, comp = batch(tok, 1, size["samples"], size["new"], student.config.vocab_size, device)
    out = {"path": packing_path(student), "samples": size["samples"], "new_tokens": size["new"]}
    for pack in (True, False):
        seconds = []
        for _ in range(3):  # a warm-up, then two timed
            reset_peak(device)
            t = time.perf_counter()
            with autocast(device):
                logits = completion_logits(student, ids, mask, comp, pack=pack)
            logits.float().logsumexp(-1).mean().backward()
            sync(device)
            seconds.append(time.perf_counter() - t)
        name = "packed" if pack else "unpacked"
        out[f"{name}_seconds"] = min(seconds[1:])
        out[f"{name}_allocated_peak_gib"] = memory(device).get("allocated_peak_gib")
    return out


def memory_step(name: str, tok, device, tiny, size) -> dict:
    """One LoRA step of Stage 3 (sampling included) on a bf16 base, and the memory model's prediction."""
    reset_peak(device)
    student = lora(build(name, tok, device, torch.bfloat16, tiny), size["lora_rank"])
    student.activation_checkpointing_enable()
    student.enable_input_require_grads()
    layer, hidden = student.config.num_hidden_layers // 2, student.config.hidden_size
    vec = torch.randn(hidden, generator=torch.Generator().manual_seed(0)).to(device)
    teacher = Teacher(student, "hook", vec, layer, 1.0, base_context=student.disable_adapter)
    base = Teacher(student, "base", base_context=student.disable_adapter)
    recipe = distill.Recipe(samples=size["samples"], max_new_tokens=size["new"],
                            micro_batch=size["micro_batch"])
    loop = distill.Loop(*distill.make_optimizer(student, recipe, 1), gen=torch.Generator().manual_seed(0))
    prompts = read_prompts(data_file("harmful_train"))[:size["memory_prompts"]]
    s_ids = torch.arange(10, 60, device=device)
    t = time.perf_counter()
    distill.train_step(student, tok, prompts, [], (teacher, base), s_ids, recipe, loop)
    sync(device)
    prompt = max(len(encode_chats(tok, [p])[0][0]) for p in prompts)
    pred = memory_model.predict(memory_model.hf_config(student.config), lora_rank=size["lora_rank"], c=2,
                                rows=len(prompts) * size["samples"], micro_batch=size["micro_batch"],
                                prompt=prompt, new=size["new"], attn_s2=False, cuda=device.type == "cuda")
    out = {"step_seconds": time.perf_counter() - t, "rows": len(prompts) * size["samples"],
           "prompt_tokens": prompt, "new_tokens": size["new"], "predicted_gib": pred["peak"] / 2**30,
           **memory(device)}
    if "card_used_gib" in out:
        out["prediction_error_vs_card_used"] = out["predicted_gib"] / out["card_used_gib"] - 1
    del student, teacher, base, loop
    return out


def reset_peak(device) -> None:
    """Free what earlier checks left (peft models hold reference cycles), then restart the peak counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict:
    """Allocated and reserved peaks, and what the card has in use (CUDA context included); {} on the CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"allocated_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_peak_gib": torch.cuda.max_memory_reserved() / 2**30,
            "card_used_gib": (total - free) / 2**30, "card_total_gib": total / 2**30}


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--tiny", action="store_true",
                   help="tiny models on the CPU: checks the script, not the GPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if available")
    p.add_argument("--out", default=str(PROJECT_DIR / "results" / "gpu_check.json"),
                   help="the JSON file written")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device("cpu" if args.tiny else args.device)
    if device.type != "cuda" and not args.tiny:
        raise UserError("no CUDA device: run on a GPU, or pass --tiny to check the script on the CPU")
    size, tok, t0 = SIZES["tiny" if args.tiny else "gpu"], byte_tokenizer(), time.time()
    distill.stop_token_ids = lambda tok: [-1]  # every row samples exactly `new` tokens, as predicted
    distill.decode_completions = lambda tok, tokens, mask: [""] * len(tokens)  # ids beyond the tokenizer's
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": args.tiny}
    checks = {"kl_floor": kl_floor, "merge": merge, "eval_dtype": eval_dtype, "packing": packing}
    for name, check in checks.items():
        report[name] = check(tok, device, args.tiny, size)
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    report["memory"] = {}
    for name in ("Qwen3-4B", "Llama-3-8B"):
        report["memory"][name] = memory_step(name, tok, device, args.tiny, size)
        print(f"memory {name}: {json.dumps(report['memory'][name])}", flush=True)
    report.update(seconds=round(time.time() - t0, 1), **run_info())
    write_json(args.out, report)
    print(f"took {report['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
