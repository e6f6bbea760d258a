"""The plumbing in safesteer/ (files, models, cli): prompt files, data splits, atomic files, loading, argument
types."""
import argparse
import json
import os

import pytest
import torch

from safesteer.cli import (Parser, add_renamed, fraction, non_negative_float, non_negative_int, pick_device,
                           positive_float, positive_int)
from safesteer.files import _atomic_write, data_file, read_prompts, write_json
from safesteer.models import load_model
from safesteer.errors import UserError


# ----------------------------------------------------------------------------- prompt files

def test_read_prompts_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"goal": "g1"}\n\n{"prompt": "p2", "goal": "x"}\n"plain"\n')
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "i1"}, "s2"]))
    (tmp_path / "c.csv").write_text("id,behavior\n1,b1\n2,\"b, 2\"\n")
    (tmp_path / "d.txt").write_text("t1\n\n  t2  \n")
    assert read_prompts(tmp_path / "a.jsonl") == ["g1", "p2", "plain"]
    assert read_prompts(tmp_path / "b.json") == ["i1", "s2"]
    assert read_prompts(tmp_path / "c.csv") == ["b1", "b, 2"]
    assert read_prompts(tmp_path / "d.txt") == ["t1", "t2"]
    sub = read_prompts(tmp_path / "d.txt", limit=1, seed=1)
    assert len(sub) == 1 and sub == read_prompts(tmp_path / "d.txt", limit=1, seed=1)


@pytest.mark.parametrize("name,text,message", [
    ("missing.jsonl", None, "file not found"),
    ("empty.jsonl", "", "holds no prompts"),
    ("blank.txt", "\n  \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl:2: malformed JSON"),
    ("nofield.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', "nofield.jsonl:2: no prompt field"),
    ("emptyfield.jsonl", '{"prompt": "  "}\n', "emptyfield.jsonl:1: empty"),
    ("bad.json", '{"a": 1', "malformed JSON"),
    ("notlist.json", '{"a": 1}', "expected a JSON list"),
    ("nofield.csv", "a,b\n1,2\n", "nofield.csv:2: no prompt field"),
    ("x.parquet", "zz", "unsupported"),
])
def test_read_prompts_errors(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_prompts(path)


# ----------------------------------------------------------------------------- data

SIZES = {"harmful_train": 100, "harmful_val": 32, "harmless_train": 128, "harmless_val": 32,
         "harmful_test": 100, "harmless_test": 100, "general_qa": 60, "harmful_reform_test": 100,
         "harmless_reform_test": 60, "harmful_train_reform": 40, "harmful_val_reform": 20,
         "harmless_train_reform": 40, "harmless_val_reform": 20}
STYLES = {"short_question", "past_tense", "hypothetical", "third_person_story"}


def test_data_splits_sizes_and_disjoint():
    seen = {}
    for name, n in SIZES.items():
        rows = [json.loads(line) for line in data_file(name).read_text().splitlines()]
        assert len(rows) == n, name
        assert all(r.get("category") for r in rows)
        for p in read_prompts(data_file(name)):
            key = p.lower().strip()
            assert key not in seen, f"{p!r} in {name} and {seen.get(key)}"
            seen[key] = name
    harm = {json.loads(l)["category"] for n in ("harmful_train", "harmful_val", "harmful_test")
            for l in data_file(n).read_text().splitlines()}
    assert len(harm) >= 8
    for n in ("harmful_train", "harmful_val", "harmful_test"):  # every harm category in every split
        cats = {json.loads(l)["category"] for l in data_file(n).read_text().splitlines()}
        assert cats == harm, n
    risky = [l for l in data_file("harmless_test").read_text().splitlines() if "risky_sounding" in l]
    assert len(risky) >= 20
    # every style, each well represented
    for n, least in (("harmful_reform_test", 15), ("harmless_reform_test", 15), ("harmful_train_reform", 10),
                     ("harmful_val_reform", 5), ("harmless_train_reform", 10), ("harmless_val_reform", 5)):
        rows = [json.loads(l) for l in data_file(n).read_text().splitlines()]
        counts = {s: sum(r["style"] == s for r in rows) for s in STYLES}
        assert set(r["style"] for r in rows) == STYLES and min(counts.values()) >= least, (n, counts)
        assert n.startswith("harmless") or {r["category"] for r in rows} == harm, n


def test_mixed_distillation_prompts_are_train_prompts():
    """harmful_train_mixed: the first 6 direct requests of each category and all 40 rephrased train prompts,
    100 in all, nothing from another split (so the seen-check above need not cover it)."""
    rows = lambda n: [json.loads(l) for l in data_file(n).read_text().splitlines()]
    mixed, plain, reform = rows("harmful_train_mixed"), rows("harmful_train"), rows("harmful_train_reform")
    cats = list(dict.fromkeys(r["category"] for r in plain))
    expected = [r for c in cats for r in [p for p in plain if p["category"] == c][:6]
                + [p for p in reform if p["category"] == c]]
    assert mixed == expected and len(mixed) == 100


# ----------------------------------------------------------------------------- files and loading

def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        _atomic_write(path, boom)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left


def test_atomic_write_gives_files_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        mode = write_json(tmp_path / "y.json", {"a": 1}).stat().st_mode & 0o777
    finally:
        os.umask(old)
    assert mode == 0o644  # not a temporary file's private 0o600


def test_load_model_dir_and_errors(model_dir, tmp_path):
    model, tok = load_model(str(model_dir))
    assert tok.padding_side == "left" and model.training is False
    with pytest.raises(UserError, match="not a transformers model"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_model("./nope/nothing")


def test_cuda_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA"):
        pick_device("cuda")


@pytest.mark.parametrize("kind,text,ok", [
    (positive_int, "3", 3), (positive_int, "0", None), (positive_int, "2.5", None),
    (non_negative_int, "0", 0), (positive_float, "8e-5", 8e-5),
    (positive_float, "-1", None),
    (non_negative_float, "0", 0.0), (fraction, "1", 1.0), (fraction, "1.5", None),
    (fraction, "0", None), (positive_float, "abc", None),
])
def test_number_types(kind, text, ok):
    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    else:
        assert kind(text) == ok


def test_renamed_option_old_spelling_works_warns_once_and_stays_out_of_help(capsys):
    p = Parser("doc")
    group = p.add_argument_group("some group")
    add_renamed(group, "--horizon", "--max-new-tokens", type=positive_int, default=8, help="H")
    add_renamed(p, "--quiet", "--silent", action="store_true", help="a flag renamed")
    assert vars(p.parse_args([])) == {"max_new_tokens": 8, "silent": False}
    assert capsys.readouterr().err == ""
    assert p.parse_args(["--max-new-tokens", "3", "--silent"]).max_new_tokens == 3
    assert capsys.readouterr().err == ""  # the new spelling is silent
    args = p.parse_args(["--horizon", "5", "--quiet"])
    assert (args.max_new_tokens, args.silent) == (5, True)
    assert capsys.readouterr().err.splitlines() == ["warning: --horizon is deprecated; use --max-new-tokens",
                                                    "warning: --quiet is deprecated; use --silent"]
    # last one wins, as usual
    assert p.parse_args(["--horizon", "5", "--max-new-tokens", "6"]).max_new_tokens == 6
    assert capsys.readouterr().err.count("deprecated") == 1
    with pytest.raises(SystemExit):  # the old spelling checks its value as the new one does
        p.parse_args(["--horizon", "0"])
    assert "--horizon: must be > 0" in capsys.readouterr().err
    help_text = p.format_help()
    assert "--max-new-tokens" in help_text and "(default: 8)" in help_text and "--silent" in help_text
    assert "--horizon" not in help_text and "--quiet" not in help_text
