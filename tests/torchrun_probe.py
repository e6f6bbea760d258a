"""distill.py under torchrun, watched from outside (tests/test_parallel.py runs it in distill.py's place):

    python -m torch.distributed.run --nproc-per-node 2 tests/torchrun_probe.py DISTILL_ARGS...

PROBE_OUT=DIR      each rank writes DIR/rank<r>.json: every fully_shard call (were the unit's parameters still
                   on the meta device; how many bytes of them were materialised), the process's resident
                   memory (VmRSS) before the models were built and its peak (VmHWM) once they were, and
                   whether the student's head is still its embeddings' parameter
PROBE_STOP=build   stop (exit 0) once the models are built: loading is all that is measured
PROBE_STOP=N       raise KeyboardInterrupt after step N (after its checkpoint), as a run killed there would
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed.fsdp as fsdp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RANK, STOP, OUT = int(os.environ.get("RANK", "0")), os.environ.get("PROBE_STOP"), os.environ.get("PROBE_OUT")
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


fsdp.fully_shard = watched_fully_shard  # before sharding.py imports it

import distill  # noqa: E402  (after the patch above)
import parallel  # noqa: E402
import peft  # noqa: E402,F401  (imported before the measure, lest their code count as the models' memory)
import sharding  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401

real_build, real_after_step = distill.build_models, parallel.Loop.after_step


def watched_build(*args, **kwargs):
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    RECORD["rss_before_mb"] = memory_mb("VmRSS")
    models = real_build(*args, **kwargs)
    RECORD["peak_mb"] = memory_mb("VmHWM")
    head, embeddings = models[0].get_output_embeddings().weight, models[0].get_input_embeddings().weight
    RECORD["head_is_embedding"] = head is embeddings  # tied: one parameter, not two equal ones
    if OUT:
        Path(OUT, f"rank{RANK}.json").write_text(json.dumps(RECORD))
    if STOP == "build":
        sys.exit(0)
    return models


def stopping_after_step(loop, student, log, step, n_steps):
    real_after_step(loop, student, log, step, n_steps)
    if STOP not in (None, "build") and step == int(STOP):
        raise KeyboardInterrupt


distill.build_models = watched_build
parallel.Loop.after_step = stopping_after_step

if __name__ == "__main__":
    distill.main(sys.argv[1:])
