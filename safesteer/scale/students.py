"""Where a student is written, and how it stays whole: its folder inside --out, the temporary copies a
stopped save leaves, the recipe its checkpoints keep, and the saving itself (every file, then one rename).

    prepare_output_dirs       OUT/STUDENT and OUT/STUDENT.work, refusing to replace what is not a student
    remove_stale_temporaries  OUT/.STUDENT.tmp-PID-* of a process that has stopped
    recipe_record             what must not change on --resume (each input file by its sha256)
    save_student              a plain transformers directory, the LoRA merged, the training log inside
    saved_along, keeper       --save-at: a copy of the student as it is mid-run, training untouched
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

from safesteer.cost import run_cost
from safesteer.errors import UserError
from safesteer.files import run_dir, sha256, write_jsonl
from safesteer.models import save_model_dir
from safesteer.scale.precision import DTYPES, merge_lora


def saved_along(out: Path, student: str, save_at: list[int], n_steps: int, overwrite: bool,
                sharded: bool) -> None:
    """--save-at's folders OUT/STUDENT-stepN, checked before step 1: steps before the last (the student
    itself is saved then), folders that are not there or are students that `overwrite` may replace (pass
    --overwrite or --resume: a resumed run saves again those its checkpoint comes before)."""
    if save_at and sharded:
        raise UserError("--save-at works without --shard")
    late = [n for n in save_at if n >= n_steps]
    if late:
        raise UserError(f"--save-at {late[0]} is not before the run's last step ({n_steps}), when the "
                        "student itself is saved")
    for folder in (out / f"{student}-step{n}" for n in sorted(set(save_at))):
        if folder.exists() and not ((folder / "safesteer.json").is_file() and overwrite):
            raise UserError(f"{folder} already exists" + ("" if (folder / "safesteer.json").is_file() else
                            " and is not a student") + "; pass --overwrite to replace a student")


def prepare_output_dirs(out: Path, student: str, overwrite: bool, resume: bool) -> tuple[Path, Path]:
    """(OUT/STUDENT, OUT/STUDENT.work), after refusing to replace a finished student or an unfinished run (its
    work dir) unless told to; --overwrite clears the unfinished one, and never replaces what is not a student
    (a folder without safesteer.json, a file, another stage's output). Temporary copies that a stopped run
    left behind are removed."""
    out = run_dir(out)
    final_dir, work = out / student, out / f"{student}.work"
    remove_stale_temporaries(out, student)
    if final_dir.exists() and not (final_dir / "safesteer.json").is_file():
        raise UserError(f"{final_dir} exists and is not a student (no safesteer.json): not replaced; choose "
                        "another --student")
    if final_dir.exists() and not overwrite:
        raise UserError(f"{final_dir} already exists; pass --overwrite to replace it")
    if work.exists() and not resume:
        if not overwrite:
            raise UserError(f"{work} holds an unfinished run; pass --resume to continue it or --overwrite "
                            f"to restart")
        shutil.rmtree(work)
    return final_dir, work


def remove_stale_temporaries(out: Path, name: str) -> None:
    """OUT/.NAME.tmp-PID-* (and OUT/.NAME-stepN.tmp-PID-*, --save-at's): a save in progress
    (models.save_model_dir), or left by a process that stopped mid-save; the second kind is removed."""
    for tmp in out.glob(f".{name}*.tmp-*"):
        pid = re.search(r"\.tmp-(\d+)-", tmp.name)
        if pid and not process_alive(int(pid.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# Options that do not change what trains: where things go, how they are computed (the same numbers), when
# checkpoints are written. Every other option is part of a run's recipe and must not change on --resume.
NOT_RECIPE = {"out", "student", "overwrite", "resume", "resume_changing", "device", "checkpoint_every",
              "no_grad_checkpointing", "sample_batch", "save_dtype", "save_at", "shard"}
FILE_OPTIONS = ("prompts", "anchor", "system", "chat_template")  # recorded by content, wherever they are


def recipe_record(args, files: dict[str, object]) -> dict:
    """What a run trains with, as a checkpoint keeps it: every option but NOT_RECIPE's, and for each input
    file (FILE_OPTIONS' and `files`, name: path or list of paths, None: not given) its content's sha256
    instead of its path, so that a moved run directory still resumes and an edited prompt file does not."""
    files = {**{k: getattr(args, k, None) for k in FILE_OPTIONS}, **files}
    record = {k: v for k, v in vars(args).items() if k not in NOT_RECIPE and k not in files}
    for name, paths in files.items():
        paths = paths if isinstance(paths, list) else [] if paths is None else [paths]
        record[name] = [sha256(Path(f)) if Path(f).is_file() else str(f) for f in paths]
    return json.loads(json.dumps(record, default=str))  # plain values, as torch.save and a comparison want


def allowed_changes(names: list[str]) -> set[str]:
    """--resume-changing's names as option names (max-steps or --max-steps -> max_steps)."""
    return {n.lstrip("-").replace("-", "_") for n in names}


def save_student(student, tok, path: Path, info: dict, lora: bool, dtype: str = "float32",
                 log: list[dict] | None = None) -> None:
    """A plain transformers directory in `dtype` ("float32" or "bf16"); with LoRA the weights merged in
    float32 (precision.merge_lora), plus the adapter in adapter/. Everything, the training log included, is
    written into a temporary folder that is renamed into place whole: a student directory is finished."""
    if hasattr(student, "activation_checkpointing_disable"):
        student.activation_checkpointing_disable()
    staged = path.parent / f".{path.name}.tmp-{os.getpid()}-adapter"
    if lora:
        student.save_pretrained(staged)  # peft's own format, before merging
        student = merge_lora(student, DTYPES[dtype])
    else:
        student = student.to(DTYPES[dtype]).eval()

    if log is not None:  # what the steps so far spent (cost.py)
        info = {**info, "cost": run_cost(log, sum(p.numel() for p in student.parameters()))}

    def also(tmp):
        if log is not None:
            write_jsonl(Path(tmp) / "train_log.jsonl", log)
        if lora:
            shutil.move(staged, Path(tmp) / "adapter")
    try:
        save_model_dir(student, tok, path, extra_files={"safesteer.json": info}, also=also)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def keeper(out: Path, name: str, tok, lora: bool, info_at):
    """Loop.keep for --save-at: keep(student, step, log) saves OUT/NAME-stepSTEP with info_at(step), whole,
    from a copy (the LoRA merged on the copy), so that the run goes on with its weights, optimiser and random
    streams untouched."""
    def keep(student, step: int, log: list[dict]) -> None:
        save_student(copy.deepcopy(student), tok, out / f"{name}-step{step}", info_at(step), lora, log=log)
    return keep
