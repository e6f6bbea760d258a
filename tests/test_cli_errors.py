"""Bad input: every case gives one line `error: ...` naming the problem, exit code 2, no traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safesteer.chat import tokenizer_fingerprint
from safesteer.cli import run_cli
from safesteer.files import save_tensors, write_json
import distill
import evaluate
import extract_direction
import select_tokens

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"extract": extract_direction, "select": select_tokens, "distill": distill, "evaluate": evaluate}


def run(stage, argv, capsys):
    """Run a stage the way its command line does; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: STAGES[stage].main(argv))
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def run_dir(tmp_path, model_dir, tok):
    """A run directory holding valid Stage 1 and 2 outputs for the tiny model."""
    out = tmp_path / "run"
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    save_tensors(out / "direction.safetensors", {"direction": torch.ones(hidden)})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0})
    write_json(out / "safety_tokens.json", {"token_ids": [10, 20], "vocab_size": len(tok),
                                                   "tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    return out


def files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    return tmp_path


CASES = [
    # (id, stage, arguments, expected fragment); "{t}" in an argument is the folder of bad files
    ("missing prompt file", "extract", ["--harmful-train", "{t}/nope.jsonl"], "file not found"),
    ("empty prompt file", "extract", ["--harmful-train", "{t}/empty.jsonl"], "holds no prompts"),
    ("no recognised field", "extract", ["--harmless-train", "{t}/nofield.jsonl"],
     "nofield.jsonl:1: no prompt field"),
    ("malformed JSON line", "select", ["--prompts", "{t}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    ("layer out of range", "extract", ["--layer", "99", "--position", "-1"], "--layer must be in 0..3"),
    ("position out of range", "extract", ["--layer", "1", "--position", "-99"], "--position in"),
    ("direction of another size", "select", ["--direction", "{t}/small.safetensors"], "hidden size is 32"),
    ("direction layer out of range", "select", ["--direction", "{t}/deep.safetensors"], "out of range"),
    ("missing direction", "distill", ["--direction", "{t}/none.safetensors"], "direction file not found"),
    ("token file for another tokenizer", "distill", ["--tokens", "{t}/other_tok.json"], "another tokenizer"),
    ("token ids beyond the vocabulary", "distill", ["--tokens", "{t}/big_ids.json"],
     "outside the model's vocabulary"),
    ("student that is not a model", "evaluate", ["--models", "s={t}/not_a_model"], "not a model directory"),
    ("bad --models item", "evaluate", ["--models", "nonsense"], "NAME=SPEC"),
    ("results already there", "select", [], "--overwrite"),
    ("model directory missing", "extract", ["--model", "{t}/nomodel"], "not found"),
    ("model without chat template", "extract", ["--model", "{t}/notemplate"],
     "no chat template; pass one with --chat-template FILE"),
    ("missing --chat-template file", "select", ["--chat-template", "{t}/nope.jinja"],
     "chat template file not found"),
    ("steps not an integer", "distill", ["--max-steps", "2.5"], "expected an integer"),
    ("cuda without cuda", "extract", ["--device", "cuda"], "CUDA"),
    ("k <= 0", "select", ["--k", "0"], "--k: must be > 0"),
    ("temperature < 0", "distill", ["--temperature", "-1"], "--temperature: must be >= 0"),
    ("lr <= 0", "distill", ["--lr", "0"], "--lr: must be > 0"),
    ("top-p out of range", "distill", ["--top-p", "1.5"], "--top-p"),
    ("layer without position", "extract", ["--layer", "1"], "together"),
]


@pytest.mark.parametrize("name,stage,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, stage, argv, fragment, tmp_path, model_dir, run_dir, tok, capsys):
    if name == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    t = files(tmp_path)
    save_tensors(t / "small.safetensors", {"direction": torch.ones(7)})
    write_json(t / "small.json", {"layer": 1})
    save_tensors(t / "deep.safetensors", {"direction": torch.ones(32)})
    write_json(t / "deep.json", {"layer": 40})
    meta = json.loads((run_dir / "safety_tokens.json").read_text())
    write_json(t / "other_tok.json", {**meta, "tokenizer_fingerprint": "f" * 16})
    write_json(t / "big_ids.json", {**meta, "token_ids": [1, 99_999]})
    (t / "not_a_model").mkdir()
    nt = t / "notemplate"
    from conftest import make_model, make_tokenizer
    plain = make_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(nt)
    make_model(plain).save_pretrained(nt)
    capsys.readouterr()  # drop what the fixtures printed
    extra = [] if name == "results already there" else ["--overwrite"]
    code, err = run(stage, ["--model", str(model_dir), "--out", str(run_dir)]
                    + [a.format(t=t) for a in argv] + extra, capsys)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "extract_direction.py"), "--harmful-train",
                           str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.jsonl'}: file not found"]
    assert not (tmp_path / "run").exists()  # inputs are read before the output folder is made


def test_help_shows_defaults_and_usage(capsys):
    for mod in STAGES.values():
        with pytest.raises(SystemExit) as e:
            mod.parse_args(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "Usage:" in text and "--seed" in text and "--device" in text
        flat = " ".join(text.split())  # argparse wraps help lines
        assert "and the sampler (default: 0)" in flat and "if available (default: auto)" in flat


@pytest.mark.parametrize("stage", ["extract", "select", "evaluate"])
def test_every_option_has_help_and_shows_its_default_or_is_a_flag(stage, capsys):
    """Stages 1, 2 and 4: each visible option has help text, and --help shows its default unless it is a flag
    (an option without a default says what happens without it, in words containing "default")."""
    import argparse
    parser = STAGES[stage].build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    formatter = parser._get_formatter()
    visible = [a for a in parser._actions
               if a.help is not argparse.SUPPRESS and a.option_strings != ["-h", "--help"]]
    assert len(visible) >= 15
    for action in visible:
        text = " ".join(formatter._expand_help(action).split())
        assert action.help and text in flat, action.option_strings
        if action.nargs == 0:  # a flag: off unless given
            assert action.default is False, action.option_strings
        elif action.default is None:  # no value: the help says in words what happens then
            assert "(default: " in text, action.option_strings
        else:
            assert f"(default: {action.default})" in text, action.option_strings


RENAMED = {"extract": {"--grid-tokens": ("--grid-new-tokens", "7"),
                       "--check-tokens": ("--check-new-tokens", "7"),
                       "--check-prompts": ("--n-check-prompts", "7"),
                       "--harmful": ("--harmful-train", "h.jsonl"),
                       "--harmless": ("--harmless-train", "h.jsonl")},
           "select": {"--horizon": ("--max-new-tokens", "7")},
           "evaluate": {"--n": ("--n-prompts", "7"), "--qa-tokens": ("--qa-new-tokens", "7")}}


@pytest.mark.parametrize("stage,old,new,value",
                         [(s, o, n, v) for s, d in RENAMED.items() for o, (n, v) in d.items()])
def test_renamed_options_keep_their_old_spelling_for_one_release(stage, old, new, value, capsys):
    """The old spelling sets what the new one sets and prints one deprecation line; neither shows in
    --help."""
    parse = STAGES[stage].parse_args
    dest = new.lstrip("-").replace("-", "_")
    assert (getattr(parse([old, value]), dest) == getattr(parse([new, value]), dest)
            != getattr(parse([]), dest))
    assert capsys.readouterr().err == f"warning: {old} is deprecated; use {new}\n"
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = capsys.readouterr().out
    assert new in shown and not any(w.strip(",") == old for w in shown.split())


def test_nonsense_max_prompt_tokens_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        extract_direction.parse_args(["--max-prompt-tokens", "0", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--max-prompt-tokens: must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
