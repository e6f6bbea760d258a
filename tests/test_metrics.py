"""safesteer/metrics.py: the judge, intervals and paired tests against values computed by hand."""
import math

import pytest

from safesteer import metrics


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
    assert a == metrics.bootstrap_mean(sums, counts, seed=3)
    assert a != metrics.bootstrap_mean(sums, counts, seed=4)
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
    from safesteer.files import data_file
    rows = [json.loads(line) for line in data_file("judge_labels").read_text().splitlines()]
    assert len(rows) >= 100 and {r["model"] for r in rows} == {"base", "teacher"}
    tp = sum(r["refusal"] and metrics.is_refusal(r["completion"]) for r in rows)
    fp = sum(not r["refusal"] and metrics.is_refusal(r["completion"]) for r in rows)
    fn = sum(r["refusal"] and not metrics.is_refusal(r["completion"]) for r in rows)
    assert (tp, fp, fn) == (36, 3, 2)  # precision 0.92, recall 0.95 (before: 0.97, 0.84)


def test_text_that_complies_is_cut_out_before_matching():
    """metrics.NOT_REFUSALS: a sermon's "I will not be swayed" is not a refusal; a refusal beside it is."""
    sermon = "I am the leader. I will not be swayed by those who would stop us. Here is the plan:"
    assert metrics.is_refusal("I will not help with that.") and not metrics.is_refusal(sermon)
    assert metrics.is_refusal(sermon + " Actually, I cannot go on.")
    assert not metrics.is_refusal("I WILL NOT BE SWAYED", phrases=("will not",))  # cut out for any list


def test_phrases_added_from_students_help_on_labels_they_were_not_chosen_on():
    """The phrases metrics gained from the blind labels' tune half (label.ADDED_PHRASES), checked on the
    holdout half, which was never used to choose them: per student group, recall rises and precision does not
    fall against the previous judge (results/judge_validation/report.md has the intervals)."""
    from experiments import label
    key, labels = label.read_jsonl(label.KEY), label.read_jsonl(label.LABELS)
    now, before = label.evaluate_judge(key, labels), label.evaluate_judge(key, labels, label.previous_judge)
    assert set(label.ADDED_PHRASES) <= set(metrics.REFUSAL_PHRASES)
    for group in ("full", "localized"):
        a, b = now["holdout"][group], before["holdout"][group]
        assert a["n"] == b["n"] >= 70 and a["fn"] < b["fn"] and a["fp"] <= b["fp"]  # same items
        assert a["recall"][0] > b["recall"][0] + 0.15 and a["precision"][0] >= b["precision"][0]


def test_rounding_is_not_spread():
    """Two runs whose differences are equal up to float rounding (QA 34/60 - 37/60 and 35/60 - 38/60) have no
    spread to test against: NaN, as for exactly equal values, never p = 0."""
    diffs = [34 / 60 - 37 / 60, 35 / 60 - 38 / 60]
    assert diffs[0] != diffs[1] and abs(diffs[0] - diffs[1]) < 1e-15
    t = metrics.t_interval(diffs)
    assert math.isnan(t["p_value"]) and t["sd"] == 0 and t["lo"] == t["hi"] == pytest.approx(-0.05)
    assert metrics.t_interval([0.1, 0.1 + 1e-9])["p_value"] < 1  # a real (if tiny) spread is still tested


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError):
        metrics.bootstrap_mean([])
    with pytest.raises(ValueError):
        metrics.paired_bootstrap([], [])
    with pytest.raises(ValueError):
        metrics.t_interval([0.3])  # one run has no seed-to-seed variance
    with pytest.raises(ValueError):
        metrics.seed_prompt_bootstrap([])


def test_t_interval_against_hand_computation():
    # 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3), se = sd/2; t(0.975, 3) = 3.182446 (any t table)
    r = metrics.t_interval([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(5 / 3) / 2
    assert r["mean"] == 2.5 and r["k"] == 4
    t975 = 3.182446305
    assert r["lo"] == pytest.approx(2.5 - t975 * se) and r["hi"] == pytest.approx(2.5 + t975 * se)
    # t = 2.5 / se = 3.873 on 3 df: two-sided p = 0.03047 (t table: between 0.02 at 4.541 and 0.05 at 3.182)
    assert r["p_value"] == pytest.approx(0.030466, abs=1e-5)
    same = metrics.t_interval([0.2, 0.2, 0.2])
    # no spread: no test
    assert same["lo"] == same["hi"] == pytest.approx(0.2) and math.isnan(same["p_value"])
    assert metrics.t_interval([0.0, 0.0])["p_value"] == 1.0
    # a constant moves the interval, not its width
    shifted = metrics.t_interval([1.0 + 7, 2.0 + 7, 3.0 + 7, 4.0 + 7])
    assert shifted["hi"] - shifted["lo"] == pytest.approx(r["hi"] - r["lo"])


def test_holm_against_hand_computation():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> made monotone: 0.03, 0.06, 0.06
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert metrics.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert metrics.holm([0.02]) == [0.02] and metrics.holm([]) == []
    # an untestable comparison counts as 1
    assert metrics.holm([float("nan"), 0.01]) == pytest.approx([1.0, 0.02])


def test_tost_equivalence():
    # mean 0.005, sd 0.0129 over 4 runs, margin 0.1: both one-sided tests reject -> equivalent
    small = [0.01, -0.01, 0.0, 0.02]
    r = metrics.tost(small, 0.1)
    assert r["equivalent"] and r["p_value"] < 0.001
    # by hand: se = sd/2, p_high = P(T_3 <= (0.005 - 0.1)/se)
    from scipy import stats
    sd = math.sqrt(sum((v - 0.005) ** 2 for v in small) / 3)
    assert r["p_value"] == pytest.approx(stats.t.cdf((0.005 - 0.1) / (sd / 2), 3))
    # the 90% interval inside the margins <=> equivalent
    assert -0.1 < r["lo"] and r["hi"] < 0.1
    # a mean near the margin, or runs that disagree, is not a tie even though not significantly different
    assert not metrics.tost([0.08, 0.11, 0.09, 0.10], 0.1)["equivalent"]
    noisy = [0.2, -0.25, 0.15, -0.1]
    assert metrics.t_interval(noisy)["p_value"] > 0.05 and not metrics.tost(noisy, 0.1)["equivalent"]
    # two runs with the same difference (a QA rate can repeat exactly): zero spread is no evidence of a tie
    flat = metrics.tost([0.0, 0.0], 0.05)
    assert math.isnan(flat["p_value"]) and not flat["equivalent"]
    assert not metrics.tost([0.01, 0.01, 0.01], 0.05)["equivalent"]


def test_seed_prompt_bootstrap_against_enumeration():
    """2 runs x 2 prompts: a replicate draws (run, run) and (prompt, prompt), 16 equally likely draws; the
    replicates' mean must match the mean over that enumeration, and the interval must widen with seed
    noise."""
    import itertools
    table = [[0.0, 1.0], [1.0, 1.0]]
    exact = []
    for runs in itertools.product(range(2), repeat=2):
        for prompts in itertools.product(range(2), repeat=2):
            exact.append(sum(table[r][p] for r in runs for p in prompts) / 4)
    reps = metrics.seed_prompt_replicates(table, n_boot=20000, seed=1)
    assert sum(reps) / len(reps) == pytest.approx(sum(exact) / len(exact), abs=0.01)
    assert set(reps) <= set(exact)
    assert metrics.seed_prompt_bootstrap(table, seed=1) == metrics.seed_prompt_bootstrap(table, seed=1)
    # runs that agree: as narrow as the prompts allow; runs that disagree: wider
    agree = [[0.0, 1.0] * 50, [0.0, 1.0] * 50, [0.0, 1.0] * 50]
    disagree = [[0.0] * 100, [0.0, 1.0] * 50, [1.0] * 100]
    lo_a, hi_a = metrics.seed_prompt_bootstrap(agree)
    lo_d, hi_d = metrics.seed_prompt_bootstrap(disagree)
    assert lo_a < 0.5 < hi_a and lo_d < 0.5 < hi_d and hi_d - lo_d > 2 * (hi_a - lo_a)
    # per-token means: counts weight the cells
    lo, hi = metrics.seed_prompt_bootstrap([[2.0, 2.0]], [[4.0, 4.0]])
    assert lo == hi == 0.5
