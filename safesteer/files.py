"""The stages' files: prompt sets in, JSON, JSONL and safetensors out, each written whole or not at all.

    read_prompts, read_records, truncate_prompts     .jsonl / .json / .csv / .txt prompt files; data_file
    write_json, write_jsonl, write_text, save_tensors  atomic: a temp file beside the target, then a rename
    load_json, run_info, run_dir, prepare_out_dir
    exclusive                                        one writer at a time (a lock the kernel releases)
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from safesteer.errors import UserError

PROJECT_DIR = Path(__file__).resolve().parents[1]  # the repository: data/ beside the stages
DATA_DIR = PROJECT_DIR / "data"
PROMPT_FIELDS = ("prompt", "instruction", "goal", "behavior", "question")


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


def sha256(path) -> str:
    """The file's sha256, read in blocks (a student's weights never sit in memory at once)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def run_dir(out: str | Path) -> Path:
    """--out as a folder, created if need be; a file of that name is a one-line error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    return out


def prepare_out_dir(out: str | Path, outputs: list[str], overwrite: bool) -> Path:
    """Create the run directory; refuse to clobber this stage's earlier results unless --overwrite."""
    out = run_dir(out)
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace")
    return out


@contextlib.contextmanager
def exclusive(path: Path, what: str):
    """Hold `path` as a lock for the block: one writer at a time. The lock is the kernel's (flock), so a
    process that dies, even by kill -9, releases it; a second process reads who holds it and stops with one
    line. The file names the holder (pid, host, start) and is removed on release."""
    import fcntl
    import socket
    import time
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{what} is being written by {holder} (lock {path}); wait for it to "
                            "finish") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break  # ours, and still the file at that path (not one a leaving holder just removed)
        os.close(fd)
    stale = os.read(fd, 4096).decode(errors="replace").strip()
    if stale:
        print(f"warning: {path} was left by {stale}, which has stopped; taking it over", file=sys.stderr)
    os.ftruncate(fd, 0)
    me = f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.pwrite(fd, me.encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
