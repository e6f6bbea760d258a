"""safesteer/scale/checkpoints.py in one process: what a checkpoint restores, what it says when the number of
processes changed, and how it proves itself (sha256 of each file, the recipe, the one before kept). Under
torchrun (2 processes, sharded, 2 -> 1 and 1 -> 2): tests/test_parallel.py."""
import pytest
import torch
from conftest import make_model

from safesteer.scale import checkpoints
from safesteer.scale import parallel


def training(model):
    """AdamW on every weight, a constant schedule, and a step that moves them."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    def step():
        model(input_ids=torch.arange(3, 19).view(2, 8)).logits.pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, sched, step


def a_run(tok, tmp_path):
    """A model in training, its work folder, its sampler: (world, work, model, opt, sched, step, gen)."""
    world, work = parallel.World(torch.device("cpu")), tmp_path / "s.work"
    work.mkdir()
    model = make_model(tok)
    opt, sched, step = training(model)
    return world, work, model, opt, sched, step, torch.Generator().manual_seed(5)


def test_a_checkpoint_restores_weights_adam_state_schedule_and_stream(tok, tmp_path):
    """Saved after step 2 and loaded into a fresh model: step 3 gives the uninterrupted run's weights exactly;
    two checkpoints are kept (the newest and the one before), and the sampler stream is restored (same number
    of processes: no note)."""
    world, work, model, opt, sched, step, gen = a_run(tok, tmp_path)
    log = []
    for n in (1, 2):
        step()
        log.append({"step": n})
        checkpoints.save_checkpoint(work, model, opt, sched, n, gen, log, world)
    assert sorted(f.name for f in work.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "weights-1",
                                                      "weights-2"]
    expected_draw = torch.rand(3, generator=gen)
    step()
    fresh = make_model(tok, seed=1)
    fresh_opt, fresh_sched, fresh_step = training(fresh)
    fresh_gen = torch.Generator().manual_seed(99)
    start, log, note, _ = checkpoints.load_checkpoint(work, fresh, fresh_opt, fresh_sched, fresh_gen, world)
    assert (start, log, note) == (2, [{"step": 1}, {"step": 2}], None)
    assert torch.equal(torch.rand(3, generator=fresh_gen), expected_draw)
    assert fresh_sched.last_epoch == 2
    fresh_step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_another_number_of_processes_restarts_the_streams_and_says_so(tok, tmp_path, capsys):
    world, work, model, opt, sched, step, gen = a_run(tok, tmp_path)
    step()
    checkpoints.save_checkpoint(work, model, opt, sched, 1, gen, [], world)
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    torch.save({**ck, "gens": ck["gens"] * 2}, work / "checkpoint.pt")  # as if 2 processes had written it
    fresh_gen = torch.Generator().manual_seed(99)
    state = fresh_gen.get_state()
    note = checkpoints.load_checkpoint(work, model, opt, sched, fresh_gen, world)[2]
    assert note == {"from_step": 1, "processes": 1, "checkpoint_processes": 2,
                    "sampler_streams": "restarted from each rank's seed"}
    assert torch.equal(fresh_gen.get_state(), state)  # this rank's own seed, not rank 0's stream of 2
    err = capsys.readouterr().err
    assert "written by 2 processes and is resumed by 1: the sampler streams restart" in err


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    torch.save({"model": {}, "opt": {}, "step": 2, "gens": []}, tmp_path / "checkpoint.pt")  # whole tensors
    with pytest.raises(parallel.UserError, match="written by an older distill.py; restart with --overwrite"):
        checkpoints.load_checkpoint(tmp_path, None, None, None, None, None)
    with pytest.raises(parallel.UserError, match="no checkpoint in"):
        checkpoints.load_checkpoint(tmp_path / "none", None, None, None, None, None)


def saved_twice(tok, tmp_path, recipe=None):
    """A run checkpointed after steps 1 and 2: (world, work, model, opt, sched, gen, weights after step 1)."""
    world, work, model, opt, sched, step, gen = a_run(tok, tmp_path)
    step()
    after_1 = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoints.save_checkpoint(work, model, opt, sched, 1, gen, [{"step": 1}], world, recipe)
    step()
    checkpoints.save_checkpoint(work, model, opt, sched, 2, gen, [{"step": 1}, {"step": 2}], world, recipe)
    return world, work, model, opt, sched, gen, after_1


def flip(path, at: int = 4096, n: int = 4096):
    data = bytearray(path.read_bytes())
    at = min(at, len(data) - n) if len(data) > n else 0
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_one_before(tok, tmp_path, capsys):
    world, work, model, opt, sched, gen, after_1 = saved_twice(tok, tmp_path)
    shard = next((work / "weights-2").glob("*.distcp"))
    flip(shard)
    fresh = make_model(tok, seed=1)
    fresh_opt, fresh_sched, _ = training(fresh)
    start = checkpoints.load_checkpoint(work, fresh, fresh_opt, fresh_sched, torch.Generator(), world)[0]
    assert start == 1  # the checkpoint of step 1, whole
    assert all(torch.equal(after_1[k], v) for k, v in fresh.state_dict().items())
    err = capsys.readouterr().err
    assert f"warning: {shard} is damaged or missing" in err and "resuming from" in err


def test_both_checkpoints_damaged_is_one_line_that_names_the_file(tok, tmp_path):
    world, work, model, opt, sched, gen, _ = saved_twice(tok, tmp_path)
    flip(next((work / "weights-2").glob("*.distcp")))
    (work / "checkpoint.prev.pt").write_bytes(b"not a checkpoint")
    damaged = r"weights-2/.*\.distcp is damaged or missing .* no earlier whole checkpoint is kept"
    with pytest.raises(parallel.UserError, match=damaged):
        checkpoints.load_checkpoint(work, model, opt, sched, torch.Generator(), world)


def test_a_changed_recipe_is_refused_by_name_unless_allowed(tok, tmp_path):
    recipe = {"lr": 0.001, "loss": "collapsed", "max_steps": 8}
    world, work, model, opt, sched, gen, _ = saved_twice(tok, tmp_path, recipe)
    for changed, name in (({"lr": 0.01}, "--lr"), ({"loss": "full"}, "--loss")):
        with pytest.raises(parallel.UserError, match=f"--resume: {name} was .* when the run started, now"):
            checkpoints.load_checkpoint(work, model, opt, sched, gen, world, {**recipe, **changed})
    changes = checkpoints.load_checkpoint(work, model, opt, sched, gen, world, {**recipe, "max_steps": 12},
                                          allowed={"max_steps"})[3]
    assert changes == {"max_steps": (8, 12)}


def test_a_failed_write_leaves_no_partial_folder_and_keeps_the_earlier_checkpoint(tok, tmp_path,
                                                                                  monkeypatch):
    import torch.distributed.checkpoint as dcp
    world, work, model, opt, sched, gen, _ = saved_twice(tok, tmp_path)
    before = sorted(f.name for f in work.iterdir())

    def full_disk(state, checkpoint_id, **kw):
        (checkpoint_id / "__0_0.distcp").parent.mkdir(parents=True, exist_ok=True)
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(parallel.UserError, match="could not write the checkpoint of step 3 .*No space left"):
        checkpoints.save_checkpoint(work, model, opt, sched, 3, gen, [], world)
    assert sorted(f.name for f in work.iterdir()) == before  # no weights-3/, both checkpoints as they were
