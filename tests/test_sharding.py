"""safesteer/scale/sharding.py in one gloo process (slices of 1/1): a model built on meta and filled from the
host copy is the
model one process loads; where Stage 3 computes in bf16, FSDP2's mixed precision replaces autocast. Two
processes, memory and training: tests/test_parallel.py."""
import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from safesteer.chat import encode_chats
from safesteer.hooks import decoder_layers
from safesteer.teacher import Teacher
import distill as dl
from safesteer.scale import parallel
from safesteer.scale import precision
from safesteer.scale import sharding
from safesteer import forcing


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


# ----------------------------------------------------------------------------- bf16: FSDP2's mixed precision

def one_process_world(sharded: bool) -> parallel.World:
    world = parallel.World.__new__(parallel.World)
    world.rank, world.size, world.sharded, world.device = 0, 1, sharded, torch.device("cpu")
    return world


def fixed_steps(student, frozen, tok, world, monkeypatch, steps: int = 4, lora: bool = False):
    """train_step `steps` times on fixed samples (2 harmful prompts + 1 anchor, G = 2), πt a random hook on
    the frozen copy (LoRA: on the student with its adapters off); (records, the optimiser). The sampler still
    runs first: FSDP2 fixes a unit's dtypes at its first forward from what requires grad, and peft's
    disable_adapter (π0, πt) turns requires_grad off, so a first forward as π0 would reduce in bf16."""
    prompts = ["hello there", "how do I do x?", "what is 2+2"]
    ids, mask = encode_chats(tok, [p for p in prompts for _ in range(2)])
    comp = torch.randint(0, 200, (6, 8), generator=torch.Generator().manual_seed(0))
    real = dl.sample

    def fixed(*a, **k):  # the student samples, as in Stage 3 (its first forward), and the samples are fixed
        real(*a, **k)
        return comp, torch.ones_like(comp)
    monkeypatch.setattr(dl, "sample", fixed)
    vec = torch.randn(student.config.hidden_size, generator=torch.Generator().manual_seed(2)) * 3
    off = student.disable_adapter if lora else contextlib.nullcontext
    teachers = (Teacher(frozen, "hook", vec, 1, base_context=off),
                Teacher(frozen, "base", base_context=off))
    recipe = dl.Recipe(samples=2, max_new_tokens=8, micro_batch=3, lr=1e-3)
    loop = dl.Loop(*dl.make_optimizer(student, recipe, 10), torch.Generator().manual_seed(0), world)
    s_ids = torch.arange(10, 40)
    return [dl.train_step(student, tok, prompts[:2], prompts[2:], teachers, s_ids, recipe, loop)
            for _ in range(steps)], loop.opt


def step0_kl(student, frozen, tok, one_path: bool) -> float:
    """KL(πs ‖ π0) at step 0: both on the student's path (packed, train mode; no graph is kept), or as Stage 3
    computes them (π0 in eval mode through prefill and its KV cache). A sharded root stays gathered after a
    forward without backward: it is sharded again, lest the optimiser be given gathered weights for slices."""
    ids, mask = encode_chats(tok, [p for p in ["hello there", "how do I do x?"] for _ in range(4)])
    comp = torch.randint(0, 200, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ls = forcing.completion_logits(student.train(), ids, mask, comp)
        lt = forcing.completion_logits(frozen.train(one_path), ids, mask, comp, share_prefix=False)
    for m in (student, frozen):
        if hasattr(m.eval(), "reshard"):
            m.reshard()
    return dl.full_kl_formula(ls.flatten(0, 1), lt.flatten(0, 1)).mean().item()


def test_sharded_bf16_is_fsdp2_mixed_precision(model_dir, tok, one_process_group, monkeypatch):
    """Where Stage 3 computes in bf16 (CUDA; here the CPU, switched on by precision.BF16_DEVICES) --shard
    takes FSDP2's MixedPrecisionPolicy(bf16, reduce float32) on every unit of the student and of π0's frozen
    copy, and no autocast: every linear layer computes on bf16 weights and inputs.
    (a) At step 0 both gather the same bf16 weights: on one path their logits are equal and KL(πs ‖ π0) is
    exactly 0 (against a float32 π0 it is 2.6e-4). On Stage 3's two paths (π0 through a KV cache) what is
    left is the floor of bf16 compute: 4.7e-5 here, 1.9e-5 under autocast.
    (b) Four steps on fixed samples give losses and gradient norms within 5% (or 1e-4) of one process under
    bf16 autocast over float32 weights. Not closer: the policy also rounds to bf16 what autocast leaves in
    float32 (the embeddings' output, the residual stream, the norms' weights), so with this tiny model's large
    weights its logits differ from autocast's by up to 0.13 of 4.4 (as much as autocast's differ from
    float32's); measured: the loss 1.0% apart at most, the anchor loss 2.9%, a gradient norm 3.5%.
    (c) The slices, and AdamW's moments, stay float32; the update reaches every weight."""
    monkeypatch.setattr(precision, "BF16_DEVICES", {"cuda", "cpu"})
    args = dl.parse_args(["--model", str(model_dir)])
    build = lambda on: parallel.build_student(args, torch.device("cpu"), on)
    student, frozen, _ = sharding.sharded_models(build, torch.device("cpu"), True, False)
    units = [*decoder_layers(student), student, *decoder_layers(frozen), frozen]
    assert {(u._get_fsdp_state()._mp_policy.param_dtype, u._get_fsdp_state()._mp_policy.reduce_dtype)
            for u in units} == {(torch.bfloat16, torch.float32)}
    plain = build(None)[0]
    plain_frozen = precision.frozen_copy(plain)
    start = {n: p.full_tensor().clone() for n, p in student.named_parameters()}

    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add((m.weight.dtype, i[0].dtype)))
             for m in [*student.modules(), *frozen.modules()] if isinstance(m, torch.nn.Linear)]
    assert step0_kl(student, frozen, tok, one_path=True) == 0.0
    for h in hooks:
        h.remove()
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert step0_kl(student, plain_frozen, tok, one_path=True) > 1e-4  # a float32 π0 is not πs at step 0
    floor = step0_kl(student, frozen, tok, one_path=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_floor = step0_kl(plain, plain_frozen, tok, one_path=False)
    assert 0 < floor < 1e-4 and 0 < autocast_floor < 1e-4  # measured 4.7e-5 and 1.9e-5

    sharded, opt = fixed_steps(student, frozen, tok, one_process_world(True), monkeypatch)
    autocast, _ = fixed_steps(plain, plain_frozen, tok, one_process_world(False), monkeypatch)
    for a, b in zip(sharded, autocast):
        for k in ("loss", "collapsed", "partial", "full", "anchor_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=5e-2, abs=1e-4), k

    local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731  (a DTensor's slice)
    frozen.reshard()  # π0 has no backward: FSDP2 leaves its root gathered (bf16) after each forward
    assert {local(p).dtype for p in [*student.parameters(), *frozen.parameters()]} == {torch.float32}
    moments = {local(v).dtype for state in opt.state.values() for k, v in state.items() if k != "step"}
    assert moments == {torch.float32}
    assert all(not torch.equal(p.full_tensor(), start[n]) for n, p in student.named_parameters())


def test_sharded_bf16_lora_trains_float32_adapters(model_dir, tok, one_process_group, monkeypatch):
    """LoRA under the same policy: the base is bf16 (as on CUDA), the adapters compute in bf16 from float32
    slices, and AdamW's moments are float32. Losses and gradient norms equal one process's under autocast
    (to the last digit), which also runs the adapters' matmuls in bf16 on the bf16 residual stream."""
    monkeypatch.setattr(precision, "BF16_DEVICES", {"cuda", "cpu"})
    args = dl.parse_args(["--model", str(model_dir), "--lora-rank", "4"])
    build = lambda on: parallel.build_student(args, torch.device("cpu"), on)
    torch.manual_seed(0)
    student, _, _ = sharding.sharded_models(build, torch.device("cpu"), True, True)
    torch.manual_seed(0)
    plain = build(None)[0]
    sharded, opt = fixed_steps(student, student, tok, one_process_world(True), monkeypatch, lora=True)
    autocast, _ = fixed_steps(plain, plain, tok, one_process_world(False), monkeypatch, lora=True)
    for a, b in zip(sharded, autocast):
        for k in ("loss", "collapsed", "full", "anchor_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731
    dtypes = {("lora_" in n, local(p).dtype) for n, p in student.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    moments = {local(v).dtype for state in opt.state.values() for k, v in state.items() if k != "step"}
    assert moments == {torch.float32}
    assert len(opt.state) == sum("lora_" in n for n, _ in student.named_parameters())  # what trains
