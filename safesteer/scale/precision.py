"""The dtype policy of all four stages, in one place (docs/memory.md, "dtypes").

    What was trained in float32 is saved in float32 and evaluated in the dtype it was saved in, unless the
    user asks for bf16 (then one warning line: the share of the student's update that survives the rounding).
    A LoRA student merges its adapters in float32: bf16 base weights cannot hold an update smaller than
    their rounding step (half of it is lost at lr 1e-5). Full fine-tuning's frozen π0 (πt with the hook)
    stays float32 and computes as the student does, so πs and π0 take one precision path at step 0.

Stage 3 computes in bf16 over float32 master weights on CUDA: unsharded under bf16 autocast
(training_autocast); with --shard FSDP2 gathers each unit as bf16 weights instead (mixed_precision; gradients
reduced in float32), for the student and its frozen π0 alike, and autocast stays off.
On the CPU everything is float32 and none of this changes a number.
"""
from __future__ import annotations

import copy
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
BF16_DEVICES = {"cuda"}  # where Stage 3 computes in bf16; the tests add "cpu" to run CUDA's policy on the CPU


def add_dtype_arg(p) -> None:
    """--dtype for the forward-only stages."""
    p.add_argument("--dtype", choices=["saved", *DTYPES], default="saved",
                   help="weights' dtype: saved = as the checkpoint was saved (float32 on the CPU); bf16 "
                        "halves the memory but rounds away updates smaller than its step (with a warning)")


def load_dtype(path, device, choice=None) -> torch.dtype:
    """The dtype to load a checkpoint in: float32 on the CPU; on CUDA the dtype it was saved in (config.json's
    dtype; bf16 if it names none), or `choice` ("bf16", "float32", a torch.dtype)."""
    if isinstance(choice, torch.dtype):
        return choice
    if choice in DTYPES:
        return DTYPES[choice]
    if torch.device(device).type != "cuda":
        return torch.float32
    return saved_dtype(path) or torch.bfloat16


def saved_dtype(path) -> torch.dtype | None:
    """The dtype config.json says a checkpoint's weights are in (None: not said, or not readable)."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    name = str(getattr(cfg, "dtype", None)).removeprefix("torch.")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def frozen_copy(student) -> torch.nn.Module:
    """Full fine-tuning's π0 (and πt with the hook): a frozen float32 copy of the student at step 0. It
    computes as the student does (under its autocast, or sharded with its MixedPrecisionPolicy), on the same
    bf16 weights at step 0; a pure-bf16 copy would start from other weights (the rounded ones) and put a floor
    under every KL it measures."""
    return copy.deepcopy(student).requires_grad_(False).eval()


def computes_in_bf16(device) -> bool:
    """Does Stage 3 compute in bf16 on this device (CUDA), or in float32 (the CPU)?"""
    return torch.device(device).type in BF16_DEVICES


def training_autocast(device, sharded: bool = False):
    """The context of Stage 3's forward passes (sampling, πt, π0, the student): bf16 autocast over float32
    weights where Stage 3 computes in bf16, but not sharded: there every unit already computes on the bf16
    weights FSDP2 gathered (mixed_precision), and autocast would keep some ops in float32 on top."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_in_bf16(device) and not sharded)


def mixed_precision(device):
    """FSDP2's policy for --shard: each unit gathers its float32 slices as bf16 weights and computes on them,
    its gradients reduce-scatter in float32 into float32 slices, and AdamW updates float32 master weights and
    moments. Its π0 copy takes the same policy, so at step 0 both gather the same bf16 weights. On the CPU
    (float32): no casts, as without --shard."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if not computes_in_bf16(device):
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@torch.no_grad()
def merge_lora(student, dtype: torch.dtype = torch.float32):
    """A peft LoRA model merged into a plain model of `dtype`, the merge done in float32 on the CPU:
    W + B·A·α/r added to a bf16 W in place would lose every element of the update below W's rounding step."""
    merged = student.to("cpu", torch.float32).merge_and_unload()
    return merged.to(dtype).eval()


@torch.no_grad()
def surviving_update(student, base) -> float:
    """The share of the weights that differ from π0's (the update) and still differ after rounding to bf16:
    1.0 means rounding keeps every changed weight changed, 0.0 that the bf16 student is π0."""
    changed = kept = 0
    base_params = dict(base.named_parameters())
    for name, p in student.named_parameters():
        if name not in base_params or base_params[name].shape != p.shape:
            continue
        b = base_params[name].to("cpu", torch.float32)
        w = p.detach().to("cpu", torch.float32)
        moved = w != b
        changed += int(moved.sum())
        kept += int((moved & (w.to(torch.bfloat16).float() != b.to(torch.bfloat16).float())).sum())
    return kept / changed if changed else 1.0


def to_bf16_with_warning(student, base, name: str):
    """The student rounded to bf16, after one warning line that says how much of its update survives."""
    share = surviving_update(student, base) if base is not None else None
    kept = "π0 not loaded" if share is None else f"{share:.0%} of its changed weights still differ from π0's"
    print(f"warning: {name} was saved in float32 and is evaluated in bf16 (--dtype bf16): {kept}",
          file=sys.stderr)
    return student.to(torch.bfloat16)
