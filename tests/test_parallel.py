"""distill.py under torchrun: 2 processes on the CPU (gloo) give the 1-process run's losses and weights;
--shard never holds a whole model on a rank; checkpoints resume under 1 or 2 processes."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_at_step, make_family_model, make_family_tokenizer
from safetensors.torch import load_file
from test_distill import args_for, make_run

import distill as dl
from safesteer.scale import parallel, students
from safesteer.scale import precision
from safesteer.teacher import Teacher

ROOT = Path(__file__).resolve().parents[1]
# A bound on one torchrun, not an expectation: two processes on a box that another run keeps busy take ten
# times as long as alone, so no test here assumes a speed (each waits for what it needs, not for a time).
SLOW = 3600
PROBE = "tests/torchrun_probe.py"  # distill.py watched: what each rank holds while loading; a stop at step N


def torchrun(argv, nproc=2, script="distill.py", env=None, check=True):
    # the probe runs from tests/ and imports the stage: the repository goes on its path
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / script), *argv]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SLOW)
    assert res.returncode == 0 or not check, res.stderr[-3000:]
    return res


def log_of(d):
    return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_equal_one(model_dir, tok, tmp_path):
    """3 prompts per step over 2 ranks (shares of 2 and 1 prompts), greedy samples so both runs see the same
    text: the per-step losses and the final weights must match the single-process run."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--prompts-per-step", "3", "--max-steps", "3", "--temperature", "0",
                    "--anchor", str(ROOT / "data" / "harmless_val.jsonl"), "--anchor-per-step", "1")
    dl.main(argv + ["--student", "one"])
    res = torchrun(argv + ["--student", "two"])
    assert "2 processes" in res.stdout and res.stdout.count("distilling") == 1  # only rank 0 prints
    one, two = log_of(out / "one"), log_of(out / "two")
    for a, b in zip(one, two):
        for k in ("loss", "collapsed", "partial", "full", "anchor_loss", "sampled_refusal"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)
    wa, wb = load_file(out / "one" / "model.safetensors"), load_file(out / "two" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert max((wa[k] - load_file(Path(model_dir) / "model.safetensors")[k]).abs().max() for k in wa) > 1e-4


def family_dir(tmp_path, family: str):
    """(tokenizer, saved model directory) of a tiny random model of one family (tests/conftest.py)."""
    tok, d = make_family_tokenizer(family), tmp_path / family
    make_family_model(family, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return tok, d


@pytest.mark.parametrize("lora, family", [(False, None), (True, None), (False, "llama3")])
def test_sharded_equals_one_process(model_dir, tok, tmp_path, lora, family):
    """--shard (FSDP2, every block its own unit): 2 prompts + 2 anchors per step split evenly over 2 ranks,
    greedy samples; losses, gradient norms and final weights equal the 1-process run (checked once: a
    reduce-scatter that divides by 2 halves the gradient norm and fails), with LoRA too (adapters only, merged
    on rank 0). Both ranks build on the meta device and receive rank 0's weights: the rotary frequencies,
    which no state dict holds, are copied too (without, step 1's loss differs), on a tied head and on
    Llama-3's (untied, llama3 rope scaling; its embedding rows that get gradients near AdamW's eps end up to
    2e-4 apart, the same to the last digit with the previous loading code)."""
    if family:
        tok, model_dir = family_dir(tmp_path, family)
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    extra = ["--lora-rank", "4"] if lora else []
    argv = args_for(model_dir, out, "--max-steps", "3", "--temperature", "0", "--anchor",
                    str(ROOT / "data" / "harmless_val.jsonl"), "--anchor-per-step", "2", *extra)
    dl.main(argv + ["--student", "one"])
    res = torchrun(argv + ["--student", "two", "--shard"])
    assert "2 processes, sharded" in res.stdout
    one, two = log_of(out / "one"), log_of(out / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        # Step 1 (before any update) must match to 1e-4: it checks the sharded forward and the gradient's
        # reduce-scatter. After an update, Llama-3's untied embedding rows whose gradient is near AdamW's eps
        # differ by rounding (up to 1e-3, as the weights below), and its later losses inherit that: measured
        # 1.9e-4 apart on one CPU, within 1e-4 on another.
        rel = 1e-3 if family and a["step"] > 1 else 1e-4
        for k in ("loss", "collapsed", "full", "anchor_loss", "grad_norm", "sampled_refusal"):
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), (a["step"], k)
    wa, wb = load_file(out / "one" / "model.safetensors"), load_file(out / "two" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # an untied embedding row whose gradient is ~1e-9, near AdamW's eps, moves by a share of lr
        atol = 1e-3 if family and k.endswith("embed_tokens.weight") else 1e-5  # sensitive to rounding
        assert torch.allclose(wa[k], wb[k], atol=atol), k
    if lora:
        assert (out / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_sharded_sampling_n_rows_at_a_time(model_dir, tok, tmp_path):
    """--sample-batch under --shard: each rank samples its 4 rows 3 at a time (chunks of 3 and 1, every rank
    decoding each chunk until all ranks' rows of it have ended), with its own stream (temperature 1): the log
    and the student are, bit for bit, those of all rows at once."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--max-steps", "2", "--shard", "--anchor",
                    str(ROOT / "data" / "harmless_val.jsonl"), "--anchor-per-step", "2")
    torchrun(argv + ["--student", "all"])
    torchrun(argv + ["--student", "chunks", "--sample-batch", "3"])
    drop = ("seconds", "step_seconds", "sample_tokens_per_s", "peak_memory_mb")
    logs = [[{k: v for k, v in r.items() if k not in drop} for r in log_of(out / name)]
            for name in ("all", "chunks")]
    assert logs[0] == logs[1] and len(logs[0]) == 2
    a, b = load_file(out / "all" / "model.safetensors"), load_file(out / "chunks" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_bf16_mixed_precision_on_two_processes(model_dir, tok, tmp_path, monkeypatch):
    """CUDA's dtype policy on the CPU (precision.BF16_DEVICES; PROBE_BF16 in the processes): --shard over two
    gloo processes gathers every unit as bf16 weights (FSDP2's MixedPrecisionPolicy: bf16, reduce float32;
    gloo gathers bf16 on the CPU); full fine-tuning, greedy samples, 2 prompts + 2 anchors per step.
    (a) At step 0, on both ranks, the student's and π0's logits on one path are bf16 and equal: KL exactly 0.
    (b) Where a step's samples are the same text as one process's under bf16 autocast over float32
    weights, its losses and gradient norms are within 5% of that run's (tests/test_sharding.py says why not
    closer); the anchor loss, a KL of ~5e-4 after two steps, within 3e-4. The policy also rounds what
    autocast keeps in float32, so a near-tied greedy token may flip between the two (seen once in a clean
    checkout): from a step with other samples on, the runs are not comparable; every loss must be finite.
    (c) On both ranks every unit has the policy, and the slices and AdamW's moments stay float32."""
    monkeypatch.setattr(precision, "BF16_DEVICES", {"cuda", "cpu"})
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--max-steps", "3", "--temperature", "0", "--anchor",
                    str(ROOT / "data" / "harmless_val.jsonl"), "--anchor-per-step", "2")
    dl.main(argv + ["--student", "one"])
    torchrun(argv + ["--student", "two", "--shard"], script=PROBE,
             env={"PROBE_BF16": "1", "PROBE_OUT": str(tmp_path)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["step0"] == {"equal": True, "kl": 0.0, "dtype": "torch.bfloat16"}
        assert rank["after"] == {"master": ["torch.float32"], "adam": ["torch.float32"],
                                 "policies": ["torch.bfloat16/torch.float32"], "units": 5}
    one, two = log_of(out / "one"), log_of(out / "two")
    assert len(one) == len(two) == 3
    keys = ("loss", "collapsed", "full", "grad_norm", "anchor_loss")
    assert all(math.isfinite(b[k]) for b in two for k in keys)
    for a, b in zip(one, two):
        if (a["example"], a["mean_completion_tokens"]) != (b["example"], b["mean_completion_tokens"]):
            break  # other samples from here on: the runs no longer train on the same text
        for k in ("loss", "collapsed", "full", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=5e-2), (a["step"], k)  # measured: within 1.6%
        assert a["anchor_loss"] == pytest.approx(b["anchor_loss"], abs=3e-4)  # 5e-4 and 6.4e-4 at step 3


@pytest.mark.parametrize("lora", [False, True])
def test_sharded_loading_holds_slices_only(tok, tmp_path, lora):
    """--shard never materialises a whole model on a rank's device: on both ranks every fully_shard call sees
    a model still on the meta device, and a tied head stays the embeddings' parameter. On a random
    95M-parameter model (361 MB in float32) rank 1's resident memory grows, while the models are built, by
    about its half of each copy (full fine-tuning shards two, the student and π0's frozen copy; LoRA one):
    measured 0.57 of a copy per copy, where the previous code (every rank loaded the whole model, copied it,
    then sharded) grew by 1.27 (full) and 1.13 (LoRA). Rank 0 reads the weights on the host, by design."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2048, num_hidden_layers=10,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model, model_dir = LlamaForCausalLM(cfg), tmp_path / "model"
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--shard", *(["--lora-rank", "4"] if lora else []))
    torchrun(argv, script=PROBE, env={"PROBE_OUT": str(tmp_path), "PROBE_STOP": "build"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    copies = 1 if lora else 2
    for rank in ranks:
        assert len(rank["fully_shard"]) == copies * (cfg.num_hidden_layers + 1)
        assert all(call["all_meta"] for call in rank["fully_shard"]) and rank["head_is_embedding"]
    grown = ranks[1]["peak_mb"] - ranks[1]["rss_before_mb"]
    assert grown < 0.75 * copies * model_mb, (grown, model_mb)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_under_another_number_of_processes(model_dir, tok, tmp_path, monkeypatch, capsys, first, then):
    """A checkpoint written by 2 sharded processes resumes in 1, and one written by 1 process in 2 sharded
    ones: each rank reads its slices of the weights and AdamW states whatever the number that wrote them
    (torch.distributed.checkpoint). The sampler streams restart, which greedy samples do not notice: losses
    and final weights equal the uninterrupted 1-process run's, and a warning and the log say so."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--temperature", "0")  # 4 steps, a checkpoint every 2
    dl.main(argv + ["--student", "straight"])
    if first == 2:  # stopped just after step 2's checkpoint
        assert torchrun(argv + ["--student", "s", "--shard"], script=PROBE, env={"PROBE_STOP": "2"},
                        check=False).returncode != 0
    else:  # killed during step 3
        real_step = kill_at_step(monkeypatch, dl, 3)
        with pytest.raises(KeyboardInterrupt):
            dl.main(argv + ["--student", "s"])
        monkeypatch.setattr(dl, "train_step", real_step)
    assert (out / "s.work" / "checkpoint.pt").is_file() and not (out / "s").exists()
    assert [f.name for f in (out / "s.work").glob("weights-*")] == ["weights-2"]  # one checkpoint kept
    capsys.readouterr()
    if then == 1:
        dl.main(argv + ["--student", "s", "--resume"])
        err = capsys.readouterr().err
    else:
        err = torchrun(argv + ["--student", "s", "--resume", "--shard"]).stderr
    assert f"written by {first} processes and is resumed by {then}: the sampler streams restart" in err
    one, two = log_of(out / "straight"), log_of(out / "s")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and "resumed" not in two[1] and "resumed" not in two[3]
    assert two[2]["resumed"] == {"from_step": 2, "processes": then, "checkpoint_processes": first,
                                 "sampler_streams": "restarted from each rank's seed"}
    for a, b in zip(one, two):
        for k in ("loss", "collapsed", "full", "grad_norm", "sampled_refusal"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)
    wa, wb = load_file(out / "straight" / "model.safetensors"), load_file(out / "s" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_shard_needs_even_shares(model_dir, tok, tmp_path):
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--prompts-per-step", "3", "--max-steps", "1", "--shard")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "distill.py"), *argv]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=SLOW)
    assert res.returncode != 0 and "split evenly over 2 processes" in res.stderr
    with pytest.raises(parallel.UserError, match="run under torchrun"):
        dl.main(argv)  # without torchrun there is nothing to shard over


@pytest.mark.parametrize("shard", [False, True])
def test_resume_across_ranks(model_dir, tok, tmp_path, shard):
    """A 2-process run stopped (SIGTERM to torchrun) after a checkpoint and resumed under 2 processes ends
    with the uninterrupted run's weights: the checkpoint holds every rank's sampler stream (and, sharded, each
    rank's slices of the weights and Adam states)."""
    out = tmp_path / "run"
    make_run(out, model_dir, tok)
    argv = args_for(model_dir, out, "--prompts-per-step", "2" if shard else "3", "--max-steps", "8",
                    "--checkpoint-every", "2", *(["--shard"] if shard else []))
    torchrun(argv + ["--student", "straight"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "distill.py"), *argv, "--student", "killed"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "killed.work" / "checkpoint.pt"
    while not ckpt.exists():  # wait for the first checkpoint, however slow the box is, then stop the run
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=SLOW)
    assert not (out / "killed").exists() and ckpt.exists()
    assert len(torch.load(ckpt, weights_only=False)["gens"]) == 2
    torchrun(argv + ["--student", "killed", "--resume"])
    a, b = load_file(out / "straight" / "model.safetensors"), load_file(out / "killed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shares_cover_every_prompt_once():
    items = list(range(7))
    shares = []
    for rank in range(3):
        w = parallel.World.__new__(parallel.World)
        w.rank, w.size = rank, 3
        shares += w.share(items)
    assert sorted(shares) == items
    w.rank, w.size = 3, 4
    assert w.share([1, 2, 3]) == []
    with pytest.raises(parallel.UserError, match="at most --prompts-per-step processes"):
        w.share([1, 2, 3], required=True)


# ----------------------------------------------------------------------------- the run's pieces

def test_even_shares_and_a_sampler_stream_per_rank():
    w = parallel.World.__new__(parallel.World)
    w.rank, w.size, w.sharded = 1, 2, True
    w.check_even([[1, 2], [3, 4], []])
    with pytest.raises(parallel.UserError, match="split evenly over 2 processes"):
        w.check_even([[1, 2], [1, 2, 3]])
    w.sharded = False
    w.check_even([[1, 2, 3]])  # only a sharded run needs every rank to call the model equally often
    draw = lambda gen: torch.rand(4, generator=gen)
    w.rank = 0
    assert torch.equal(draw(w.generator(5)), draw(torch.Generator().manual_seed(5)))  # as one process draws
    w.rank = 1
    assert not torch.equal(draw(w.generator(5)), draw(torch.Generator().manual_seed(5)))


def test_checkpoint_interval_falls_on_refreshes():
    assert parallel.checkpoint_interval(None, None) == 5 and parallel.checkpoint_interval(3, None) == 3
    assert parallel.checkpoint_interval(None, 3) == 6 and parallel.checkpoint_interval(None, 5) == 5
    assert parallel.checkpoint_interval(None, 7) == 7 and parallel.checkpoint_interval(4, 2) == 4
    with pytest.raises(parallel.UserError, match="multiple of --refresh-every"):
        parallel.checkpoint_interval(3, 2)


def test_output_dirs_are_replaced_only_when_asked(tmp_path):
    out = tmp_path / "run"
    assert students.prepare_output_dirs(out, "s", False, False) == (out / "s", out / "s.work")
    (out / "s.work").mkdir(parents=True)
    with pytest.raises(parallel.UserError, match="holds an unfinished run"):
        students.prepare_output_dirs(out, "s", False, False)
    students.prepare_output_dirs(out, "s", False, True)  # --resume continues it
    assert (out / "s.work").exists()
    students.prepare_output_dirs(out, "s", True, False)  # --overwrite restarts
    assert not (out / "s.work").exists()
    (out / "s").mkdir()
    with pytest.raises(parallel.UserError, match="is not a student .*: not replaced"):
        students.prepare_output_dirs(out, "s", True, False)  # a folder without safesteer.json: never
    (out / "s" / "safesteer.json").write_text("{}")
    with pytest.raises(parallel.UserError, match="already exists"):
        students.prepare_output_dirs(out, "s", False, False)
    students.prepare_output_dirs(out, "s", True, False)  # a finished student: --overwrite may replace it


def models_for_summary(tok, model):
    vec = torch.ones(model.config.hidden_size)
    teacher = Teacher(model, "hook", vec, 1, 2.0)
    return parallel.Models(model, tok, teacher, Teacher(model, "base"), {"layer": 1}), vec


def test_startup_summary_names_the_loss_s_the_teacher_and_the_anchors(tok, model):
    args = dl.parse_args(["--loss", "partial", "--anchor", "a.jsonl", "--anchor-weight", "1.5",
                          "--random-tokens"])
    models, vec = models_for_summary(tok, model)
    world = parallel.World(torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters())
    text, packing = parallel.startup_summary(args, 7, 50, models, True, 3, world).splitlines()
    assert packing.startswith("student scores samples packed")  # the path it takes (forcing.packing_path)
    assert text == (f"distilling 7 steps x 4 prompts x 8 samples, loss partial (lean), |S| = 50 (random); "
                    f"teacher hook at block 1, c = 2.0, |r| = {vec.norm():.2f}; "
                    f"{n / 1e6:.1f}M trainable weights; anchor 2 x 8 harmless samples, λ = 1.5; "
                    f"resuming at step 3")
    plain = parallel.startup_summary(dl.parse_args([]), 7, 50, models, False, 0, world)
    assert "loss collapsed (lean), |S| = 50; teacher" in plain
    assert "anchor" not in plain and "resuming" not in plain


def test_final_summary_and_the_info_saved_with_the_student(tok, model, tmp_path):
    log = [{"loss": 0.5, "sampled_refusal": 0.25, "step_seconds": 2.0, "peak_memory_mb": 100.0},
           {"loss": 0.125, "sampled_refusal": 0.5, "step_seconds": 4.0, "peak_memory_mb": 300.0}]
    assert parallel.final_summary(log, 12.4, tmp_path / "s", lora=True) == (
        "loss 0.5000 -> 0.1250; sampled refusal 0.25 -> 0.50; 3.0 s/step; peak memory 300 MB\n"
        f"took 12 s; wrote {tmp_path / 's'} (model, safesteer.json, train_log.jsonl, adapter/)")
    assert parallel.final_summary([], 1.0, tmp_path, lora=False).startswith("took 1 s; wrote")
    args = dl.parse_args(["--out", str(tmp_path), "--refresh-every", "2"])
    models, _ = models_for_summary(tok, model)
    world = parallel.World(torch.device("cpu"))
    info = parallel.student_info(args, models, torch.tensor([10, 20]), tmp_path / "t.json", 4, world, 1.5)
    assert info["s_token_ids"] == [10, 20] and info["s_tokens"] == [tok.decode([10]), tok.decode([20])]
    assert info["teacher"] == {"kind": "hook", "file": str(tmp_path / "direction.safetensors"), "layer": 1,
                               "coefficient": 2.0, "system": None}
    assert info["refresh_every"] == 2 and info["steps"] == 4
    assert info["tokens_file"] == str(tmp_path / "t.json")
    assert info["args"] == vars(args) and info["seconds"] == 1.5 and {"torch", "git_commit"} <= set(info)
