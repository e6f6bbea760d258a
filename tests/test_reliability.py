"""Nothing half-written, interrupted training loses nothing, runs are reproducible, long prompts are not cut
silently."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safesteer.files import truncate_prompts, write_json
import distill as dl
from safesteer.errors import UserError
from conftest import checkpoint_weights
from test_distill import args_for, make_run

ROOT = Path(__file__).resolve().parents[1]


def test_killed_writer_leaves_old_file_or_none(tmp_path):
    """SIGKILL a process in the middle of writing: the target holds the old content, never a partial one."""
    target = tmp_path / "out.json"
    write_json(target, {"old": True})
    marker = tmp_path / "halfway"
    code = f"""
import time, pathlib
from safesteer.files import _atomic_write
def slow(tmp):
    with open(tmp, "w") as f:
        f.write('{{"new": ')
        f.flush()
        pathlib.Path({str(marker)!r}).write_text("x")
        time.sleep(60)
        f.write('true}}')
_atomic_write(pathlib.Path({str(target)!r}), slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(600):
        if marker.exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads(target.read_text()) == {"old": True}


def test_sigterm_between_steps_then_resume_equals_uninterrupted(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--max-steps", "6", "--checkpoint-every", "1")
    dl.main(argv + ["--student", "straight"])
    cmd = [sys.executable, str(ROOT / "distill.py")] + argv + ["--student", "killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "killed.work" / "checkpoint.pt"
    for _ in range(1200):  # wait for the second checkpoint, then stop the run
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not (out / "killed").exists() and ckpt.exists()
    dl.main(argv + ["--student", "killed", "--resume"])
    a, b = load_file(out / "straight" / "model.safetensors"), load_file(out / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in (out / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(model_dir, tok, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    real_loss, real_step, state = dl.LOSSES["lean"]["collapsed"], dl.train_step, {"step": 0}

    def step(*a, **k):
        state["step"] += 1
        return real_step(*a, **k)

    def nan_from_step_3(ls, lt, s):
        loss = real_loss(ls, lt, s)
        return loss * float("nan") if state["step"] >= 3 else loss
    monkeypatch.setattr(dl, "train_step", step)
    monkeypatch.setitem(dl.LOSSES["lean"], "collapsed", nan_from_step_3)
    with pytest.raises(UserError, match="loss became nan"):
        dl.main(args_for(model_dir, out, "--checkpoint-every", "1"))
    ck = torch.load(out / "student.work" / "checkpoint.pt", weights_only=False)
    weights = checkpoint_weights(out / "student.work", tmp_path)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "student").exists()


def test_same_seed_same_student(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    dl.main(args_for(model_dir, out, "--student", "a"))
    dl.main(args_for(model_dir, out, "--student", "b"))
    dl.main(args_for(model_dir, out, "--student", "c", "--seed", "1"))
    a, b, c = (load_file(out / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    info = json.loads((out / "a" / "safesteer.json").read_text())
    assert {"torch", "transformers", "git_commit"} <= set(info)


def test_long_prompts_are_truncated_with_a_count(tok, capsys):
    prompts = ["short", "x" * 300, "y" * 50]
    got = truncate_prompts(tok, prompts, 40, "f.jsonl")
    assert got[0] == "short" and got[1] == "x" * 40 and got[2] == "y" * 40
    err = capsys.readouterr().err
    assert "2 of 3 prompts in f.jsonl were longer than 40 tokens" in err
    assert truncate_prompts(tok, ["ok"], 40) == ["ok"] and capsys.readouterr().err == ""
    with pytest.raises(UserError, match="max-prompt-tokens"):
        truncate_prompts(tok, prompts, 0)
