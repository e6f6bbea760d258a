"""bench/memory_model.py: the training term in float32 and in bf16; what the validation baseline holds."""
import sys

from bench import memory_model
from safesteer.models import BUNDLED_MODEL

TINY = dict(h=256, I=768, L=8, V=49152, H=4, kv=2, d=64, tied=True)


def _training(c):
    return memory_model.predict(TINY, lora_rank=8, c=c, rows=16, micro_batch=8, prompt=60, new=48,
                                attn_s2=c == 4)["training"]


def test_float32_holds_the_logits_gradient_or_the_loss_chunks_not_both():
    """On the CPU the lean loss's chunks are freed before its backward writes the gradient in place: the
    larger of the gradient, _logsumexp's chunk and the full KL's 5 [128, V] temporaries (here the last)."""
    t = _training(4)
    v = TINY["V"]
    assert "loss chunk" not in t and "logits gradient" not in t
    assert t["logits gradient or loss chunks"] == max(8 * 48 * v * 4, 256 * v * 4 * 2, 5 * 128 * v * 4)


def test_bf16_keeps_the_sum():
    """The GPU's prediction (bf16) is unchanged: gradient and chunk counted together."""
    t = _training(2)
    v = TINY["V"]
    assert t["logits gradient"] == 8 * 48 * v * 2 and t["loss chunk"] == 256 * v * 4 * 2


def test_baseline_imports_what_a_models_first_load_imports():
    """transformers imports a model's module (and torch._dynamo, sympy... ~125 MB) on its first load: the
    validation's child imports it before reading its baseline, so the step is not charged for it."""
    memory_model.import_on_first_load(BUNDLED_MODEL, lora=True)
    assert "transformers.models.llama.modeling_llama" in sys.modules
    assert "peft" in sys.modules
