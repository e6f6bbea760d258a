"""A run directory's files as the stages wrote them: read, checked for shape, never recomputed.

    Stage 1   direction.json, candidates.json, steering_check.json
    Stage 2   safety_tokens.json
    Stage 3   STUDENT/safesteer.json and STUDENT/train_log.jsonl, for every student folder
    Stage 4   eval.json, eval.md, eval_samples.jsonl

A stage that did not run here leaves its files absent (its section says so); a file that is there but is not
JSON, or not the stage's kind of JSON, is a one-line error naming it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safesteer.errors import UserError
from safesteer.files import load_json, sha256


@dataclass
class Student:
    """A folder of RUN_DIR that Stage 3 (or a baseline's trainer) wrote: its record and its log."""
    name: str
    path: Path
    meta: dict = field(default_factory=dict)  # safesteer.json
    log: list[dict] = field(default_factory=list)  # train_log.jsonl, one record per optimiser step


@dataclass
class Run:
    path: Path
    direction: dict | None = None
    candidates: dict | None = None
    steering: dict | None = None
    tokens: dict | None = None
    students: list[Student] = field(default_factory=list)
    evaluation: dict | None = None
    table: str | None = None
    samples: list[dict] | None = None
    read: list[Path] = field(default_factory=list)  # every file the report is built from
    warnings: list[str] = field(default_factory=list)

    def stage_file(self, name: str, *keys: str) -> dict | None:
        """RUN_DIR/name as a dict holding `keys`, or None when the file is absent."""
        path = self.path / name
        if not path.is_file():
            return None
        data = load_json(path)
        missing = [k for k in keys if not isinstance(data, dict) or k not in data]
        if missing:
            raise UserError(f"{path}: not the stage's file (no {', '.join(missing)})")
        self.read.append(path)
        return data


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line that is not a JSON object is an error naming it."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object")
        rows.append(row)
    return rows


def student_folders(run_dir: Path) -> list[Path]:
    """The folders holding a train_log.jsonl or a safesteer.json, `student` first; a checkpoint folder
    (NAME.work) or a hidden one (a write in progress) is not a student."""
    found = [d for d in run_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
             and not d.name.endswith(".work")
             and ((d / "train_log.jsonl").is_file() or (d / "safesteer.json").is_file())]
    return sorted(found, key=lambda d: (d.name != "student", d.name))


def load_run(run_dir: str | Path) -> Run:
    """Every stage's files in run_dir (see the module's docstring)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    run = Run(path)
    run.direction = run.stage_file("direction.json", "layer", "coefficient")
    run.candidates = run.stage_file("candidates.json", "candidates")
    run.steering = run.stage_file("steering_check.json", "samples")
    run.tokens = run.stage_file("safety_tokens.json", "token_ids", "tokens", "votes")
    for folder in student_folders(path):
        student = Student(folder.name, folder)
        if (folder / "safesteer.json").is_file():
            student.meta = load_json(folder / "safesteer.json")
            if not isinstance(student.meta, dict):
                raise UserError(f"{folder / 'safesteer.json'}: not a student's record (a JSON object)")
            run.read.append(folder / "safesteer.json")
        if (folder / "train_log.jsonl").is_file():
            student.log = read_jsonl(folder / "train_log.jsonl")
            run.read.append(folder / "train_log.jsonl")
        run.students.append(student)
    run.evaluation = run.stage_file("eval.json", "models")
    if (path / "eval.md").is_file():
        run.table = (path / "eval.md").read_text()
        run.read.append(path / "eval.md")
    samples = path / "eval_samples.jsonl"
    if samples.is_file():
        run.samples = read_jsonl(samples)
        run.read.append(samples)
        for i, row in enumerate(run.samples, 1):
            if not {"model", "set", "prompt", "completion"} <= set(row):
                raise UserError(f"{samples}:{i}: not a line of Stage 4's samples "
                                f"(model, set, prompt, completion)")
        expected = (run.evaluation or {}).get("samples_sha256")
        if expected and sha256(samples) != expected:  # Stage 4 names the samples it wrote with eval.json
            run.warnings.append("eval_samples.jsonl is not the file eval.json names (its sha256 differs)")
    if not run.read:
        raise UserError(f"{path}: holds none of the stages' files (direction.json, safety_tokens.json, "
                        f"a student folder, eval.json ...)")
    return run
