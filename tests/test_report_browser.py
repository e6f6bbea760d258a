"""The run report in a real browser: Debian's chromium, headless, driven through playwright's Python API (its
own browser download is never used). The demo's report (runs/demo, or a tiny model's run where there is none)
opens with no JavaScript error, loads (its first page of answers drawn) in under 2 s, and its filters and
search show the counts eval_samples.jsonl gives; so does a report of 10,000 answers. `make test-browser`
installs both and runs this file; `make test` skips it without them. REPORT_SCREENSHOT=FILE keeps the
screenshot (the README's is results/report.png: `make test-browser SCREENSHOT=results/report.png`)."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from safesteer.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo"
playwright = pytest.importorskip("playwright.sync_api", reason="no playwright (make test-browser)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium (make test-browser)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """runs/demo's files (its weights not copied), or the four stages on the tiny model."""
    root = tmp_path_factory.mktemp("browser")
    if (DEMO / "eval_samples.jsonl").is_file():
        out = root / "demo"
        shutil.copytree(DEMO, out, ignore=shutil.ignore_patterns("*.safetensors", "report.html"))
        return out
    from conftest import make_model, make_tokenizer
    from test_pipeline import run_pipeline
    tok = make_tokenizer()
    make_model(tok).save_pretrained(root / "tiny_model")
    tok.save_pretrained(root / "tiny_model")
    run_pipeline(root / "tiny_model", root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def samples_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]


def open_report(browser, path: Path):
    """(page, JavaScript errors, ms from navigation to the load event, the first answers drawn before it;
    wall seconds)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    t0 = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready]")
    wall = time.perf_counter() - t0
    loaded = page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd")
    assert 0 < float(page.get_attribute("body", "data-ready")) <= loaded
    return page, errors, loaded, wall


def student_refuses_base_does_not(page, samples, models) -> int:
    """Applies the filter 'the student refuses, base does not' on harmful_test; what the samples say."""
    base, student = models.index("base"), models.index("student")
    page.select_option("#f-split", "harmful_test")
    page.select_option(f"#f-model-{base}", "complies")
    page.select_option(f"#f-model-{student}", "refuses")
    verdict = {(r["model"], r["prompt"]): r["refusal"] for r in samples if r["set"] == "harmful_test"}
    prompts = {p for _, p in verdict}
    return sum(verdict[("student", p)] and not verdict[("base", p)] for p in prompts)


def searched(samples, word: str) -> int:
    """How many prompts the search should find: the word in the prompt, its accepted answers or an answer."""
    texts = {}
    for r in samples:
        note = f"accepted: {', '.join(map(str, r['answers']))}" if r.get("answers") else ""
        texts.setdefault((r["set"], r["prompt"]), [r["prompt"], note]).append(r["completion"])
    return sum(word in "\n".join(t).lower() for t in texts.values())


def test_the_demo_report_in_a_browser(run, browser, tmp_path):
    path = write_report(run, tmp_path / "report.html")
    page, errors, ms, wall = open_report(browser, path)
    samples = samples_of(run)
    models = list(dict.fromkeys(r["model"] for r in samples))
    n_prompts = sum(r["model"] == models[0] for r in samples)
    assert not errors
    assert page.inner_text("#count") == f"{n_prompts} of {n_prompts} prompts"
    assert page.locator("#answers .group").count() == min(20, n_prompts)
    assert ms < 2000, f"the page took {ms:.0f} ms to load"
    want = student_refuses_base_does_not(page, samples, models)
    assert page.inner_text("#count") == f"{want} of {n_prompts} prompts"
    assert page.locator("#answers .group").count() == min(20, want)
    if want:
        assert page.locator("#answers .group").first.locator(".answer").count() == len(models)
    page.click("#f-reset")
    word = samples[0]["prompt"].split()[-1].lower()
    page.fill("#f-search", word)
    page.wait_for_function(f"document.getElementById('count').textContent === "
                           f"'{searched(samples, word)} of {n_prompts} prompts'")
    page.click("#f-reset")
    student_refuses_base_does_not(page, samples, models)
    page.evaluate("document.querySelector('#stage4 h3').scrollIntoView()")
    shot = Path(os.environ.get("REPORT_SCREENSHOT") or tmp_path / "report.png")
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000 and not errors
    print(f"\n{path.stat().st_size / 1e3:.0f} kB, {n_prompts} prompts x {len(models)} models; loaded "
          f"{ms:.0f} ms after navigation ({wall:.2f} s wall); screenshot {shot}")


def test_ten_thousand_answers_in_a_browser(run, browser, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(run, big, ignore=shutil.ignore_patterns("*.safetensors"))
    rows = samples_of(run)
    copies = -(-10_000 // len(rows))
    many = [{**r, "prompt": f"{r['prompt']} (copy {k})"} for k in range(copies) for r in rows]
    (big / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    t0 = time.perf_counter()
    path = write_report(big)
    built = time.perf_counter() - t0
    page, errors, ms, wall = open_report(browser, path)
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert not errors and ms < 5000, f"the page took {ms:.0f} ms to load"
    want = student_refuses_base_does_not(page, rows, models) * copies
    n_prompts = len(many) // len(models)
    assert page.inner_text("#count") == f"{want} of {n_prompts} prompts"
    t0 = time.perf_counter()
    page.fill("#f-search", "zzz-nothing-matches")
    page.wait_for_function(f"document.getElementById('count').textContent === '0 of {n_prompts} prompts'")
    search = time.perf_counter() - t0
    print(f"\n{len(many)} answers: {path.stat().st_size / 1e6:.1f} MB, built in {built:.1f} s; loaded "
          f"{ms:.0f} ms after navigation ({wall:.2f} s wall); a search over all of them {search:.2f} s")
