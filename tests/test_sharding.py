"""sharding.py in one gloo process (slices of 1/1): a model built on meta and filled from the host copy is the
model one process loads. Two processes, memory and training: tests/test_parallel.py."""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import distill as dl
import parallel
import sharding


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("lora, bf16", [(False, False), (True, False), (True, True)])
def test_a_sharded_model_holds_what_one_process_loads(model_dir, one_process_group, lora, bf16):
    """Built on meta and filled from the host copy, the student holds one process's weights, its buffers (the
    rotary frequencies, which no state dict holds: float32 under a bf16 base) and, with LoRA, the adapters one
    process draws from the same seed (peft draws even for a meta model); a tied head stays tied; full
    fine-tuning's π0 is a frozen copy. bf16: LoRA's dtypes on CUDA (build_student told "cuda", built on the
    CPU). Checked: without the buffers' copy or without fork_rng around the meta build, this fails."""
    args = dl.parse_args(["--model", str(model_dir), *(["--lora-rank", "4"] if lora else [])])
    build = lambda on: parallel.build_student(args, torch.device("cuda" if bf16 else "cpu"), on)
    torch.manual_seed(0)
    student, frozen, _ = sharding.sharded_models(build, torch.device("cpu"), True, lora)
    weights = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True))
    buffers = dict(student.named_buffers())
    torch.manual_seed(0)
    plain = build(torch.device("cpu"))[0]
    assert (frozen is student) if lora else not any(p.requires_grad for p in frozen.parameters())
    assert weights.keys() == plain.state_dict().keys()
    assert all(torch.equal(weights[k], v) and weights[k].dtype == v.dtype
               for k, v in plain.state_dict().items())
    assert all(torch.equal(buffers[n], b) and buffers[n].dtype == b.dtype for n, b in plain.named_buffers())
    assert {b.dtype for b in buffers.values()} == {torch.float32}
    assert (torch.bfloat16 in {w.dtype for w in weights.values()}) == bf16
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    if not lora:
        frozen_weights = get_model_state_dict(frozen, options=StateDictOptions(full_state_dict=True))
        assert all(torch.equal(frozen_weights[k], v) for k, v in plain.state_dict().items())
