"""distill.py under torchrun, watched from outside (tests/test_parallel.py runs it in distill.py's place):

    python -m torch.distributed.run --nproc-per-node 2 tests/torchrun_probe.py DISTILL_ARGS...

PROBE_OUT=DIR      each rank writes DIR/rank<r>.json: every fully_shard call (were the unit's parameters still
                   on the meta device; how many bytes of them were materialised), the process's resident
                   memory (VmRSS) before the models were built and its peak (VmHWM) once they were, and
                   whether the student's head is still its embeddings' parameter
PROBE_STOP=build   stop (exit 0) once the models are built: loading is all that is measured
PROBE_STOP=N       raise KeyboardInterrupt after step N (after its checkpoint), as a run killed there would
PROBE_BF16=1       CUDA's dtype policy on the CPU (precision.BF16_DEVICES gets "cpu"): with --shard, FSDP2's
                   bf16 mixed precision. DIR/rank<r>.json then also holds, once the models are built, the
                   student's and π0's logits on one path (step0: equal? their KL, dtype) and, after the last
                   step, the dtypes of the student's slices and AdamW's moments, and each unit's policy
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed.fsdp as fsdp

RANK, STOP, OUT = int(os.environ.get("RANK", "0")), os.environ.get("PROBE_STOP"), os.environ.get("PROBE_OUT")
BF16 = os.environ.get("PROBE_BF16")
RECORD = {"fully_shard": []}
real_fully_shard = fsdp.fully_shard


def memory_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def watched_fully_shard(module, *args, **kwargs):
    params = list(module.parameters())
    real = [getattr(p, "_local_tensor", p) for p in params if p.device.type != "meta"]  # DTensor: its slice
    RECORD["fully_shard"].append({"params": len(params), "all_meta": not real,
                                  "materialised_bytes": sum(p.numel() * p.element_size() for p in real)})
    return real_fully_shard(module, *args, **kwargs)


fsdp.fully_shard = watched_fully_shard  # before safesteer/scale/sharding.py imports it

import distill  # noqa: E402  (after the patch above)
from safesteer.scale import parallel
from safesteer.scale import precision
import peft  # noqa: E402,F401  (imported before the measure, lest their code count as the models' memory)
from safesteer.scale import sharding
import transformers.models.llama.modeling_llama  # noqa: E402,F401

real_build, real_after_step = distill.build_models, parallel.Loop.after_step
if BF16:
    precision.BF16_DEVICES = {"cuda", "cpu"}


def write_record() -> None:
    if OUT:
        Path(OUT, f"rank{RANK}.json").write_text(json.dumps(RECORD))


def step0_one_path(student, frozen, tok) -> dict:
    """πs's and π0's logits at step 0 computed the same way (the student's path, without a graph): under
    FSDP2's bf16 policy both gather the same bf16 weights, so they must be equal and their KL exactly 0."""
    from safesteer.chat import encode_chats
    from safesteer.forcing import completion_logits
    ids, mask = encode_chats(tok, ["hello there", "how do I do x?"])
    comp = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [completion_logits(m.train(), ids, mask, comp) for m in (student, frozen)]
    for m in (student, frozen):  # a root stays gathered after a forward without backward: shard it again,
        m.eval()  # or the optimiser, made next, would hold the gathered weights instead of the slices
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()
    kl = distill.full_kl_formula(logits[0].flatten(0, 1), logits[1].flatten(0, 1)).mean().item()
    return {"equal": torch.equal(*logits), "kl": kl, "dtype": str(logits[0].dtype)}


def dtypes(student, opt) -> dict:
    """What the student holds after training: its slices' and AdamW's dtypes, and each unit's policy."""
    local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731  (a DTensor's slice)
    units = [m for m in student.modules() if isinstance(m, fsdp.FSDPModule)]
    return {"master": sorted({str(local(p).dtype) for p in student.parameters()}),
            "adam": sorted({str(local(v).dtype) for st in opt.state.values() for k, v in st.items()
                            if k != "step"}),
            "policies": sorted({f"{u._get_fsdp_state()._mp_policy.param_dtype}/"
                                f"{u._get_fsdp_state()._mp_policy.reduce_dtype}" for u in units}),
            "units": len(units)}


def watched_build(*args, **kwargs):
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    RECORD["rss_before_mb"] = memory_mb("VmRSS")
    models = real_build(*args, **kwargs)
    RECORD["peak_mb"] = memory_mb("VmHWM")
    head, embeddings = models[0].get_output_embeddings().weight, models[0].get_input_embeddings().weight
    RECORD["head_is_embedding"] = head is embeddings  # tied: one parameter, not two equal ones
    if BF16:
        RECORD["step0"] = step0_one_path(models[0], models[3].model, models[1])
    write_record()
    if STOP == "build":
        sys.exit(0)
    return models


def stopping_after_step(loop, student, log, step, n_steps):
    real_after_step(loop, student, log, step, n_steps)
    if BF16 and step == n_steps:
        RECORD["after"] = dtypes(student, loop.opt)
        write_record()
    if STOP not in (None, "build") and step == int(STOP):
        raise KeyboardInterrupt


distill.build_models = watched_build
parallel.Loop.after_step = stopping_after_step

if __name__ == "__main__":
    distill.main(sys.argv[1:])
