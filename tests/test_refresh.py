"""distill.py --refresh-every N: every N steps πt becomes the current student + c·r, with r measured again on
that student by Stage 1's rule at Stage 1's block; π0 stays the anchor."""
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_distill import args_for, make_run

from safesteer.files import data_file, load_json, write_json
from safesteer.models import load_model
from safesteer.teacher import load_teacher
from safesteer import directions
import distill as dl
import extract_direction as ed
from safesteer import forcing
from safesteer.errors import UserError
from conftest import kill_at_step


def stage1(model_dir, out, kind):
    """Stage 1 at a forced block and position (a tiny model has no meaningful choice), c = 2."""
    ed.main(["--model", str(model_dir), "--out", str(out), "--kind", kind, "--layer", "1", "--position", "-1",
             "--coefficient", "2.0", "--n-train", "6", "--n-val", "2", "--check-prompts", "0", "--overwrite"])


@pytest.mark.parametrize("kind", ["response", "prompt"])
def test_refreshed_teacher_equals_stage1_on_the_saved_student(model_dir, tok, tmp_path, monkeypatch, kind):
    """Run A trains 1 step and saves the student; Stage 1 is run by hand on it. Run B trains 2 steps with
    --refresh-every 1. B's teacher after step 1, used after step 2 has moved the student, must give the logits
    of the hand-built teacher (A's student + c·r by Stage 1), and leave B's student as it was."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    stage1(model_dir, out, kind)
    argv = args_for(model_dir, out, "--warmup", "0")  # no warm-up: step 1 is the same in 1- and 2-step runs
    dl.main(argv + ["--max-steps", "1", "--student", "one"])
    made = []
    real = dl.refresh_teacher
    monkeypatch.setattr(dl, "refresh_teacher", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    dl.main(argv + ["--max-steps", "2", "--refresh-every", "1", "--student", "two"])
    assert len(made) == 1  # after step 1; none after the last step

    hand = tmp_path / "hand"
    stage1(out / "one", hand, kind)
    saved, _ = load_model(str(out / "one"))
    ref, _ = load_teacher(saved, hand / "direction.safetensors")
    refreshed = made[0]
    assert refreshed.coefficient == ref.coefficient == 2.0 and refreshed.layer == ref.layer == 1
    torch.testing.assert_close(refreshed.vector, ref.vector, rtol=1e-5, atol=1e-5)

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask, comp = torch.ones_like(ids), torch.tensor([[13, 14, 15], [16, 17, 18]])
    live = {n: p.detach().clone() for n, p in refreshed.model.named_parameters()}
    assert any(not torch.equal(live[n], p) for n, p in saved.named_parameters())  # step 2 moved the student
    with torch.no_grad():
        with refreshed.steer():
            got = forcing.completion_logits(refreshed.model, ids, mask, comp)
        with ref.steer():
            want = forcing.completion_logits(saved, ids, mask, comp)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(live[n], p) for n, p in refreshed.model.named_parameters())  # swapped back
    assert load_json(out / "two" / "safesteer.json")["refresh_every"] == 1


def test_resume_with_refresh_equals_uninterrupted(model_dir, tok, tmp_path, monkeypatch):
    """Checkpoints fall on refresh steps, so a resumed run rebuilds πt from the resumed student exactly."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    stage1(model_dir, out, "response")
    argv = args_for(model_dir, out, "--refresh-every", "2", "--checkpoint-every", "2")
    dl.main(argv + ["--student", "straight"])
    default = args_for(model_dir, out, "--refresh-every", "3", "--max-steps", "1", "--student", "default")
    i = default.index("--checkpoint-every")
    dl.main(default[:i] + default[i + 2:])  # no --checkpoint-every: the first multiple of 3 from 5
    assert load_json(out / "default" / "safesteer.json")["args"]["checkpoint_every"] == 6  # not 5
    # killed during step 4, after step 2's checkpoint and refresh
    real_step = kill_at_step(monkeypatch, dl, 4)
    with pytest.raises(KeyboardInterrupt):
        dl.main(argv + ["--student", "resumed"])
    monkeypatch.setattr(dl, "train_step", real_step)
    dl.main(argv + ["--student", "resumed", "--resume"])
    a, b = load_file(out / "straight" / "model.safetensors"), load_file(out / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="multiple of --refresh-every"):
        dl.main(args_for(model_dir, out, "--refresh-every", "3", "--checkpoint-every", "2", "--student", "x"))


def test_refresh_needs_stage1_metadata(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)  # a hand-written direction.json without Stage 1's rule
    with pytest.raises(UserError, match="cannot measure r again"):
        dl.main(args_for(model_dir, out, "--refresh-every", "1", "--student", "x"))


def test_a_moved_run_finds_its_prompts_or_stops_before_step_1(model_dir, tok, tmp_path, monkeypatch):
    """direction.json records the absolute paths of the checkout Stage 1 ran in. Once that place is gone a
    refresh finds the files by name (--refresh-prompts DIR, the run directory, data/), or stops at start."""
    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    for name in ("harmful_train", "harmless_train"):  # names data/ does not hold
        shutil.copy(data_file(name), old / "data" / f"mine_{name}.jsonl")
    out = old / "run"
    make_run(out, model_dir, tok)
    ed.main(["--model", str(model_dir), "--out", str(out), "--kind", "prompt", "--layer", "1",
             "--position", "-1", "--n-train", "6", "--n-val", "2", "--check-prompts", "0", "--overwrite",
             "--harmful-train", str(old / "data" / "mine_harmful_train.jsonl"),
             "--harmless-train", str(old / "data" / "mine_harmless_train.jsonl")])
    new = tmp_path / "new"
    old.rename(new)  # the checkout moved: every recorded path now points nowhere
    run, steps, real = new / "run", [], dl.train_step
    monkeypatch.setattr(dl, "train_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    argv = args_for(model_dir, run, "--refresh-every", "1", "--max-steps", "2")
    with pytest.raises(UserError, match=r"mine_harmful_train.jsonl not found \(tried .*--refresh-prompts"):
        dl.main(argv + ["--student", "a"])
    assert not steps  # a one-line error before step 1, not after minutes of training
    dl.main(argv + ["--student", "b", "--refresh-prompts", str(new / "data")])
    assert len(steps) == 2
    for f in (new / "data").iterdir():  # copies in the run directory itself are found too
        shutil.copy(f, run / f.name)
    dl.main(argv + ["--student", "c"])
    assert len(steps) == 4

    # a file named as in data/ is found there; one too short for the recorded count is refused
    meta = load_json(run / "direction.json")
    gone = tmp_path / "gone" / "data"
    meta["data"] = {**meta["data"], "harmful": str(gone / "harmful_train.jsonl"),
                    "harmless": str(gone / "harmless_train.jsonl")}
    write_json(run / "direction.json", meta)
    found = directions.refresh_inputs(meta, [run])["data"]
    assert found["harmful"] == str(data_file("harmful_train"))
    (run / "harmful_train.jsonl").write_text('{"prompt": "only one"}\n')
    with pytest.raises(UserError, match="fewer than the 6 prompts"):
        dl.main(argv + ["--student", "d"])
    assert len(steps) == 4
