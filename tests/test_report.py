"""The run report (safesteer/report/): Stage 4 writes it from a tiny model's run; an HTML parser finds every
stage's section, S's tokens marked where the run's tokenizer puts them, the filters' counts as in
eval_samples.jsonl, and no external reference. The same page in a real browser: test_report_browser.py."""
import json
import re
import shutil
from collections import Counter
from html.parser import HTMLParser

import pytest
from transformers import AutoTokenizer

import evaluate
from conftest import make_model, make_tokenizer
from safesteer.cli import run_cli
from safesteer.errors import UserError
from safesteer.report import build_report, write_report
from safesteer.report.answers import PAGE_SIZE
from safesteer.report.stages import shown
from safesteer.report.svg import heat_map, line_chart, shade
from safesteer.report.tokens import split_at
from test_pipeline import run_pipeline

STAGE4_FILES = ("eval.json", "eval.md", "eval_samples.jsonl")


class Page(HTMLParser):
    """What the tests read of a report: sections, elements by tag, marks, selects, the answers' JSON."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.tags, self.sections, self.marks = [], [], {}, []
        self.selects, self.data, self.chunks = {}, None, {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs, self.section()))
        if tag == "section":
            self.sections[attrs["id"]] = []
        if tag not in ("br", "meta", "input"):
            self.stack.append((tag, attrs))
        if tag == "select":
            self.selects[attrs["id"]] = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), self.section()))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def section(self):
        return next((a["id"] for t, a in reversed(self.stack) if t == "section"), None)

    def handle_data(self, data):
        if not self.stack:
            return
        tag, attrs = self.stack[-1]
        where = self.section()
        if where:
            self.sections[where].append(data)
        in_table = any(a.get("class") == "tokens" for t, a in self.stack if t == "table")
        if tag == "mark" and not in_table:
            self.marks.append(data)
        if tag == "option":
            select = next(a["id"] for t, a in reversed(self.stack) if t == "select")
            self.selects[select].append((attrs.get("value", ""), data))
        if tag == "script" and attrs.get("id") == "answers-data":
            self.data = json.loads(data)
        self.chunks.setdefault(tag, []).append(data)


def option_counts(options) -> dict:
    """{value: n} from options labelled 'value (n)', the first ('every ...') left out."""
    return {value: int(re.search(r"\((\d+)\)$", label).group(1)) for value, label in options[1:]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The four stages on the tiny model; Stage 4's own files are checked untouched by its report."""
    root = tmp_path_factory.mktemp("report")
    tok, model_dir = make_tokenizer(), root / "tiny_model"
    make_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    real, before = evaluate.write_report, {}

    def checked(out):  # the report is written after Stage 4's files and leaves them as they were
        before.update({name: (out / name).read_bytes() for name in STAGE4_FILES})
        path = real(out)
        assert {name: (out / name).read_bytes() for name in STAGE4_FILES} == before
        return path

    evaluate.write_report = checked
    try:
        run_pipeline(model_dir, root / "run")
    finally:
        evaluate.write_report = real
    assert set(before) == set(STAGE4_FILES)
    return root / "run"


@pytest.fixture(scope="module")
def page(tiny_run):
    return Page((tiny_run / "report.html").read_text())


def samples_of(run):
    return [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]


def test_stage4_writes_the_report_with_every_stage_section(tiny_run, page):
    assert list(page.sections) == ["stage1", "stage2", "stage3", "stage4"]
    kinds = {where: {(t, a.get("class")) for t, a, w in page.tags if w == where} for where in page.sections}
    assert ("svg", "heat") in kinds["stage1"]  # the candidates' scores over positions x blocks
    assert ("table", "tokens") in kinds["stage2"]
    assert ("svg", "chart") in kinds["stage3"]  # loss per step and the others
    assert ("table", "results") in kinds["stage4"] and page.data is not None
    text = {where: " ".join(chunks) for where, chunks in page.sections.items()}
    assert "did not run" not in " ".join(text.values())
    chosen = json.loads((tiny_run / "direction.json").read_text())
    outlined = [a for t, a, w in page.tags if t == "rect" and a.get("stroke") == "#e6550d" and w == "stage1"]
    assert len(outlined) == 3  # the chosen r in each of bypass, induce and KL
    assert any(f"{chosen['position']}" in c and str(chosen["layer"]) in c for c in page.chunks["title"])
    tokens = json.loads((tiny_run / "safety_tokens.json").read_text())
    rows = [a for t, a, w in page.tags if t == "tr" and w == "stage2"]
    assert len(rows) == 1 + len(tokens["token_ids"])  # the header and one row per token of S
    log = (tiny_run / "student" / "train_log.jsonl").read_text().splitlines()
    points = [a for t, a, w in page.tags if t == "circle" and w == "stage3"]
    assert len(points) % len(log) == 0 and points  # every logged step drawn


def test_the_marked_tokens_are_s_where_the_tokenizer_puts_them(tiny_run, page):
    tok = AutoTokenizer.from_pretrained(tiny_run / "student")
    s_ids = json.loads((tiny_run / "safety_tokens.json").read_text())["token_ids"]
    s_text = {tok.decode([i]) for i in s_ids}
    samples, data = samples_of(tiny_run), page.data
    by_model = {m: [r for r in samples if r["model"] == m] for m in data["models"]}
    marked = 0
    for k, m in enumerate(data["models"]):
        answers = [p["a"][k] for p in data["prompts"]]
        assert [a[0] and "".join(a[0]) for a in answers] == [r["completion"] for r in by_model[m]]
        for (parts, _), row in zip(answers, by_model[m]):
            hits = parts[1::2]
            assert set(hits) <= s_text  # each mark is one token of S, as it decodes
            ids = tok(row["completion"], add_special_tokens=False)["input_ids"]
            in_s = [i for i in ids if i in s_ids]
            plain = [i for i in in_s if tok.decode([i]).isascii()]  # one whole character: always marked
            assert len(plain) <= len(hits) <= len(in_s)
            marked += len(hits)
    assert marked > 0
    assert set(page.marks) <= s_text  # the teacher's continuations in Stage 2


def test_the_filters_counts_are_eval_samples_counts(tiny_run, page):
    samples = samples_of(tiny_run)
    models = page.data["models"]
    first = [r for r in samples if r["model"] == models[0]]
    assert len(page.data["prompts"]) == len(first) and page.data["page"] == PAGE_SIZE
    assert option_counts(page.selects["f-split"]) == Counter(r["set"] for r in first)
    assert option_counts(page.selects["f-style"]) == Counter(r.get("style") or "(none)" for r in first)
    for k, m in enumerate(models):
        mine = [r for r in samples if r["model"] == m]
        want = {"refuses": sum(r.get("refusal") is True for r in mine),
                "complies": sum(r.get("refusal") is False for r in mine),
                "correct": sum(r.get("correct") is True for r in mine),
                "wrong": sum(r.get("correct") is False for r in mine)}
        assert option_counts(page.selects[f"f-model-{k}"]) == want  # both sides of a verdict, 0 included


def test_the_report_names_no_external_url(tiny_run):
    text = (tiny_run / "report.html").read_text()
    page = Page(text)
    refs = [(t, k, v) for t, a, _ in page.tags for k, v in a.items()
            if k in ("href", "src", "action", "data", "poster", "xlink:href", "srcset")]
    assert all(v.startswith("#") for _, _, v in refs), refs
    assert not {t for t, _, _ in page.tags} & {"link", "img", "iframe", "object", "embed", "base"}
    outside_data = re.sub(r'<script type="application/json".*?</script>', "", text, flags=re.S)
    assert "://" not in outside_data and "url(" not in outside_data and "@import" not in outside_data


def test_the_command_writes_where_asked_and_prints_it(tiny_run, tmp_path, capsys):
    from safesteer.report.command import main
    main([str(tiny_run), "--out", str(tmp_path / "r.html")])
    assert f"wrote {tmp_path / 'r.html'}" in capsys.readouterr().out
    assert (tmp_path / "r.html").read_text() == (tiny_run / "report.html").read_text()  # same files: same
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # written whole: no temporary file left


def test_bad_input_is_one_line(tiny_run, tmp_path, capsys):
    from safesteer.report.command import main
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "eval.json").write_text('{"models": ')
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "nowhere")], "no such run directory"),
             ([str(broken)], "eval.json:1: malformed JSON"),
             ([str(tmp_path / "empty")], "holds none of the stages' files")]
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and fragment in err and err.count("\n") == 1
    (broken / "eval.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not the stage's file"):
        build_report(broken)
    shutil.copy(tiny_run / "eval.json", broken)
    (broken / "candidates.json").write_text('{"candidates": [{"position": -1}, {"position": -2}]}')
    with pytest.raises(UserError, match="candidates.json: not as the stage writes them"):
        build_report(broken)


def test_a_stage_that_did_not_run_is_shown_absent(tiny_run, tmp_path):
    only_eval = tmp_path / "only_eval"
    only_eval.mkdir()
    for name in STAGE4_FILES:
        shutil.copy(tiny_run / name, only_eval)
    page = Page(build_report(only_eval))
    text = {where: " ".join(chunks) for where, chunks in page.sections.items()}
    assert all("did not run" in text[s] for s in ("stage1", "stage2", "stage3")) and page.data
    assert not page.marks and all(len(p["a"][0][0]) == 1 for p in page.data["prompts"])  # no S: no mark


def test_ten_thousand_answers_stay_one_page_of_data(tiny_run, tmp_path):
    """A large run's answers are data the page draws 20 prompts at a time: its HTML holds none of them."""
    big = tmp_path / "big"
    shutil.copytree(tiny_run, big)
    rows, words = samples_of(tiny_run), "the refusal direction moves a few tokens of every answer".split()
    copies = -(-10_000 // len(rows))
    many = [{**r, "prompt": f"{r['prompt']} ({k})", "completion": " ".join(words * 4) + r["completion"]}
            for k in range(copies) for r in rows]
    (big / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    path = write_report(big)
    page = Page(path.read_text())
    assert len(page.data["prompts"]) * len(page.data["models"]) == len(many) >= 10_000
    assert not [a for t, a, _ in page.tags if a.get("class") == "group"]  # drawn by the script, 20 at a time
    assert path.stat().st_size < 1_000 * len(many)  # under 1 kB an answer of ~230 characters
    assert "not the file eval.json names" in " ".join(page.sections["stage4"])


def test_split_at_marks_whole_tokens_only():
    s = {441: " not", 9: "an", 200: "\ufffd"}
    offsets = [(0, 1), (1, 5), (5, 9)]
    assert split_at("I can not", [57, 540, 441], offsets, s) == (["I can", " not", ""], [441])
    # "another" as one token holds "an" as text but not as a token
    assert split_at("another", [8000], [(0, 7)], s) == (["another"], [])
    assert split_at("another", [9, 7000], [(0, 2), (2, 7)], s) == (["", "an", "other"], [9])
    # the two bytes of "é" are tokens of one character: neither decodes to it alone
    assert split_at("é!", [200, 201, 0], [(0, 1), (0, 1), (1, 2)], s) == (["é!"], [])
    assert split_at("", [], [], s) == ([""], [])


def test_pictures():
    assert shade(0) == "#f7fbff" and shade(1) == "#08306b"
    svg = heat_map(["a", "b"], ["0", "1"], {("a", "0"): 1.0, ("a", "1"): float("nan"), ("b", "0"): 3.0},
                   marked={("b", "0")})
    cell = r'<rect x="[^"]+" y="[^"]+" width="22" height="22" fill="(#\w+)"( stroke="#e6550d")?'
    cells = re.findall(cell, svg)
    assert [c[0] for c in cells] == [shade(0), "#dddddd", shade(1), "#dddddd"]  # NaN and missing: grey
    assert [bool(c[1]) for c in cells] == [False, False, True, False]
    assert line_chart("empty", [("x", [1, 2], [float("nan"), None])]) is None
    chart = line_chart("loss", [("loss", [1, 2, 3], [0.5, 0.25, 0.125])], marks=[2])
    assert chart.count("<circle") == 3 and "refresh after step 2" in chart
    assert shown(" no\n\x02") == "␣no\\n\\x02"
