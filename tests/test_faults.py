"""Faults on the tiny model: nothing lost, nothing wrong accepted. Each case asserts its outcome: one line
`error: ...` and exit 2 (no traceback: a stage that raised anything else would fail the test), the run
directory as it was, or a resume equal to an uninterrupted run. Two cases need real processes (a second
writer, SIGTERM); the rest run in this one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distill
import evaluate
from safesteer.artifacts import model_fingerprint
from safesteer.chat import tokenizer_fingerprint
from safesteer.cli import run_cli
from safesteer.files import save_tensors, sha256, write_json
from safesteer.port.specs import earlier_evaluation
from safesteer.scale import parallel, students

ROOT = Path(__file__).resolve().parents[1]


def run(main, argv, capsys):
    """A stage as its command line runs it: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def one_line_error(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err


@pytest.fixture
def out(tmp_path, model_dir, tok):
    """A run directory with Stage 1 and 2 outputs for the tiny model, and a file of another stage."""
    from transformers import AutoConfig
    out = tmp_path / "run"
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    torch.manual_seed(0)
    save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0})
    write_json(out / "safety_tokens.json", {"token_ids": [10, 20, 30, 40], "vocab_size": len(tok),
                                            "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    write_json(out / "eval.json", {"models": {}})
    return out


def argv(model_dir, out, *extra):
    return ["--model", str(model_dir), "--out", str(out), "--prompts-per-step", "2", "--samples", "2",
            "--max-new-tokens", "5", "--max-steps", "4", "--lr", "1e-3", "--checkpoint-every", "2", *extra]


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- names that become paths

@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden"])
def test_a_student_name_that_is_not_one_plain_folder_is_refused_and_nothing_moves(name, model_dir, out,
                                                                                 capsys):
    before = listing(out.parent)
    code, err = run(distill.main, argv(model_dir, out, "--student", name, "--overwrite"), capsys)
    one_line_error(code, err, "must be one plain folder name")
    assert listing(out.parent) == before


@pytest.mark.parametrize("name", ["eval.json", "notes"])
def test_overwrite_never_replaces_what_is_not_a_student(name, model_dir, out, capsys):
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("keep me")
    before = listing(out)
    code, err = run(distill.main, argv(model_dir, out, "--student", name, "--overwrite"), capsys)
    one_line_error(code, err, "is not a student (no safesteer.json): not replaced")
    assert listing(out) == before


def test_out_that_is_a_file_is_one_line(model_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = run(distill.main, argv(model_dir, tmp_path / "f"), capsys)
    one_line_error(code, err, "is a file, not a folder")


# ----------------------------------------------------------------------------- option values

@pytest.mark.parametrize("extra, fragment", [
    (["--warmup", "1"], "--warmup: must be in [0, 1)"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--coefficient", "nan"], "--coefficient: must be a finite number"),
    (["--seed", "1e20"], "--seed: expected an integer"),
    (["--seed", str(2**40)], "--seed: must be in [0, 2**32)"),
    (["--max-new-tokens", "100000000"], "--max-new-tokens 100000000 exceeds the model's context of 512"),
])
def test_option_values_are_checked_before_any_work(extra, fragment, model_dir, out, capsys):
    before = listing(out)
    code, err = run(distill.main, argv(model_dir, out, *extra), capsys)
    one_line_error(code, err, fragment)
    assert listing(out) == before


# ----------------------------------------------------------------------------- files between stages

def edit_json(path, **changes):
    write_json(path, {**json.loads(path.read_text()), **changes})


@pytest.mark.parametrize("changes, fragment", [
    ({"layer": 2.7}, "'layer' must be a block number, got 2.7"),
    ({"layer": "2"}, "'layer' must be a block number, got '2'"),
    ({"layer": True}, "'layer' must be a block number, got True"),
    ({"coefficient": float("nan")}, "'coefficient' must be a finite number"),
    ({"model_fingerprint": "0123456789abcdef"}, "made for another model (fingerprint 0123456789abcdef"),
])
def test_a_bad_direction_json_is_one_line(changes, fragment, model_dir, out, capsys):
    edit_json(out / "direction.json", **changes)
    code, err = run(distill.main, argv(model_dir, out), capsys)
    one_line_error(code, err, fragment)
    assert not (out / "student").exists()


def test_a_nan_direction_is_refused(model_dir, out, capsys):
    vec = load_file(out / "direction.safetensors")["direction"]
    vec[3] = float("nan")
    save_tensors(out / "direction.safetensors", {"direction": vec})
    code, err = run(distill.main, argv(model_dir, out), capsys)
    one_line_error(code, err, "the direction holds NaN or infinite values")


def test_the_direction_of_the_model_it_was_made_for_passes_its_fingerprint(model, tok, model_dir, out):
    """Stage 1 records the fingerprint; the same model (here loaded again, float32) matches it, another
    random model of the same shape does not."""
    from conftest import make_model
    from safesteer.models import load_model
    loaded, _ = load_model(str(model_dir))
    assert model_fingerprint(loaded) == model_fingerprint(model) is not None
    assert model_fingerprint(make_model(tok, seed=1)) != model_fingerprint(model)
    assert model_fingerprint(loaded.to(torch.bfloat16)) == model_fingerprint(model)  # bf16 loads agree


@pytest.mark.parametrize("ids, fragment", [
    ([10, 20, 20, 40], "token id 20 is listed more than once"),
    ([10, 20.0], "token id 20.0 is not an integer"),
    ([10, True], "token id True is not an integer"),
    ([10, -1], "token id -1 is outside the model's vocabulary"),
    ([10, 99999], "token id 99999 is outside the model's vocabulary"),
])
def test_a_bad_token_file_names_the_right_id(ids, fragment, model_dir, out, capsys):
    edit_json(out / "safety_tokens.json", token_ids=ids)
    code, err = run(distill.main, argv(model_dir, out), capsys)
    one_line_error(code, err, fragment)


def test_a_bare_list_of_token_ids_is_one_line(model_dir, out, capsys):
    (out / "safety_tokens.json").write_text("[10, 20]")
    code, err = run(distill.main, argv(model_dir, out), capsys)
    one_line_error(code, err, "no token_ids (a JSON object with a list 'token_ids'")


# ----------------------------------------------------------------------------- resume

def stop_after(step, monkeypatch):
    """Stop the run (as Ctrl-C would) right after step `step` and its checkpoint."""
    real = parallel.Loop.after_step

    def after_step(self, student, log, n, n_steps):
        real(self, student, log, n, n_steps)
        if n == step:
            raise KeyboardInterrupt
    monkeypatch.setattr(parallel.Loop, "after_step", after_step)
    return real


def weights(folder):
    return load_file(folder / "model.safetensors")


def test_a_resume_with_another_recipe_is_refused_by_name_or_recorded_when_allowed(model_dir, out, capsys,
                                                                                   monkeypatch):
    real = stop_after(2, monkeypatch)
    code, _ = run(distill.main, argv(model_dir, out, "--max-steps", "6"), capsys)
    assert code == 130 and (out / "student.work" / "checkpoint.pt").is_file()
    monkeypatch.setattr(parallel.Loop, "after_step", real)
    changed = ((["--lr", "1e-2"], "--lr"), (["--loss", "full"], "--loss"), (["--seed", "3"], "--seed"),
               (["--anchor", str(ROOT / "data" / "harmless_val.jsonl")], "--anchor"))
    for extra, name in changed:
        code, err = run(distill.main, argv(model_dir, out, "--max-steps", "6", "--resume", *extra), capsys)
        one_line_error(code, err, f"--resume: {name} was ")
    assert (out / "student.work" / "checkpoint.pt").is_file() and not (out / "student").exists()
    distill.main(argv(model_dir, out, "--max-steps", "8", "--resume", "--resume-changing", "max-steps"))
    info = json.loads((out / "student" / "safesteer.json").read_text())
    assert info["resumed_with_changes"] == {"from_step": 2, "max_steps": [6, 8]}
    assert info["args"]["max_steps"] == 8 and info["steps"] == 8


def test_a_flipped_checkpoint_byte_resumes_from_the_one_before_to_the_uninterrupted_weights(model_dir, out,
                                                                                           capsys,
                                                                                           monkeypatch):
    distill.main(argv(model_dir, out, "--max-steps", "6", "--student", "whole"))
    real = stop_after(4, monkeypatch)
    assert run(distill.main, argv(model_dir, out, "--max-steps", "6"), capsys)[0] == 130
    monkeypatch.setattr(parallel.Loop, "after_step", real)
    shard = next((out / "student.work" / "weights-4").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-4096:] = bytes(b ^ 0xFF for b in data[-4096:])
    shard.write_bytes(bytes(data))
    distill.main(argv(model_dir, out, "--max-steps", "6", "--resume"))
    assert f"warning: {shard} is damaged or missing" in capsys.readouterr().err
    a, b = weights(out / "whole"), weights(out / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (out / "student" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4, 5, 6]


def test_a_finished_student_holds_its_log_and_a_failed_save_leaves_none(model_dir, out, capsys, monkeypatch):
    """The log is written inside the temporary copy, which is renamed whole; a save that fails midway leaves
    no student, no temporary folder, and the checkpoints to resume from."""
    import safesteer.models as models
    real = models.save_model_dir

    def failing(model, tok, path, extra_files=None, also=None):
        def boom(tmp):
            also(tmp)
            raise OSError(28, "No space left on device")
        return real(model, tok, path, extra_files, boom)
    monkeypatch.setattr(students, "save_model_dir", failing)
    code, err = run(distill.main, argv(model_dir, out), capsys)
    one_line_error(code, err, "could not write")
    assert not (out / "student").exists() and not list(out.glob(".student.tmp-*"))
    assert (out / "student.work" / "checkpoint.pt").is_file()
    monkeypatch.setattr(students, "save_model_dir", real)
    distill.main(argv(model_dir, out, "--resume"))
    assert (out / "student" / "train_log.jsonl").is_file() and not (out / "student.work").exists()


def test_temporary_copies_are_never_models_and_a_dead_ones_are_removed(model_dir, out, capsys):
    dead, alive = out / ".student.tmp-999999999-x", out / f".student.tmp-{os.getpid()}-y"
    for d in (dead, alive):
        d.mkdir()
        write_json(d / "safesteer.json", {})
    listed = evaluate.resolve_models(evaluate.parse_args(["--out", str(out)]), out)
    assert [name for name, _ in listed] == ["base", "teacher"]
    distill.main(argv(model_dir, out, "--max-steps", "2"))
    assert not dead.exists() and alive.exists()  # a save in progress (this process) is left alone


def test_an_evaluation_whose_samples_are_not_its_own_is_not_reused(tmp_path, capsys):
    write_json(tmp_path / "eval.json", {"models": {"base": {"fingerprint": "f"}}, "samples_sha256": "0" * 64})
    (tmp_path / "eval_samples.jsonl").write_text('{"model": "base"}\n')
    assert earlier_evaluation(tmp_path) == ({}, [], {})
    assert "was written with another eval_samples.jsonl" in capsys.readouterr().err
    write_json(tmp_path / "eval.json", {"models": {"base": {"fingerprint": "f"}},
                                        "samples_sha256": sha256(tmp_path / "eval_samples.jsonl")})
    assert earlier_evaluation(tmp_path)[0] == {"base": {"fingerprint": "f"}}


# ----------------------------------------------------------------------------- processes

def start(model_dir, out, *extra):
    cmd = [sys.executable, str(ROOT / "distill.py"), *argv(model_dir, out, "--max-steps", "200", *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(predicate, proc, seconds=3600):
    """Poll until predicate() holds while the process runs: a bound, not an expected speed."""
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_writer_is_refused_a_killed_ones_lock_is_taken_over_and_sigterm_stops_cleanly(
        model_dir, out, capsys):
    lock = out / "student.lock"
    first = start(model_dir, out)
    try:
        wait_for(lock.exists, first)
        code, err = run(distill.main, argv(model_dir, out, "--overwrite"), capsys)
        one_line_error(code, err, f"is being written by process {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock.exists()  # kill -9 leaves the file; the kernel has released the lock itself
    second = start(model_dir, out, "--overwrite")
    try:
        wait_for(lambda: (out / "student.work" / "train_log.jsonl").exists(), second)
        second.send_signal(signal.SIGTERM)
        err = second.communicate(timeout=3600)[1]
    finally:
        second.kill()
    assert f"warning: {lock} was left by process {first.pid}" in err
    assert second.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not lock.exists()  # released on the way out


@pytest.mark.parametrize("damage, fragment", [
    ("cut", "Error while deserializing header"),
    ("config", "its weights' shapes do not match its config.json"),
])
def test_a_damaged_student_is_one_line_in_stage_4(damage, fragment, model_dir, tmp_path, capsys):
    import shutil
    student = tmp_path / "student"
    shutil.copytree(model_dir, student)
    if damage == "cut":
        weights = student / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        edit_json(student / "config.json", hidden_size=48)
    argv = ["--model", str(model_dir), "--out", str(tmp_path / "ev"), "--n-prompts", "2", "--models",
            f"s={student}"]
    code, err = run(evaluate.main, argv, capsys)
    one_line_error(code, err, f"could not load model '{student}': {fragment}")
    assert not (tmp_path / "ev" / "eval.json").exists()


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--qa-new-tokens"])
def test_stage_4_lengths_beyond_the_context_are_one_line(flag, model_dir, tmp_path, capsys):
    code, err = run(evaluate.main, ["--model", str(model_dir), "--out", str(tmp_path / "ev"), flag, "100000"],
                    capsys)
    one_line_error(code, err, f"{flag} 100000 exceeds the model's context of 512 positions")
