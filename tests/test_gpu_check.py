"""bench/gpu_check.py with --tiny on the CPU, and the GPU paths it measures that a CPU can check: which path
packing takes (forcing.packing_path) and the line Stage 3 prints about it."""
import copy
from types import SimpleNamespace

import torch

from conftest import make_model


class Spy(torch.nn.Module):
    """A model that records the attention masks it is given, under the attention implementation `impl`."""

    def __init__(self, inner, impl: str):
        super().__init__()
        self.inner, self.masks = inner, []
        self.config = copy.deepcopy(inner.config)
        self.config._attn_implementation = impl

    def forward(self, **kwargs):
        self.masks.append(kwargs["attention_mask"].dim())
        return self.inner(**kwargs)


def test_packing_falls_back_where_the_4d_mask_is_ignored(tok):
    """flash_attention_2 and flex_attention take no 4-D mask: a packed row would attend across samples. Such
    a student scores a row per sample (2-D masks), with the same logits, and Stage 3's log says so."""
    from safesteer.chat import encode_chats
    from safesteer.forcing import completion_logits, packing_path
    model = make_model(tok).train()
    ids, mask = encode_chats(tok, ["hi", "hi", "hi", "bye", "bye", "bye"])
    comp = torch.randint(0, 200, (6, 5), generator=torch.Generator().manual_seed(0))
    reference = completion_logits(model, ids, mask, comp, pack=False)
    for impl, dims in (("sdpa", {4}), ("eager", {4}), ("flash_attention_2", {2}), ("flex_attention", {2})):
        spy = Spy(model, impl).train()
        got = completion_logits(spy, ids, mask, comp)
        assert set(spy.masks) == dims, impl
        assert torch.allclose(got, reference, atol=1e-5), impl
        line = packing_path(spy)
        assert line.startswith("packed" if dims == {4} else "unpacked"), line
        assert impl in line
    assert "--no-pack-samples" in packing_path(model, pack=False)


def test_stage3_prints_the_packing_path(tok):
    from safesteer.scale.parallel import Models, World, startup_summary
    student = make_model(tok)
    teacher = SimpleNamespace(describe=lambda: "hook")
    args = SimpleNamespace(prompts_per_step=4, samples=4, loss="collapsed", loss_impl="lean",
                           random_tokens=False, lora_rank=None, pack_samples=True)
    models = Models(student, tok, teacher, teacher, {})
    text = startup_summary(args, 3, 50, models, False, 0, World(torch.device("cpu")))
    assert text.splitlines()[-1] == ("student scores samples packed, each prompt once for its G samples "
                                     "behind a tree mask (sdpa attention)")


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    """Every measurement of bench/gpu_check.py at tiny sizes: a first GPU run should have nothing to debug."""
    import json
    from bench import gpu_check
    gpu_check.main(["--tiny", "--out", str(tmp_path / "check.json")])
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["kl_floor"]["float32_no_autocast"] < 1e-10
    assert report["merge"]["float32_merge_error"] < 1e-2 < report["merge"]["bf16_in_place_error (before)"]
    assert 0 <= report["eval_dtype"]["changed_weights_kept_by_bf16"] <= 1
    assert report["packing"]["path"].startswith("packed")
    assert set(report["memory"]) == {"Qwen3-4B", "Llama-3-8B"}
