"""safesteer/scale/checkpoints.py in one process: what a checkpoint restores, and what it says when the number
of processes
changed. Under torchrun (2 processes, sharded, 2 -> 1 and 1 -> 2): tests/test_parallel.py."""
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


def test_a_checkpoint_restores_weights_adam_state_schedule_and_stream(tok, tmp_path):
    """Saved after step 2 and loaded into a fresh model: step 3 gives the uninterrupted run's weights exactly;
    one weights folder is kept, and the sampler stream is restored (same number of processes: no note)."""
    world, work = parallel.World(torch.device("cpu")), tmp_path / "s.work"
    work.mkdir()
    model = make_model(tok)
    opt, sched, step = training(model)
    gen, log = torch.Generator().manual_seed(5), []
    for n in (1, 2):
        step()
        log.append({"step": n})
        checkpoints.save_checkpoint(work, model, opt, sched, n, gen, log, world)
    assert sorted(f.name for f in work.iterdir()) == ["checkpoint.pt", "weights-2"]
    expected_draw = torch.rand(3, generator=gen)
    step()
    fresh = make_model(tok, seed=1)
    fresh_opt, fresh_sched, fresh_step = training(fresh)
    fresh_gen = torch.Generator().manual_seed(99)
    start, log, note = checkpoints.load_checkpoint(work / "checkpoint.pt", fresh, fresh_opt, fresh_sched,
                                                   fresh_gen, world)
    assert (start, log, note) == (2, [{"step": 1}, {"step": 2}], None)
    assert torch.equal(torch.rand(3, generator=fresh_gen), expected_draw)
    assert fresh_sched.last_epoch == 2
    fresh_step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_another_number_of_processes_restarts_the_streams_and_says_so(tok, tmp_path, capsys):
    world, work = parallel.World(torch.device("cpu")), tmp_path / "s.work"
    work.mkdir()
    model = make_model(tok)
    opt, sched, step = training(model)
    gen = torch.Generator().manual_seed(5)
    step()
    checkpoints.save_checkpoint(work, model, opt, sched, 1, gen, [], world)
    ck = torch.load(work / "checkpoint.pt", weights_only=False)
    torch.save({**ck, "gens": ck["gens"] * 2}, work / "checkpoint.pt")  # as if 2 processes had written it
    fresh_gen = torch.Generator().manual_seed(99)
    state = fresh_gen.get_state()
    note = checkpoints.load_checkpoint(work / "checkpoint.pt", model, opt, sched, fresh_gen, world)[2]
    assert note == {"from_step": 1, "processes": 1, "checkpoint_processes": 2,
                    "sampler_streams": "restarted from each rank's seed"}
    assert torch.equal(fresh_gen.get_state(), state)  # this rank's own seed, not rank 0's stream of 2
    err = capsys.readouterr().err
    assert "written by 2 processes and is resumed by 1: the sampler streams restart" in err


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tmp_path):
    torch.save({"model": {}, "opt": {}, "step": 2, "gens": []}, tmp_path / "checkpoint.pt")  # whole tensors
    with pytest.raises(parallel.UserError, match="written by an older distill.py; restart with --overwrite"):
        checkpoints.load_checkpoint(tmp_path / "checkpoint.pt", None, None, None, None, None)
    with pytest.raises(parallel.UserError, match="no checkpoint at"):
        checkpoints.load_checkpoint(tmp_path / "none.pt", None, None, None, None, None)
