"""experiments/teacher_sweep.py: the refusal rate of a steered teacher against a brute-force greedy decode,
the
sweep's choice of vector, and the command line end to end on a tiny model."""

import pytest
import torch

from safesteer.chat import encode_chats, post_instruction_ids, stop_token_ids
from safesteer.hooks import add_vector
from safesteer import metrics
from experiments import teacher_sweep

PROMPTS = ["hi", "tell me a long story please", "why?", "what is two plus two"]


def judge_by_length(text: str) -> bool:
    """A stand-in judge that calls about half of a random model's answers refusals, so that rates are not
    all 0."""
    return len(text) % 2 == 0


def brute_force_rate(model, tok, prompts, layer, vec, c, max_new_tokens):
    """One prompt at a time, decoded by transformers' generate with the hook on, judged one by one."""
    texts = []
    stops = stop_token_ids(tok)
    for p in prompts:
        ids, mask = encode_chats(tok, [p])
        with add_vector(model, layer, vec, c), torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))  # through the first stop
        texts.append(tok.decode(new[:end], skip_special_tokens=True))
    return sum(map(metrics.is_refusal, texts)) / len(texts), texts


@pytest.mark.parametrize("c", [0.0, 4.0])
def test_refusal_rate_equals_a_brute_force_decode(tok, model, monkeypatch, c):
    monkeypatch.setattr(metrics, "is_refusal", judge_by_length)
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    rate, texts = teacher_sweep.refusal_rate(model, tok, PROMPTS, 2, vec, c, max_new_tokens=6)
    ref_rate, ref_texts = brute_force_rate(model, tok, PROMPTS, 2, vec, c, max_new_tokens=6)
    assert texts == ref_texts
    assert rate == ref_rate


def test_the_hook_changes_the_answers(tok, model):
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _, plain = teacher_sweep.refusal_rate(model, tok, PROMPTS, 1, vec, 0.0, max_new_tokens=6)
    _, steered = teacher_sweep.refusal_rate(model, tok, PROMPTS, 1, vec, 8.0, max_new_tokens=6)
    assert plain != steered


@pytest.mark.parametrize("kind", ["prompt", "response"])
def test_sweep_steers_with_the_chosen_candidate(tok, model, monkeypatch, kind):
    monkeypatch.setattr(metrics, "is_refusal", judge_by_length)
    r, n_pos = teacher_sweep.directions(model, tok, kind, PROMPTS[:2], PROMPTS[2:])
    assert r.shape == (n_pos, model.config.num_hidden_layers, model.config.hidden_size)
    assert n_pos == (1 if kind == "response" else len(post_instruction_ids(tok)))
    rows = teacher_sweep.sweep(model, tok, r, n_pos, -1, [1, 3], [0.5, 2.0], PROMPTS[:2], PROMPTS[2:], 5)
    assert [(row["layer"], row["coefficient"]) for row in rows] == [(1, 0.5), (1, 2.0), (3, 0.5), (3, 2.0)]
    for row in rows:  # the last position's vector at that block, as Stage 1 stores it
        vec = r[n_pos - 1, row["layer"]].float()
        h, texts = teacher_sweep.refusal_rate(model, tok, PROMPTS[:2], row["layer"], vec,
                                              row["coefficient"], 5)
        s, _ = teacher_sweep.refusal_rate(model, tok, PROMPTS[2:], row["layer"], vec, row["coefficient"], 5)
        assert (row["harmful"], row["harmless"], row["first"]) == (h, s, texts[0])


def test_command_line_on_a_tiny_model(model_dir, capsys):
    teacher_sweep.main(["--model", str(model_dir), "--layers", "1", "2", "--coefficients", "0", "1",
                        "--max-new-tokens", "3", "--n-train", "4", "--n-val", "2"])
    out = capsys.readouterr().out
    assert "greedy, 3 tokens" in out and "on 2 harmful_val / 2 harmless_val prompts" in out
    table = out.split("first harmful completion\n", 1)[1].strip().splitlines()
    assert ([line.split()[:2] for line in table]
            == [["1", "0.00"], ["1", "1.00"], ["2", "0.00"], ["2", "1.00"]])


def test_bad_arguments_stop_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as e:
        teacher_sweep.parse_args(["--max-new-tokens", "0"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_old_spelling_of_max_new_tokens_still_works(capsys):
    assert teacher_sweep.parse_args(["--tokens", "24"]).max_new_tokens == 24
    assert "--max-new-tokens" in capsys.readouterr().err  # a one-line deprecation warning
