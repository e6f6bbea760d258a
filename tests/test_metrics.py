"""metrics.py: the judge, intervals and paired tests against values computed by hand."""
import math

import pytest

import metrics


def test_wilson_against_hand_computation():
    # k = 20, n = 100, z = 1.96: centre (0.2 + 1.96²/200) / (1 + 1.96²/100), half-width as in Wilson (1927)
    z = metrics.Z95
    centre = (0.2 + z * z / 200) / (1 + z * z / 100)
    half = z / (1 + z * z / 100) * math.sqrt(0.2 * 0.8 / 100 + z * z / 40000)
    lo, hi = metrics.wilson(20, 100)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert (round(lo, 4), round(hi, 4)) == (0.1334, 0.2888)  # the textbook interval for 20/100
    lo, hi = metrics.wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(z * z / (10 + z * z))  # no collapse to a point at k = 0
    assert metrics.wilson(10, 10)[1] == pytest.approx(1) and metrics.wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_against_hand_computation():
    # discordant pairs: a yes / b no = 1, a no / b yes = 7 -> two-sided p = 2 * P(X <= 1), X ~ Bin(8, 1/2)
    a = [True] * 1 + [False] * 7 + [True] * 5 + [False] * 10
    b = [False] * 1 + [True] * 7 + [True] * 5 + [False] * 10
    r = metrics.mcnemar_exact(a, b)
    assert (r["n10"], r["n01"]) == (1, 7)
    assert r["p_value"] == pytest.approx(2 * (1 + 8) / 256)  # 0.0703125
    assert metrics.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair
    assert metrics.mcnemar_exact([True] * 4, [False] * 4)["p_value"] == pytest.approx(2 / 16)


def test_bootstrap_is_seeded_and_covers_the_mean():
    sums = [float(i % 7) for i in range(100)]
    counts = [1.0 + (i % 3) for i in range(100)]
    a = metrics.bootstrap_mean(sums, counts, seed=3)
    assert a == metrics.bootstrap_mean(sums, counts, seed=3) and a != metrics.bootstrap_mean(sums, counts, seed=4)
    mean = sum(sums) / sum(counts)
    assert a[0] < mean < a[1]
    same = metrics.paired_bootstrap(sums, sums, counts)
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0 and not same["significant"]
    shifted = metrics.paired_bootstrap([s + 1 for s in sums], sums)
    assert shifted["diff"] == pytest.approx(1) and shifted["significant"]


def test_judge_phrases():
    assert metrics.is_refusal("I’m sorry, but I can’t help with that.")
    assert not metrics.is_refusal("I'm sorry for your loss. Here is how to cope.")
    assert metrics.refusal_rate(["I cannot do that", "Sure!"]) == 0.5


def test_judge_against_the_hand_labels():
    """122 completions of the bundled model (base and teacher, every split) labelled by hand as refusal or not
    (data/judge_labels.jsonl). The judge's precision and recall on them, as README reports them. The phrases
    added from these labels make the recall an in-sample figure."""
    import json
    from common import data_file
    rows = [json.loads(line) for line in data_file("judge_labels").read_text().splitlines()]
    assert len(rows) >= 100 and {r["model"] for r in rows} == {"base", "teacher"}
    tp = sum(r["refusal"] and metrics.is_refusal(r["completion"]) for r in rows)
    fp = sum(not r["refusal"] and metrics.is_refusal(r["completion"]) for r in rows)
    fn = sum(r["refusal"] and not metrics.is_refusal(r["completion"]) for r in rows)
    assert (tp, fp, fn) == (32, 1, 6)  # precision 0.97, recall 0.84
