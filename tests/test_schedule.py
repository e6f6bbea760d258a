"""safesteer/scale/schedule.py --teacher-ema α: after every step θt ← (1 − α)·θt + α·θs, and every N steps r
measured again
on θt by Stage 1's rule and S selected again on θt by Stage 2's rule; π0 fixed; resume exact."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_distill import args_for, make_run
from test_refresh import stage1

from safesteer.files import data_file, load_json, save_tensors, write_json
from safesteer.models import load_model
from safesteer import directions
import distill as dl
from safesteer.scale import parallel
from safesteer.scale import schedule
import select_tokens
from safesteer.errors import UserError
from conftest import kill_at_step

ALPHA = 0.5  # large, so that θt moves visibly in four steps of a tiny model


def stage2(model_dir, out, direction=None, extra=()):
    """Stage 2 with a small S (k = 5 of ~265 tokens), so that a moved θt selects another one."""
    select_tokens.main(["--model", str(model_dir), "--out", str(out), "--n-prompts", "3", "--samples", "2",
                        "--horizon", "3", "--k", "5", "--k-vote", "12", "--prob-floor", "0",
                        "--coverage-prompts", str(data_file("harmful_val")), "--overwrite",
                        *(["--direction", str(direction)] if direction else []), *extra])


def pipeline(model_dir, tok, out):
    make_run(out, model_dir, tok)
    stage1(model_dir, out, "response")
    stage2(model_dir, out)
    return args_for(model_dir, out, "--teacher-ema", str(ALPHA), "--refresh-tokens-every", "2",
                    "--lr", "3e-2")


class Spy:
    """What the run did, step by step: the student's weights after each step, the S and πt each step used,
    and at each refresh θt, the new r and the new S (the EmaTeacher itself, for θt at the end)."""

    def __init__(self, monkeypatch):
        self.after, self.s_used, self.r_used, self.refreshes, self.ema = [], [], [], [], None
        real_step, real_refresh = dl.train_step, schedule.EmaTeacher.refresh

        def step(student, tok, harmful, anchors, teachers, s_ids, *rest):
            self.s_used.append(s_ids.tolist())
            self.r_used.append(teachers[0].vector.clone())
            rec = real_step(student, tok, harmful, anchors, teachers, s_ids, *rest)
            self.after.append({n: p.detach().clone() for n, p in parallel.trainable(student).items()})
            return rec

        def refresh(ema):
            theta = {n: t.detach().clone() for n, t in ema.ema.items()}
            rec = real_refresh(ema)
            self.ema = ema
            self.refreshes.append((theta, ema.vector.clone(), ema.s_ids.tolist(), rec))
            return rec
        monkeypatch.setattr(dl, "train_step", step)
        monkeypatch.setattr(schedule.EmaTeacher, "refresh", refresh)


def hand_average(model_dir, after: list[dict], alpha: float) -> list[dict]:
    """θt after each step, from π0 and the student's weights after each step: the EMA written out."""
    theta = {n: p.detach().clone() for n, p in load_model(str(model_dir))[0].named_parameters()}
    out = []
    for weights in after:
        theta = {n: (1 - alpha) * theta[n] + alpha * weights[n] for n in theta}
        out.append(theta)
    return out


def test_ema_teacher_follows_the_student_and_refreshes_r_and_s(model_dir, tok, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = pipeline(model_dir, tok, out)
    spy = Spy(monkeypatch)
    dl.main(argv)
    assert len(spy.after) == 4 and len(spy.refreshes) == 1  # after step 2; none after the last step
    want = hand_average(model_dir, spy.after, ALPHA)
    theta2, r2, s2, rec = spy.refreshes[0]
    for n, t in theta2.items():  # θt at the refresh (after step 2), and at the end (after step 4)
        torch.testing.assert_close(t, want[1][n], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(spy.ema.ema[n], want[3][n], rtol=1e-6, atol=1e-7)

    # r: Stage 1's rule at Stage 1's block, on θt with the hook off
    teacher_model, _ = load_model(str(model_dir))
    teacher_model.load_state_dict(want[1], strict=False)  # tied head and buffers as they are
    meta = load_json(out / "direction.json")
    torch.testing.assert_close(r2, directions.recompute_direction(teacher_model, tok, meta), rtol=1e-5,
                               atol=1e-6)
    # S: Stage 2's command on θt with the new r, the settings and seed safety_tokens.json records
    hand = tmp_path / "hand"
    teacher_model.save_pretrained(hand / "theta")
    tok.save_pretrained(hand / "theta")
    save_tensors(hand / "direction.safetensors", {"direction": r2})
    # r measured on θt, not on the π0 that Stage 1 fingerprinted: the copy names no model
    write_json(hand / "direction.json", {k: v for k, v in meta.items() if k != "model_fingerprint"})
    stage2(hand / "theta", hand, hand / "direction.safetensors")
    assert s2 == load_json(hand / "safety_tokens.json")["token_ids"]

    first = load_json(out / "safety_tokens.json")["token_ids"]
    assert s2 != first  # θt moved enough for S to change, so a stale S is visible
    assert spy.s_used == [first, first, s2, s2]  # the steps after the refresh train on the new S
    assert torch.equal(spy.r_used[2], r2) and not torch.equal(spy.r_used[1], r2)
    log = [json.loads(r) for r in (out / "student" / "train_log.jsonl").read_text().splitlines()]
    logged = log[1]["teacher_refresh"]
    assert logged["s_token_ids"] == s2 and logged["s_shared"] == len(set(s2) & set(first))
    r1 = load_file(out / "direction.safetensors")["direction"]
    cosine = torch.cosine_similarity(r2, r1, dim=0).item()
    assert logged["direction_cosine"] == pytest.approx(cosine, abs=1e-5)
    assert all("teacher_refresh" not in log[i] for i in (0, 2, 3))


def test_pi0_stays_fixed(model_dir, tok, tmp_path, monkeypatch):
    """Anchoring's target is π0 whatever πt does: the base model's weights are untouched by the average."""
    out = tmp_path / "run"
    argv = pipeline(model_dir, tok, out)
    bases = []
    real_step = dl.train_step
    monkeypatch.setattr(dl, "train_step", lambda *a, **k: bases.append(a[4][1].model) or real_step(*a, **k))
    dl.main(argv + ["--max-steps", "3", "--anchor", str(data_file("harmless_train"))])
    pi0 = load_model(str(model_dir))[0].state_dict()
    for name, p in bases[-1].state_dict().items():
        assert torch.equal(p, pi0[name])


def test_resume_with_ema_equals_uninterrupted(model_dir, tok, tmp_path, monkeypatch):
    """θt, r and S are saved with each checkpoint, so a resumed run continues the average exactly."""
    out = tmp_path / "run"
    argv = pipeline(model_dir, tok, out)
    dl.main(argv + ["--student", "straight"])
    # killed during step 4, after step 2's checkpoint and refresh
    real_step = kill_at_step(monkeypatch, dl, 4)
    with pytest.raises(KeyboardInterrupt):
        dl.main(argv + ["--student", "resumed"])
    assert sorted(p.name for p in (out / "resumed.work").glob("teacher_ema-*.pt")) == ["teacher_ema-2.pt"]
    monkeypatch.setattr(dl, "train_step", real_step)
    dl.main(argv + ["--student", "resumed", "--resume"])
    a, b = load_file(out / "straight" / "model.safetensors"), load_file(out / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(out / s / "train_log.jsonl").read_text().splitlines() for s in ("straight", "resumed")]
    timing = ("seconds", "step_seconds", "sample_tokens_per_s", "peak_memory_mb")
    drop = lambda r: {k: (v if k != "teacher_refresh" else {**v, "seconds": 0}) for k, v in r.items()
                      if k not in timing}
    assert [drop(json.loads(r)) for r in logs[0]] == [drop(json.loads(r)) for r in logs[1]]


def test_schedule_inputs_are_checked_before_step_1(model_dir, tok, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)  # hand-written Stage 1 and 2 files: no rule to measure r or select S again
    stage1(model_dir, out, "response")
    monkeypatch.setattr(dl, "train_step", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(UserError, match="records no Stage 2 settings"):
        dl.main(args_for(model_dir, out, "--teacher-ema", "0.01", "--student", "x"))
    with pytest.raises(UserError, match="choose one"):
        dl.main(args_for(model_dir, out, "--teacher-ema", "0.01", "--refresh-every", "2", "--student", "y"))


def test_with_lora_the_average_is_over_the_adapters(model_dir, tok, tmp_path, monkeypatch):
    """One copy of the base serves π0 (adapters off), the student (its adapters) and πt (the averaged adapters
    swapped in): θt's adapters follow the student's, and r is measured with them in place."""
    out = tmp_path / "run"
    argv = pipeline(model_dir, tok, out) + ["--lora-rank", "2"]
    start, real_init = [], schedule.EmaTeacher.__init__

    def init(ema, *a, **k):
        real_init(ema, *a, **k)
        start.append({n: t.clone() for n, t in ema.ema.items()})
    monkeypatch.setattr(schedule.EmaTeacher, "__init__", init)
    spy, hand_r, spied = Spy(monkeypatch), [], schedule.EmaTeacher.refresh

    def refresh(ema):  # r by hand, at the time: θt's adapters put in the student, then the student's back
        theta, rec = {n: t.clone() for n, t in ema.ema.items()}, spied(ema)
        params, training = parallel.trainable(ema.student), ema.student.training
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta[n])
            hand_r.append(directions.recompute_direction(ema.student.eval(), tok, ema.dmeta))
            for n, p in params.items():
                p.copy_(live[n])
        ema.student.train(training)
        return rec
    monkeypatch.setattr(schedule.EmaTeacher, "refresh", refresh)
    dl.main(argv)
    assert all("lora_" in n for n in start[0]) and len(spy.refreshes) == 1
    theta, want = start[0], []
    for weights in spy.after:
        theta = {n: (1 - ALPHA) * theta[n] + ALPHA * weights[n] for n in theta}
        want.append(theta)
    theta2, r2 = spy.refreshes[0][:2]
    for n in theta2:
        torch.testing.assert_close(theta2[n], want[1][n], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(spy.ema.ema[n], want[3][n], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(r2, hand_r[0], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(start[0][n], want[1][n]) for n in start[0])  # θt moved
