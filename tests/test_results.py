"""experiments/experiment.py and experiments/plot.py: seed groups, paired comparisons and plot points on
made-up
rows."""
import json

import pytest

from experiments import experiment, plot


def fake(name, harmful, kl=0.01, judge=experiment.JUDGE_ID):
    """A row judged by the current judge (judge=None: by an earlier phrase list, completions not kept)."""
    v = {"harmful": harmful, "harmless": "0000", "harmful_reform": harmful, "harmless_reform": "0001",
         "qa": "1100"}
    return {"name": name, "args": "", "verdicts": v, "kl_sums": [kl] * 4, "kl_tokens": [1] * 4,
            "refusal_harmful": harmful.count("1") / 4, "harmful_reform": harmful.count("1") / 4,
            "over_refusal": 0.0, "harmless_reform": 0.25, "kl_to_base": kl, "qa_accuracy": 0.5, "nll": 1.0,
            "by_style": {"past_tense": 0.5}, "over_refusal_risky": 0.0, **({"judge": judge} if judge else {})}


def test_groups_and_recipe_comparisons_by_hand():
    """The training run is the unit: per seed a - b, then a t interval over seeds (k - 1 df)."""
    rows = [fake("a@s0", "1100"), fake("a@s1", "1110"), fake("a@s2", "1111"),
            fake("b@s0", "0000", 0.02), fake("b@s1", "0001", 0.02), fake("b@s2", "0011", 0.02)]
    g = experiment.group(rows, "a")
    assert g["seeds"] == ["0", "1", "2"] and g["refusal_harmful"] == pytest.approx(0.75)
    assert g["refusal_harmful_spread"] == pytest.approx(0.5)
    # a's runs 0.5, 0.75, 1.0: mean 0.75, sd 0.25, t(0.975, 2) = 4.302653
    ci = g["ci"]["harmful"]
    assert (ci["lo"], ci["hi"]) == (pytest.approx(0.75 - 4.302653 * 0.25 / 3 ** 0.5),
                                    pytest.approx(0.75 + 4.302653 * 0.25 / 3 ** 0.5))
    c = experiment.compare_recipes(g, experiment.group(rows, "b"), "harmful")
    # per seed: 0.5 - 0 = 0.5, 0.75 - 0.25 = 0.5, 1.0 - 0.5 = 0.5:
    # no spread, so no test (NaN), a tie it is not
    assert c["per_seed"] == pytest.approx([0.5, 0.5, 0.5]) and c["k"] == 3 and c["mean"] == pytest.approx(0.5)
    assert c["p_value"] != c["p_value"] and not c["tost"]["equivalent"]
    kl = experiment.compare_recipes(g, experiment.group(rows, "b"), "kl")
    assert kl["mean"] == pytest.approx(-0.01) and kl["boot"] == (pytest.approx(-0.01), pytest.approx(-0.01))
    rows[4] = fake("b@s1", "0111", 0.02)  # per seed 0.5, 0.0, 0.5: mean 1/3, sd 0.2887
    c = experiment.compare_recipes(experiment.group(rows, "a"), experiment.group(rows, "b"), "harmful")
    from scipy import stats
    se = 0.28867513 / 3 ** 0.5
    assert c["p_value"] == pytest.approx(2 * stats.t.sf((1 / 3) / se, 2), rel=1e-6)
    assert experiment.compare_recipes(experiment.group(rows[:1], "a"), experiment.group(rows[3:4], "b"),
                                      "harmful") is None  # one run each: nothing to say about recipes
    md = experiment.to_markdown(rows, {"a": "b"})
    assert "| a | 0,1,2 | 75% [13, 100] |" in md  # the t interval clipped to a rate's range
    assert "| a vs b | refusal | 3 | +33.3 |" in md and "Exploratory comparisons" in md
    comps = experiment.comparison_rows(rows, {"a": "b"})
    assert len(comps) == 6 and all("holm" in x and "reading" in x for x in comps)
    # every run answers the same questions (QA 0.5 - 0.5 per seed): zero spread is no tie, whatever the
    # margin
    qa = next(x for x in comps if x["metric"] == "qa")
    assert qa["per_seed"] == [0.0, 0.0, 0.0] and qa["reading"] == "no spread over runs: untested"


def test_baselines_are_their_own_holm_family():
    """The ablations (full, random) and the baselines answer two questions: Holm's correction runs over each
    family's table alone, so adding baselines leaves the ablations' adjusted p-values as they were."""
    rows = []
    runs = (("1100", "1110", "0000"), ("1000", "1110", "0001"), ("1100", "1111", "0011"))
    for i, (h, f, s) in enumerate(runs):
        rows += [fake(f"demo@s{i}", h), fake(f"full@s{i}", f, 0.02), fake(f"sft_mix@s{i}", s, 0.03)]
    refs = {"full": "demo", "sft_mix": "demo", "other": "demo"}
    assert experiment.split_refs(refs) == ({"full": "demo"}, {"sft_mix": "demo"}, {"other": "demo"})
    alone = experiment.comparison_rows(rows, {"full": "demo"})
    families = experiment.split_refs(refs)
    ablations, baselines, _ = (experiment.comparison_rows(rows, part) for part in families)
    assert [c["holm"] for c in ablations] == [c["holm"] for c in alone]
    assert {c["a"] for c in baselines} == {"sft_mix"} and len(baselines) == len(alone)
    md = experiment.to_markdown(rows, refs)
    order = [md.index(s) for s in ("behind the verdict", "against the paper's baselines", "| sft_mix vs")]
    assert order == sorted(order)
    names = [g["name"] for g in experiment.seed_groups(rows)]
    assert names == ["demo", "full", "sft_mix"]  # the verdict's groups first, in their order


def test_refusals_judged_by_two_phrase_lists_are_never_compared():
    """A row judged by an earlier phrase list (no kept completions to judge again) pairs with no row judged
    by the current one on a judged set; KL and QA, which no phrase decides, still pair."""
    rows = [fake(f"a@s{i}", "1100") for i in range(3)]
    rows += [fake(f"b@s{i}", h, judge=None) for i, h in enumerate(("0000", "0001", "0011"))]
    ga, gb = experiment.group(rows, "a"), experiment.group(rows, "b")
    assert experiment.compare_recipes(ga, gb, "harmful") is None
    assert experiment.compare_recipes(ga, gb, "harmless_reform") is None
    assert experiment.compare_recipes(ga, gb, "qa")["k"] == 3 and experiment.compare_recipes(ga, gb, "kl")
    rows[3:] = [dict(r, judge=experiment.JUDGE_ID) for r in rows[3:]]
    assert experiment.compare_recipes(experiment.group(rows, "a"), experiment.group(rows, "b"), "harmful")
    older = [fake("old", "1111", judge=None), fake("c@s0", "1"), fake("c@s1", "0", judge=None)]
    md = experiment.to_markdown(rows[:3] + older, {})
    assert "| old ‡ |" in md and "| a@s0 |" in md and "| a | 0,1,2 |" in md and "| c ‡ | 0,1 |" in md
    groups, base = experiment.seed_groups(rows[:3] + older), fake("reference:base", "0000")
    assert [g["name"] for g in groups if g["judged_now"]] == ["a"]
    lines = experiment.targets_table(groups, base)  # c's rates are not held against base's current ones
    assert any(x.startswith("| a |") for x in lines) and not any(x.startswith("| c") for x in lines)


def test_completions_are_kept_and_judged_again(tmp_path, monkeypatch):
    """A row's completions go to results/completions/; --rejudge re-reads them with the current judge."""
    monkeypatch.setattr(experiment, "COMPLETIONS", tmp_path / "completions")
    files = experiment.SPLITS["test"]
    rec = lambda s, text, **k: {"model": "student", "set": files[s], "completion": text, "category": "x",
                                "style": "past_tense", **k}
    qa = {"model": "student", "set": "general_qa", "completion": "Paris", "correct": True}
    samples = [rec("harmful", "I cannot help with that."), rec("harmful", "Sure, here it is."),
               rec("harmless", "Here is how.", category="risky_sounding"), rec("harmful_reform", "I won't."),
               rec("harmless_reform", "Fine."), qa, rec("harmful", "I refuse.", model="other")]
    out = tmp_path / "run"
    out.mkdir()
    (out / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (out / "eval.json").write_text(json.dumps({"models": {"student": {
        "kl_to_base": {"value": 0.01}, "nll": {"value": 1.0}, "kl_sums": [0.1], "kl_tokens": [10]}}}))
    r = experiment.row("x@s0", ["--lr", "1"], out, "student")
    assert r["verdicts"]["harmful"] == "10" and r["refusal_harmful"] == 0.5 and r["verdicts"]["qa"] == "1"
    kept = experiment.kept_completions("x@s0")
    assert len(kept) == 6 and all(k["model"] == "student" for k in kept)  # the other model's are not kept
    monkeypatch.setattr(experiment, "is_refusal", lambda text: "sure" in text.lower())  # another judge
    again, n = experiment.rejudge([r, fake("old@s0", "1111")])
    assert n == 1 and again[0]["verdicts"]["harmful"] == "01" and again[1]["verdicts"]["harmful"] == "1111"
    assert again[0]["kl_to_base"] == 0.01  # KL is not the judge's


def test_plot_points_carry_intervals():
    older = [fake("a@s1", "1111", judge=None), {"name": "old", "kl_to_base": 0.1}]  # neither is drawn
    pts = plot.points([fake("a@s0", "1100")] + older)
    assert len(pts) == 1 and pts[0]["group"] == "a" and pts[0]["seed"] == "0"
    r, lo, hi = pts[0]["refusal"]
    assert r == 0.5 and lo < r < hi


def test_val_split_evaluates_on_validation_files_and_groups_without_a_set(tmp_path, monkeypatch):
    """--split val: validation prompts, rows in experiments_val.*; a set a row lacks (rows evaluated before
    harmless_val_reform existed) is None in rows and groups, and '–' in the table."""
    f = lambda name: str(experiment.data_file(name))
    assert experiment.eval_args("test") == ["--harmful", f("harmful_test"), "--harmless", f("harmless_test"),
                                            "--harmful-reform", f("harmful_reform_test"), "--harmless-reform",
                                            f("harmless_reform_test")]
    assert experiment.eval_args("val") == ["--harmful", f("harmful_val"), "--harmless", f("harmless_val"),
                                           "--harmful-reform", f("harmful_val_reform"), "--harmless-reform",
                                           f("harmless_val_reform")]
    assert experiment.data_file("harmful_val_reform").is_file()
    rows = [fake("a@s0", "1100"), fake("a@s1", "1110")]
    for r in rows:
        r["harmless_reform"], r["verdicts"]["harmless_reform"] = None, ""
    g = experiment.group(rows, "a")
    assert g["harmless_reform"] is None and g["refusal_harmful"] == pytest.approx(0.625)
    monkeypatch.setattr(experiment, "HERE", tmp_path)
    experiment.save(rows, {}, "val")
    md = (tmp_path / "experiments_val.md").read_text()
    assert md.startswith("# Experiments on the val split")
    assert "| a | 0,1 | 62% [0, 100] | 62% [0, 100] | 0% [0, 0] | – | 0.0100 [0.0100, 0.0100] |" in md
    assert not (tmp_path / "experiments.md").exists()


def test_a_student_with_the_same_arguments_is_reused(tmp_path):
    out = tmp_path / "x@s0"
    (out / "student").mkdir(parents=True)
    (out / "experiment_args.json").write_text('["--lr", "1e-4"]')
    assert not experiment.same_student(out, ["--lr", "1e-4"])  # no model in it yet
    (out / "student" / "config.json").write_text("{}")
    assert experiment.same_student(out, ["--lr", "1e-4"])
    assert not experiment.same_student(out, ["--lr", "2e-4"])
    (out / "experiment_args.json").write_text('["--method", "dpo-mix", "--lr", "8e-5", "--beta", "0.1"]')
    # the Makefile's order of the same arguments
    assert experiment.same_student(out, ["--method", "dpo-mix", "--beta", "0.1", "--lr", "8e-5"])
    assert not experiment.same_student(out, ["--method", "dpo-mix", "--beta", "0.2", "--lr", "8e-5"])
    assert not experiment.same_student(out, ["--method", "dpo", "--lr", "8e-5", "--beta", "0.1"])


def test_targets_against_base_by_hand():
    """Targets: styles vs 0.5x plain and 5x base, over-refusal <= base + 5, QA >= base - 2, spread; met only
    when the t interval over runs of (value - bound) clears the bound."""
    rows = [fake("a@s0", "1100"), fake("a@s1", "1110")]  # plain 50%, 75%; past_tense 50% in both
    base = dict(fake("reference:base", "0000"), by_style={"past_tense": 0.05}, over_refusal=0.0,
                harmless_reform=0.25, qa_accuracy=0.51)
    t = experiment.targets(experiment.group(rows, "a"), base)
    # per run: 0.5 - max(0.25, 0.25) = 0.25 and 0.5 - max(0.375, 0.25) = 0.125: mean 0.1875, sd 0.0884, k = 2
    half = 12.706205 * 0.08838835 / 2 ** 0.5
    st = t["past_tense"]
    assert st["bound"] == pytest.approx(0.3125) and st["lo"] == pytest.approx(0.1875 - half)
    assert st["met"] is False  # 0.5 >= 0.3125 on average, but two runs cannot show it
    assert t["over_refusal"]["met"] is True  # 0 - 0.05 in both runs: no spread, the interval is the point
    assert t["qa_accuracy"]["value"] == 0.5 and t["qa_accuracy"]["met"] is True  # 0.5 - 0.49 in both runs
    assert t["spread"] == {"value": pytest.approx(0.25), "bound": 0.10, "met": False, "lo": None, "hi": None}
    one = experiment.targets(experiment.group(rows[:1], "a"), base)
    assert one["past_tense"]["met"] is None and "spread" not in one  # one run: no interval, no verdict
    md = experiment.to_markdown(rows + [base], {})
    assert "| a | 0,1 | past_tense 50% [" in md and "✗ (≥ 31%)" in md and "| 0% [-5, -5] ✓ |" in md


def test_frontier_points_and_matched_interpolation_by_hand():
    """Only --loss/--lr may differ from the demo's recipe; the other loss is read off linearly at the same
    x."""
    def point(name, args, refusal, over, kl):
        return dict(fake(name, "1000", kl), args=args, refusal_harmful=refusal, over_refusal=over,
                    kl_to_base=kl)
    rows = [point("demo@s0", "--loss collapsed --lr 8e-5 --anchor a.jsonl", 0.30, 0.04, 0.04),
            point("c16@s0", "--lr 1.6e-4 --anchor a.jsonl", 0.50, 0.10, 0.06),  # --loss defaults to collapsed
            # order does not matter
            point("full@s0", "--anchor a.jsonl --loss full --lr 8e-5", 0.35, 0.09, 0.03),
            point("f4@s0", "--loss full --lr 4e-5 --anchor a.jsonl", 0.15, 0.03, 0.02),
            point("other@s0", "--loss full --lr 8e-5 --anchor b.jsonl", 0.90, 0.05, 0.05)]  # another recipe
    base = dict(fake("reference:base", "0000"), refusal_harmful=0.10)
    groups = [experiment.group(rows, n) for n in ("demo", "c16", "full", "f4", "other")]
    pts = {p["name"]: p for p in experiment.frontier(groups, base)}
    assert list(pts) == ["demo", "c16", "f4", "full"]  # sorted by loss, then lr
    assert pts["demo"]["gain"] == pytest.approx((0.30 - 0.10) / 4)  # points per 0.01 KL, as a fraction
    # full's curve through (0.03, 0.15) and (0.09, 0.35): at over-refusal 0.04, 0.15 + 0.20 / 6
    assert pts["demo"]["at_over_refusal"] == {"full": pytest.approx(0.15 + 0.20 / 6)}
    assert pts["c16"]["at_over_refusal"] == {"full": None}  # 0.10 lies beyond full's range
    # collapsed's curve through (0.04, 0.30) and (0.06, 0.50) by KL: full's KLs 0.02, 0.03 lie outside it
    assert pts["full"]["at_kl_to_base"] == {"collapsed": None}
    assert pts["full"]["at_over_refusal"] == {"collapsed": pytest.approx(0.30 + 0.20 * 5 / 6)}
    # gains: demo (0.30 - 0.10) / 4 = 0.05, c16 (0.50 - 0.10) / 6; at over-refusal 0.09, 5/6 of the way
    gain = 0.05 + (0.4 / 6 - 0.05) * 5 / 6
    assert pts["full"]["gain_at_over_refusal"] == {"collapsed": pytest.approx(gain)}
    assert experiment.interpolate([(0.1, 0.5)], 0.1) == 0.5
    assert experiment.interpolate([(0.1, 0.5)], 0.2) is None
    md = experiment.to_markdown(rows + [base], {})
    # full's gains 0.025 (f4) and 0.25 / 3 (full): at over-refusal 0.04, 0.025 + (0.25 / 3 - 0.025) / 6
    demo_row = ("| collapsed | 8e-05 | demo | 0 | 30% | 25% | 4% | 0.0400 | 5.0 | full 18% (gain 3.5) "
                "| full – |")
    assert demo_row in md
