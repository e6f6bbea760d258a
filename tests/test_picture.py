"""experiments/picture.py: shift and overlap on synthetic Gaussian clouds of known shift, the plane fitted on
π0
alone, the paired bootstrap, and the script end to end on a tiny random model."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from safesteer.cli import run_cli
from safesteer.files import save_tensors, write_json

from experiments import picture


def gaussian_pdf(z, mean=0.0, sd=1.0):
    return np.exp(-0.5 * ((z - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def clouds(shift, n=4000, seed=0):
    """π0 ~ N(0, diag(1, 0.25)); the other cloud the same, moved `shift` of π0's σ along the first axis."""
    rng = np.random.default_rng(seed)
    sd = np.array([1.0, 0.5])
    return rng.normal(size=(n, 2)) * sd, rng.normal(size=(n, 2)) * sd + np.array([shift, 0.0])


# ----------------------------------------------------------------------------- the known answers

def test_gaussian_overlap_matches_the_integral_of_the_smaller_density():
    z = np.linspace(-12, 14, 200_001)
    for delta in (0.0, 0.5, 2.0, 4.0):
        brute = np.trapezoid(np.minimum(gaussian_pdf(z), gaussian_pdf(z, delta)), z)
        assert picture.gaussian_overlap(delta) == pytest.approx(brute, abs=1e-8)
    assert picture.gaussian_overlap(2.0) == pytest.approx(0.3173, abs=1e-4)


@pytest.mark.parametrize("shift", [0.0, 2.0])
def test_shift_and_overlap_of_gaussian_clouds(shift):
    ref, other = clouds(shift)
    s = picture.mean_shift(ref, other)
    assert s[0] == pytest.approx(shift, abs=0.06) and s[1] == pytest.approx(0.0, abs=0.06)
    ovl = [picture.overlap_coefficient(ref[:, k], other[:, k]) for k in range(2)]
    assert ovl[0] == pytest.approx(picture.gaussian_overlap(shift), abs=0.03)  # 1 or 2Φ(−1) = 0.317
    assert ovl[1] == pytest.approx(1.0, abs=0.03)


def test_overlap_is_one_for_the_same_cloud_and_zero_for_disjoint_ones():
    ref, _ = clouds(0.0, n=200)
    assert picture.overlap_coefficient(ref[:, 0], ref[:, 0]) == pytest.approx(1.0, abs=1e-6)
    assert picture.overlap_coefficient(ref[:, 0], ref[:, 0] + 50) == pytest.approx(0.0, abs=1e-6)
    assert picture.overlap_coefficient(np.zeros(5), np.zeros(5)) == 1.0  # collapsed clouds: no bandwidth


def test_mean_shift_against_brute_force():
    rng = np.random.default_rng(1)
    ref, other = rng.normal(size=(7, 2)), rng.normal(size=(7, 2)) + 3
    for k in range(2):
        r, o = [float(v) for v in ref[:, k]], [float(v) for v in other[:, k]]
        mr = sum(r) / 7
        sd = math.sqrt(sum((v - mr) ** 2 for v in r) / 6)
        assert picture.mean_shift(ref, other)[k] == pytest.approx((sum(o) / 7 - mr) / sd, rel=1e-12)


def test_kernel_density_against_brute_force_and_bootstrap_weights():
    """A weighted density equals the density of the resample with repeats; it integrates to 1."""
    rng = np.random.default_rng(2)
    x, grid, h = rng.normal(size=6), np.linspace(-4, 4, 9), 0.7
    norm = 6 * h * math.sqrt(2 * math.pi)
    brute = [sum(math.exp(-0.5 * ((g - xi) / h) ** 2) for xi in x) / norm for g in grid]
    assert picture.kernel_density(x, grid, h) == pytest.approx(brute, rel=1e-12)
    idx = np.array([0, 0, 3, 5, 5, 5])
    counts = np.bincount(idx, minlength=6)[None].astype(float)  # [1, n]
    resampled = picture.kernel_density(x[idx], grid, h)
    assert picture.kernel_density(x, grid, h, counts)[0] == pytest.approx(resampled)
    wide = np.linspace(-10, 10, 4001)
    assert np.trapezoid(picture.kernel_density(x, wide, h), wide) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- the plane

def test_plane_is_fitted_on_the_reference_alone():
    """π0 varies along e0 (sd 3) and e1 (sd 1) in 5-D; a model moved 40 along e2 would be PC1 of the pooled
    clouds, but π0's plane keeps e0, e1, shows none of that move, and says so (in_plane ≈ 0)."""
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(500, 5)) * np.array([3.0, 1.0, 0.1, 0.1, 0.1])
    other = ref + np.array([0.0, 0.0, 40.0, 0.0, 0.0])
    plane = picture.fit_plane(ref)
    assert np.abs(plane.axes @ np.eye(5)[:2].T) == pytest.approx(np.eye(2), abs=0.01)
    cov = np.cov(ref, rowvar=False)  # brute force: the top eigenvalues of π0's covariance
    assert plane.sd ** 2 == pytest.approx(np.linalg.eigvalsh(cov)[::-1][:2], rel=1e-10)
    assert plane.explained.sum() == pytest.approx(np.linalg.eigvalsh(cov)[::-1][:2].sum() / np.trace(cov))
    z = picture.project(plane, ref)
    assert z.mean(0) == pytest.approx([0, 0], abs=1e-10) and z.std(0, ddof=1) == pytest.approx(plane.sd)
    share, full = picture.in_plane(plane, other)
    assert share == pytest.approx(0.0, abs=1e-3) and full == pytest.approx(40 / math.sqrt(np.trace(cov)))
    share, _ = picture.in_plane(plane, ref + np.array([2.0, 0, 0, 0, 0]))
    assert share == pytest.approx(1.0, abs=1e-4)  # the fitted axes are e0, e1 up to sampling noise
    assert math.isnan(picture.in_plane(plane, ref)[0])  # π0 against itself: no move to show
    assert np.allclose(picture.fit_plane(ref).axes, plane.axes)  # the sign convention is deterministic


def test_teacher_axes_follow_the_teachers_move():
    """--axes teacher: axis 1 is πt's mean move (all of it in the plane), axis 2 π0's top direction orthogonal
    to it; a student moved half as far along the same direction shows half the teacher's shift on axis 1."""
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(400, 5)) * np.array([3.0, 1.0, 0.1, 0.1, 0.1])
    move = np.array([0.0, 0.5, 2.0, 0.0, 0.0])
    plane = picture.fit_plane(ref, ref + move)
    assert plane.axes @ plane.axes.T == pytest.approx(np.eye(2), abs=1e-12)
    assert plane.axes[0] == pytest.approx(move / np.linalg.norm(move))
    assert abs(plane.axes[1, 0]) == pytest.approx(1.0, abs=0.01)  # π0's main direction, e0
    assert picture.in_plane(plane, ref + move)[0] == pytest.approx(1.0)
    z0, zt, zs = (picture.project(plane, x) for x in (ref, ref + move, ref + move / 2))
    assert picture.mean_shift(z0, zs)[0] == pytest.approx(picture.mean_shift(z0, zt)[0] / 2)
    assert picture.mean_shift(z0, zt)[1] == pytest.approx(0.0, abs=1e-10)
    panel = picture.picture_numbers({"base": ref, "teacher": ref + move, "half": ref + move / 2}, n_boot=50,
                                    axes="teacher")
    assert panel["models"]["teacher"]["in_plane"] == pytest.approx(1.0)
    assert panel["models"]["half"]["shift"][0] == pytest.approx(panel["models"]["teacher"]["shift"][0] / 2)


# ----------------------------------------------------------------------------- the bootstrap

def test_paired_bootstrap_intervals():
    ref, other = clouds(2.0, n=300, seed=4)
    res = picture.compare(ref, other, n_boot=400, seed=0)
    (lo, hi), (lo2, hi2) = res["shift_ci"][0], res["overlap_ci"][0]
    assert lo < 2.0 < hi and hi - lo < 0.6 and lo < res["shift"][0] < hi
    assert lo2 < picture.gaussian_overlap(2.0) + 0.04 < hi2 + 0.04 and lo2 < res["overlap"][0] < hi2
    assert picture.compare(ref, other, n_boot=400, seed=0) == res  # seeded
    same = picture.compare(ref, ref.copy(), n_boot=200)  # paired: the same prompts give exactly no difference
    assert same["shift_ci"] == [[0.0, 0.0], [0.0, 0.0]]
    assert np.allclose(same["overlap_ci"], 1.0, atol=1e-6)


def test_bootstrap_overlap_matches_recomputing_each_resample():
    """The counts trick (a resample = the same densities with repeats) against the plain loop, bandwidth
    held."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=20), rng.normal(size=20) + 1
    idx = rng.integers(0, 20, size=(3, 20))
    counts = np.stack([np.bincount(i, minlength=20) for i in idx]).astype(float)
    fast = picture.overlap_coefficient(a, b, counts)
    ha, hb = picture.scott_bandwidth(a), picture.scott_bandwidth(b)
    pad = 5 * max(ha, hb)
    grid = np.linspace(min(a.min(), b.min()) - pad, max(a.max(), b.max()) + pad, picture.GRID)
    for j, i in enumerate(idx):
        smaller = np.minimum(picture.kernel_density(a[i], grid, ha), picture.kernel_density(b[i], grid, hb))
        slow = np.trapezoid(smaller, grid)
        assert fast[j] == pytest.approx(slow, rel=1e-10)


# ----------------------------------------------------------------------------- the script

@pytest.fixture
def run_dir(tmp_path, model_dir):
    out = tmp_path / "run"
    torch.manual_seed(0)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    save_tensors(out / "direction.safetensors", {"direction": torch.randn(hidden) * 4})
    write_json(out / "direction.json", {"layer": 1, "coefficient": 1.0, "hidden_size": hidden,
                                               "model": str(model_dir)})
    return out


def prompt_files(tmp_path, n=6):
    for name in ("harmless", "harmful"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": f"{name} question {i}?"}) + "\n"
                                                        for i in range(n)))
    return ["--harmless", str(tmp_path / "harmless.jsonl"), "--harmful", str(tmp_path / "harmful.jsonl")]


def test_script_end_to_end(tmp_path, model_dir, run_dir, capsys):
    """π0, πt and a student (π0's weights nudged) on a tiny model: the PNG and the JSON, the teacher moved."""
    from safetensors.torch import load_file, save_file
    student = tmp_path / "student"
    shutil.copytree(model_dir, student)
    weights = load_file(student / "model.safetensors")
    save_file({k: v + 0.01 if v.dim() == 2 else v for k, v in weights.items()}, student / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "fig" / "picture.png"
    picture.main(["--run", str(run_dir), "--models", f"student={student}", "--out", str(out),
                  "--n-boot", "50", "--device", "cpu", *prompt_files(tmp_path)])
    assert out.stat().st_size > 10_000
    rec = json.loads(out.with_suffix(".json").read_text())
    for s in ("harmless", "harmful"):
        panel = rec["panels"][s]
        assert panel["n"] == 6 and set(panel["models"]) == {"base", "teacher", "student"}
        assert len(panel["models"]["student"]["points"]) == 6
        teacher = panel["models"]["teacher"]
        assert teacher["shift_full"] > 0 and len(teacher["shift_ci"]) == 2 and 0 <= teacher["overlap"][0] <= 1
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out.with_suffix(".json")) in printed


@pytest.mark.parametrize("case, fragment", [
    ("no direction", "direction.safetensors: file not found"),
    ("missing student", "model directory not found"),
    ("not a model", "not a model directory"),
    ("bad models item", "--models takes NAME=DIR"),
    ("reserved name", "is taken"),
])
def test_bad_input_is_one_line(tmp_path, run_dir, case, fragment, capsys):
    (tmp_path / "empty").mkdir()
    argv = {"no direction": ["--run", str(tmp_path / "empty")],
            "missing student": ["--run", str(run_dir), "--models", f"s={tmp_path / 'nope'}"],
            "not a model": ["--run", str(run_dir), "--models", f"s={tmp_path / 'empty'}"],
            "bad models item": ["--run", str(run_dir), "--models", "just_a_path"],
            "reserved name": ["--run", str(run_dir), "--models", f"teacher={tmp_path / 'empty'}"]}[case]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: picture.main(argv + prompt_files(tmp_path)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1
