"""safesteer/check_port/: the package's own pieces and both ports pass; deliberately broken ports fail, each
with a message that names what is wrong."""
import contextlib
import sys

import pytest
import torch

import distill
from ports import plain_loop
from safesteer import check_port, forcing, hooks
from safesteer.losses import collapsed_kl


def failures(results) -> list[str]:
    return [r.line() for r in results if not r.ok]


def by_name(results) -> dict:
    return {r.name: r for r in results}


def sequence_mean(per, mask):
    m = mask.to(per.dtype)
    return ((per * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


def per_position(ls, lt, s):
    b, t, v = ls.shape
    return collapsed_kl(ls.reshape(b * t, v), lt.reshape(b * t, v), s).view(b, t)


# ----------------------------------------------------------------------------- broken losses

def shifted_again(ls, lt, mask, s):
    """The usual LM label shift, applied to logits whose [:, i] already predicts token i."""
    return plain_loop.localized_loss(ls[:, :-1], lt[:, :-1], mask[:, 1:], s)


def rest_by_subtraction(ls, lt, mask, s):
    """log π(R) = log(1 − Σ_S π) in float32."""
    lp, lq = ls.float().log_softmax(-1), lt.float().log_softmax(-1)
    p_s, q_s = lp[..., s].exp(), lq[..., s].exp()
    lp_r, lq_r = torch.log(1 - p_s.sum(-1)), torch.log(1 - q_s.sum(-1))
    per = (p_s * (lp[..., s] - lq[..., s])).sum(-1) + lp_r.exp() * (lp_r - lq_r)
    return sequence_mean(per, mask)


def token_mean(ls, lt, mask, s):
    """TRL's reduction: a mean over the batch's tokens."""
    m = mask.float()
    return (per_position(ls, lt, s) * m).sum() / m.sum()


def mean_over_everything(ls, lt, mask, s):
    return (per_position(ls, lt, s) * mask.float()).mean()


def no_rest_term(ls, lt, mask, s):
    return plain_loop.localized_loss(ls, lt, mask, s, kind="partial")


def attached_teacher(ls, lt, mask, s):
    """distill.py's formula, with the teacher's logits left attached."""
    b, t, v = ls.shape
    lp, lq = ls.double().log_softmax(-1), lt.double().log_softmax(-1)
    in_s = torch.zeros(v, dtype=torch.bool)
    in_s[s] = True
    rest = [x.masked_fill(in_s, float("-inf")).logsumexp(-1) for x in (lp, lq)]
    per = (lp[..., s].exp() * (lp[..., s] - lq[..., s])).sum(-1) + rest[0].exp() * (rest[0] - rest[1])
    return sequence_mean(per, mask)


def per_sequence(ls, lt, mask, s):
    return plain_loop.sequence_losses(ls, lt, mask, s)


def test_the_references_pass_the_loss_check():
    for loss in (plain_loop.localized_loss, distill.localized_reverse_kl,
                 lambda *a: distill.localized_reverse_kl(*a, impl="formula")):
        assert not failures(check_port.check_loss(loss))
    full = check_port.check_loss(lambda *a: distill.localized_reverse_kl(*a, kind="full"), "full")
    assert not failures(full)


@pytest.mark.parametrize("broken, case, message", [
    (shifted_again, "random logits", "off by one position: each row's last masked position"),
    (lambda ls, lt, mask, s: plain_loop.localized_loss(ls[:, 1:], lt[:, 1:], mask[:, :-1], s),
     "an end-of-turn token inside the window (mask 1 through it)",
     "off by one position: positions 1 … n + 1"),
    (rest_by_subtraction, "a very confident teacher (q(R) ≈ 1e-29)",
     "log π(R) taken as log(1 − Σ_S π), by subtraction"),
    (token_mean, "padded rows (lengths 6, 4, 1; large logits in the padding)",
     "mean over the wrong axis: a mean over the batch's tokens"),
    (mean_over_everything, "padded rows (lengths 6, 4, 1; large logits in the padding)",
     "mean over the wrong axis: a mean over all b·T positions"),
    (no_rest_term, "random logits", "this is the authors' `partial` (S alone), not `collapsed`"),
    (attached_teacher, "the teacher's logits get no gradient", "detach the teacher's logits"),
    (per_sequence, "random logits", "returned [3]: the loss must be one number"),
])
def test_a_broken_loss_fails_with_what_is_wrong(broken, case, message):
    results = by_name(check_port.check_loss(broken))
    assert not results[case].ok and message in results[case].detail, results[case].line()


def test_the_subtraction_passes_where_it_is_harmless_and_fails_where_the_teacher_is_confident():
    results = by_name(check_port.check_loss(rest_by_subtraction))
    assert results["random logits"].ok
    assert not results["a very confident teacher (q(R) ≈ 1e-29)"].ok


def test_a_loss_that_leaves_out_the_end_of_turn_position_is_off_by_one():
    """Leaving out each row's last masked position is what logits[:, :-1] with mask[:, 1:] computes: the
    check names both."""
    def drops_end_of_turn(ls, lt, mask, s):
        last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
        return plain_loop.localized_loss(ls, lt, mask.scatter(1, last[:, None], 0), s)
    result = by_name(check_port.check_loss(drops_end_of_turn))[
        "an end-of-turn token inside the window (mask 1 through it)"]
    assert not result.ok and "its end-of-turn token, is left out" in result.detail, result.line()


# ----------------------------------------------------------------------------- broken hooks

def one_block_late(model, layer, vector, coefficient):
    return hooks.add_vector(model, layer + 1, vector, coefficient)


@contextlib.contextmanager
def output_of_block(model, layer, vector, coefficient):
    """A forward hook on block l: it edits the block's output, the input of block l + 1."""
    def edit(module, args, out):
        return (out[0] + coefficient * vector,) + tuple(out[1:]) if isinstance(out, tuple) else \
            out + coefficient * vector
    handle = hooks.decoder_layers(model)[layer].register_forward_hook(edit)
    try:
        yield
    finally:
        handle.remove()


def prompt_only(model, layer, vector, coefficient):
    """Steers only inputs of more than one position: the prompt, never a cached decoding step."""
    def hook(module, args, kwargs):
        def add(h):
            return h + coefficient * vector if h.shape[1] > 1 else h
        return hooks.replace_hidden(args, kwargs, add)
    return hooks.decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


def last_position(model, layer, vector, coefficient):
    def hook(module, args, kwargs):
        def add(h):
            h = h.clone()
            h[:, -1] += coefficient * vector
            return h
        return hooks.replace_hidden(args, kwargs, add)
    return hooks.decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)


def never_removed(model, layer, vector, coefficient):
    hooks.decoder_layers(model)[layer].register_forward_pre_hook(
        lambda m, args, kwargs: hooks.replace_hidden(args, kwargs, lambda h: h + coefficient * vector),
        with_kwargs=True)
    return contextlib.nullcontext()


def test_the_package_hook_passes():
    assert not failures(check_port.check_hook(hooks.add_vector, check_port.tiny_model()))


@pytest.mark.parametrize("broken, case, message", [
    (one_block_late, "a forward pass", "one block late: c·r lands at the input of block 3"),
    (output_of_block, "a forward pass", "one block late"),
    (prompt_only, "a cached decoding step", "the hook skips cached decoding steps"),
    (last_position, "a forward pass", "at the last position only"),
    (lambda m, l, v, c: hooks.add_vector(m, l, v, 1.0), "a forward pass", "adds r, not c·r"),
    (never_removed, "removed on exit", "still steered after the with block"),
])
def test_a_broken_hook_fails_with_what_is_wrong(broken, case, message):
    model = check_port.tiny_model()
    results = [r for r in check_port.check_hook(broken, model) if r.name.startswith(case)]
    assert results and not results[0].ok and message in results[0].detail, results[0].line()


# ----------------------------------------------------------------------------- positions and the mask

def outputs_at_each_token(model, prompt_ids, prompt_mask, comp):
    """The classic slip: the outputs at the completion's own tokens, each of which predicts the next one."""
    ids = torch.cat([prompt_ids, comp], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(comp)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, prompt_ids.shape[1]:]


def padding_attended(model, prompt_ids, prompt_mask, comp):
    return model(input_ids=torch.cat([prompt_ids, comp], 1)).logits[:, prompt_ids.shape[1] - 1:-1]


def test_the_package_positions_and_mask_pass():
    assert not failures(check_port.check_logits(forcing.completion_logits, check_port.tiny_model()))
    assert not failures(check_port.check_mask(forcing.end_of_turn_mask))


@pytest.mark.parametrize("broken, message", [
    (outputs_at_each_token, "off by one position: [:, i] is the output at completion token i"),
    (padding_attended, "the padding is attended"),
])
def test_broken_positions_fail_with_what_is_wrong(broken, message):
    results = check_port.check_logits(broken, check_port.tiny_model())
    assert all(not r.ok and message in r.detail for r in results), [r.line() for r in results]


@pytest.mark.parametrize("broken, case, message", [
    (lambda t, stops: forcing.end_of_turn_mask(t, stops) * ~torch.isin(t, torch.tensor(stops)),
     "a stop token inside the window", "the stop token itself is left out"),
    (lambda t, stops: forcing.end_of_turn_mask(t, stops[:1]), "a stop token inside the window",
     "only the first stop id ends a turn"),
    (lambda t, stops: torch.ones_like(t), "two stop tokens (the first ends the turn)",
     "stop tokens are ignored"),
])
def test_a_broken_mask_fails_with_what_is_wrong(broken, case, message):
    result = by_name(check_port.check_mask(broken))[case]
    assert not result.ok and message in result.detail, result.line()


# ----------------------------------------------------------------------------- the command line

def test_command_line_passes_a_port_file_and_fails_a_broken_one(tmp_path, capsys):
    good = tmp_path / "good.py"
    good.write_text("from ports.plain_loop import localized_loss\n")
    check_port.main([f"{good}:localized_loss", "--mask", "safesteer.forcing:end_of_turn_mask"])
    out = capsys.readouterr().out
    assert "14 of 14 checks passed" in out and "FAIL" not in out
    bad = tmp_path / "bad.py"
    bad.write_text("from ports.plain_loop import localized_loss\n\n\ndef loss(ls, lt, mask, s):\n"
                   "    return localized_loss(ls[:, :-1], lt[:, :-1], mask[:, 1:], s)\n")
    with pytest.raises(SystemExit) as stop:
        check_port.main([f"{bad}:loss"])
    out = capsys.readouterr().out
    assert stop.value.code == 1 and "FAIL  random logits: off by one position" in out
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == 9  # one line per case


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to check"),
    (["no_such_module_x:f"], "cannot import no_such_module_x"),
    (["ports.plain_loop:nothing"], "ports.plain_loop has no function nothing"),
    (["missing.py:f"], "missing.py: file not found"),
    (["just_a_name"], "give MODULE:FUNCTION"),
])
def test_bad_input_is_one_error_line(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["check_port.py", *argv])
    with pytest.raises(SystemExit) as stop:
        check_port.run_cli(check_port.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
