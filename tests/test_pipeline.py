"""All four stages end to end: on a tiny random model (fast), and on the bundled model (slow)."""
import json

import pytest

import distill
import evaluate
import extract_direction
import select_tokens
from safesteer.files import data_file


def run_pipeline(model, out, tiny=True):
    m = ["--model", str(model), "--out", str(out)]
    extract_direction.main(m + ["--n-train", "4", "--n-val", "3", "--n-check-prompts", "2",
                                "--check-new-tokens", "4"]
                           + (["--kl-max", "1e9"] if tiny else  # the demo's Stage 1, over blocks 0-2 only
                              ["--kind", "response", "--teacher-grid", "0.5", "1.0",
                               "--max-layer-frac", "0.1", "--grid-blocks", "1", "--grid-new-tokens", "2"]))
    select_tokens.main(m + ["--n-prompts", "3", "--samples", "2", "--max-new-tokens", "3", "--k", "8",
                            "--k-vote", "16", "--score", "kl"])
    distill.main(m + ["--max-steps", "2", "--prompts-per-step", "2", "--samples", "2",
                      "--max-new-tokens", "6", "--anchor", str(data_file("harmless_train")),
                      "--anchor-per-step", "1"])  # as the demo does
    evaluate.main(m + ["--n-prompts", "3", "--max-new-tokens", "6", "--qa-new-tokens", "4"])
    log = (out / "student" / "train_log.jsonl").read_text().splitlines()
    assert all("anchor_refusal" in json.loads(line) for line in log)
    return json.loads((out / "eval.json").read_text())


def check_eval(res):
    assert set(res["models"]) == {"base", "teacher", "student"}
    for name, r in res["models"].items():
        for key in ("refusal_harmful", "asr", "over_refusal", "over_refusal_risky", "kl_to_base", "nll",
                    "qa_accuracy"):
            assert key in r, (name, key)
        assert r["asr"]["rate"] == pytest.approx(1 - r["refusal_harmful"]["rate"])
        for key in ("refusal_harmful", "over_refusal", "qa_accuracy", "harmful_reform", "harmless_reform"):
            assert 0 <= r[key]["lo"] <= r[key]["rate"] <= r[key]["hi"] <= 1, (name, key)
        assert set(r["harmful_reform_by_style"]) <= {"short_question", "past_tense", "hypothetical",
                                                     "third_person_story"}
        assert r["kl_to_base"]["lo"] <= r["kl_to_base"]["value"] <= r["kl_to_base"]["hi"]
    assert res["models"]["base"]["kl_to_base"]["value"] == pytest.approx(0, abs=1e-9)
    assert set(res["models"]["student"]["paired"]) == {"base", "teacher"}
    assert "p_value" in res["models"]["student"]["paired"]["base"]["harmful"]
    assert res["counts"]["harmful"] == 3 and res["judge_phrases"]


def test_pipeline_tiny(model_dir, tmp_path):
    out = tmp_path / "run"
    res = run_pipeline(model_dir, out)
    check_eval(res)
    md = (out / "eval.md").read_text()
    assert "| student |" in md and "| teacher |" in md
    samples = [json.loads(l) for l in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert {s["set"] for s in samples} == {"harmful_test", "harmless_test", "harmful_reform_test",
                                                  "harmless_reform_test", "general_qa"}


@pytest.mark.slow
def test_pipeline_bundled_model(tmp_path):
    """The real SmolLM2-135M-Instruct, smallest settings that still run every stage."""
    res = run_pipeline("smollm2-135m", tmp_path / "run", tiny=False)
    check_eval(res)
    assert res["models"]["teacher"]["kl_to_base"]["value"] > 0
    meta = json.loads((tmp_path / "run" / "direction.json").read_text())
    assert meta["selection_rule"] == "selectivity" and meta["layer"] in (0, 1, 2)
