"""Tiny models and tokenizers built in memory: the unit tests never need the 98 MB bundled model."""
import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and a second busy process on a 2-core box makes them 20x slower.
# Subprocesses (a stage's command line, torchrun) get one thread too, so their numbers match in-process runs.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

CHATML = ("{% for m in messages %}"
          "{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def make_tokenizer(template: str = CHATML):
    """A byte-level BPE with no merges (every byte is a token) plus chat special tokens: ~265 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk.add_special_tokens(specials)
    eos = "<|im_end|>" if template == CHATML else "<|eot_id|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token="<|endoftext|>",
                                  bos_token="<|begin_of_text|>", chat_template=template)
    tok.padding_side = "left"
    return tok


def make_model(tok, layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so outputs differ visibly between prompts
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def model(tok):
    return make_model(tok)


@pytest.fixture
def model_dir(tmp_path, tok, model):
    """The tiny model saved as a transformers directory, for the stage scripts' --model."""
    d = tmp_path / "tiny_model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- model families
# Each family's chat format written out as its own template does it, with its real special tokens, on a
# byte-level tokenizer (every byte a token) and a tiny random model of the family's architecture. Offline, in
# memory.

QWEN3 = ("{%- if messages[0].role == 'system' %}"
         "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
         "{%- endif %}{%- for m in messages %}{%- if m.role != 'system' %}"
         "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
         "{%- if enable_thinking is defined and enable_thinking is false %}"
         "{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
         "{%- endif %}")
QWEN25 = ("{%- if messages[0].role == 'system' %}"
          "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
          "{%- else %}"
          "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
          "<|im_end|>\n' }}{%- endif %}{%- for m in messages %}{%- if m.role != 'system' %}"
          "{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
          "{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}"
          "{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
          "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3 = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
          "{%- set prefix = messages[0]['content'] + '\n\n' -%}"
          "{%- set loop_messages = messages[1:] -%}{%- else -%}"
          "{%- set prefix = '' -%}{%- set loop_messages = messages -%}"
          "{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}"
          "{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
          "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
          "{{ message['content'] | trim }}"
          "{{ '<end_of_turn>\n' }}{%- endfor -%}"
          "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
GEMMA_SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]

# name: (template, special tokens, other added tokens, bos, eos, pad, end of turn, post-instruction text,
# config)
FAMILIES = {
    "smollm2": (CHATML, CHATML_SPECIALS, [], None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                "<|im_end|>\n<|im_start|>assistant\n", ("LlamaConfig", dict(tie_word_embeddings=True))),
    "qwen3": (QWEN3, CHATML_SPECIALS, ["<think>", "</think>"], None, "<|im_end|>", "<|endoftext|>",
              "<|im_end|>", "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
              ("Qwen3Config", dict(head_dim=8, tie_word_embeddings=True))),
    "qwen2.5": (QWEN25, CHATML_SPECIALS, [], None, "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                "<|im_end|>\n<|im_start|>assistant\n", ("Qwen2Config", dict(tie_word_embeddings=False))),
    "llama3": (LLAMA3, LLAMA3_SPECIALS, [], "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               ("LlamaConfig", dict(tie_word_embeddings=False, rope_scaling={
                   "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}))),
    "gemma2": (GEMMA2, GEMMA_SPECIALS, [], "<bos>", "<eos>", "<pad>", "<end_of_turn>",
               "<end_of_turn>\n<start_of_turn>model\n",
               ("Gemma2Config", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                     final_logit_softcapping=30.0, attn_logit_softcapping=50.0))),
    "gemma3": (GEMMA3, GEMMA_SPECIALS, [], "<bos>", "<eos>", "<pad>", "<end_of_turn>",
               "<end_of_turn>\n<start_of_turn>model\n",
               ("Gemma3TextConfig", dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=16))),
}
ARCH = {"LlamaConfig": "LlamaForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
        "Qwen2Config": "Qwen2ForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
        "Gemma3TextConfig": "Gemma3ForCausalLM"}


def make_family_tokenizer(name: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    template, specials, added, bos, eos, pad = FAMILIES[name][:6]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tk.add_tokens([AddedToken(t, special=False) for t in added])  # Qwen3's think tags are not special
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                   chat_template=template)


def make_family_model(name: str, tok, layers: int = 3, hidden: int = 32, seed: int = 0):
    import transformers
    cfg_name, extra = FAMILIES[name][8]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    model = getattr(transformers, ARCH[cfg_name])(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(params=list(FAMILIES), scope="module")
def family_dir(request, tmp_path_factory):
    """(family name, a saved model directory of that family): what a user points --model at."""
    name = request.param
    d = tmp_path_factory.mktemp(name.replace(".", "_"))
    tok = make_family_tokenizer(name)
    make_family_model(name, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return name, d


def kill_at_step(monkeypatch, module, n: int):
    """Make module.train_step raise KeyboardInterrupt on its n-th call, as a run killed during step n would;
    returns the real train_step so that a test can put it back before resuming."""
    real, calls = module.train_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(module, "train_step", dying_step)
    return real


def checkpoint_weights(work: Path, tmp_path: Path) -> dict:
    """The trained weights a run's checkpoint holds (work/checkpoint.pt names a torch.distributed.checkpoint
    folder of per-rank slices), as whole tensors by parameter name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    folder = work / torch.load(work / "checkpoint.pt", weights_only=False)["weights"]
    dcp_to_torch_save(folder, tmp_path / "checkpoint_weights.pt")
    return torch.load(tmp_path / "checkpoint_weights.pt", weights_only=False)["model"]
