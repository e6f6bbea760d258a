"""The paper's picture: where π0, the steered teacher πt and each student πs sit in π0's capability space.

The paper's claim, drawn: steering moves πt far from π0, while a student distilled on S only stays on π0,
its cloud of prompts overlapping π0's almost entirely along both axes. Two panels (harmless prompts, harmful
prompts), one point per prompt and model, the axes fitted on π0; above and right of each panel, the per-axis
densities that the overlap numbers integrate; under it, the numbers.

Representation. For model m and prompt p, x_m(p) ∈ R^d is the final hidden state (after the final norm) at
the last prompt token, the one that predicts the first token of the answer:
  - it is what the model does next: the unembedding maps it linearly to the next-token logits, so two models
    close here predict alike (the per-prompt, drawable version of Stage 4's KL to base); 49k-wide
    log-probability features would carry the same information, dominated by the vocabulary's tail;
  - every prompt ends with the same post-instruction tokens, so the differences between points are the
    prompt's content and the model, not the position; and it is where a refusal starts.
The plane is PCA of π0's cloud alone: μ0 = mean_p x_0(p), u1, u2 = the top two eigenvectors of π0's
covariance C0, z_m(p) = U (x_m(p) − μ0) with U = [u1; u2]. Fitted on π0 only, the axes are π0's own main
directions of variation across prompts and do not depend on which other models are drawn (fitted on all
clouds, πt's shift would become an axis). A model can move orthogonally to the plane, where the picture
cannot show it; `in_plane` says how much of each model's move the picture shows. On the bundled model πt's
move is almost all off π0's top two directions (in_plane 2–4%). `--axes teacher` then draws axis 1 along
πt's move, u1 = unit(mean_p x_t(p) − μ0), and axis 2 along π0's top principal direction orthogonal to u1:
the picture of how far each student follows πt (still independent of which students are drawn).

Numbers, for each model m against π0, per axis k (σ_k = π0's standard deviation along axis k):
    shift_k    = (mean_p z_m,k(p) − mean_p z_0,k(p)) / σ_k      0: same centre; 2: two of π0's spreads away
    overlap_k  = ∫ min(f_0,k(z), f_m,k(z)) dz                    1: same density; 0: disjoint
                 f = Gaussian kernel density of the cloud along axis k, Scott's bandwidth h = 1.06 s n^(−1/5).
                 Equal-variance Gaussians δσ apart overlap by 2Φ(−δ/2) (δ = 2: 0.317). Smoothing biases the
                 estimate toward 1 when the clouds differ (n = 100, δ = 2: ~0.35): compare models with each
                 other.
    in_plane   = |U Δμ|² / |Δμ|², Δμ = mean_p x_m(p) − μ0 ∈ R^d  the share of the mean move the plane shows
    shift_full = |Δμ| / sqrt(tr C0)                              the whole move, in π0's total spread
Intervals: percentile bootstrap over prompts, paired (each resample draws the same prompts for π0 and for m).
The plane and the bandwidths stay fixed, so an interval is for the shift and the overlap, not for the choice
of axes.

Reads   RUN/direction.safetensors and direction.json (πt = π0 + c·r), the students, the prompt files
Writes  OUT (the PNG, default RUN/picture.png) and OUT with .json (every number above and every point)

Usage:
    python -m experiments.picture --run runs/demo --models student=runs/demo/student full=runs/demo/full \\
        --out results/picture.png
    python -m experiments.picture --run runs/demo --n-prompts 32 --out /tmp/picture.png     # π0 and πt only
    python -m experiments.picture --run runs/demo --axes teacher --out /tmp/picture_teacher_axes.png
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
from safesteer.chat import encode_chats
from safesteer.cli import (Parser, add_runtime_args, fraction, pick_device, positive_int, run_cli,
                           seed_everything)
from safesteer.errors import UserError
from safesteer.files import data_file, load_json, read_prompts, run_info, truncate_prompts, write_json
from safesteer.models import BUNDLED_MODEL, load_model
from safesteer.port.specs import check_model_spec
from safesteer.teacher import load_teacher

SETS = ("harmless", "harmful")
MIN_PROMPTS = 4    # two axes and a spread along each need a few points more than two
GRID = 512         # points of the grid the per-axis densities are integrated on (trapezoid rule)
RESERVED = ("base", "teacher")  # π0 and πt are always drawn under these names
AXES = {"pca": ("PC1", "PC2"), "teacher": ("πt's move", "PC1 ⊥")}  # --axes, with short names for the table


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--run", default="runs/demo", help="run directory with Stage 1's direction (builds πt)")
    p.add_argument("--models", nargs="*", default=[], metavar="NAME=DIR",
                   help="student directories to draw beside π0 and πt, e.g. "
                        "localized=runs/exp/demo@s3/student")
    p.add_argument("--model", help="π0 (default: direction.json's model, else the bundled smollm2-135m)")
    p.add_argument("--harmless", default=str(data_file("harmless_test")), help="prompts of the left panel")
    p.add_argument("--harmful", default=str(data_file("harmful_test")), help="prompts of the right panel")
    p.add_argument("--n-prompts", type=positive_int, default=100, help="prompts per set (seeded subset)")
    p.add_argument("--out", help="the PNG; the numbers go beside it as .json (default: RUN/picture.png)")
    p.add_argument("--axes", default="pca", choices=list(AXES),
                   help="pca: π0's top two principal directions; teacher: πt's mean move, then π0's top "
                        "direction orthogonal to it (shows how far each student follows πt)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples of the prompts")
    p.add_argument("--level", type=fraction, default=0.95, help="coverage of the bootstrap intervals")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    add_runtime_args(p)  # --seed draws the prompt subset and the bootstrap
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- representation

@torch.no_grad()
def last_token_states(model, tok, prompts: list[str], batch_size: int = 16, bar=None) -> np.ndarray:
    """x(p): the final hidden state at the last prompt token, for each prompt: [n, d] float64.

    Run it inside `teacher.steer()` for πt. Position ids count real tokens only, so a left-padded row sees
    what it would see alone."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_chats(tok, prompts[i:i + batch_size], device=device)  # [b, s], left-padded
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                       logits_to_keep=1, output_hidden_states=True).hidden_states
        out.append(hidden[-1][:, -1].double().cpu().numpy())  # [b, d]: the input of the unembedding
        if bar is not None:
            bar.update(ids.shape[0])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- the plane, fitted on π0

class Plane(NamedTuple):
    mean: np.ndarray       # [d]    μ0
    axes: np.ndarray       # [2, d] u1, u2 (unit rows)
    sd: np.ndarray         # [2]    σ_k: π0's standard deviation along each axis
    explained: np.ndarray  # [2]    the share of π0's total variance along each axis
    total_sd: float        # sqrt(tr C0): π0's whole spread


def principal_axes(centred: np.ndarray, k: int) -> np.ndarray:
    """The top k principal directions of a centred cloud [n, d] -> [k, d], each signed so that its largest
    loading is positive: the same data always gives the same picture."""
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # rows of vt: principal directions, largest first
    return vt[:k] * np.sign(vt[:k, np.abs(vt[:k]).argmax(1)].diagonal())[:, None]


def fit_plane(ref: np.ndarray, toward: np.ndarray | None = None) -> Plane:
    """PCA of the reference cloud ref [n, d] alone (the default picture).

    toward [n, d] (--axes teacher): axis 1 is instead the direction of that cloud's mean move,
    unit(mean(toward) − μ0), and axis 2 π0's top principal direction orthogonal to it; the plane then shows
    all of πt's move.

    >>> fit_plane(np.array([[0., 0], [2, 0], [0, 1], [2, 1]])).sd.round(3)   # x varies most, then y
    array([1.155, 0.577])
    """
    mean = ref.mean(0)
    centred = ref - mean  # [n, d]
    if toward is None:
        axes = principal_axes(centred, 2)
    else:
        move = toward.mean(0) - mean
        if not np.linalg.norm(move) > 0:
            raise UserError("--axes teacher: πt has the same mean as π0, no move to draw; use --axes pca")
        u1 = move / np.linalg.norm(move)
        axes = np.vstack([u1, principal_axes(centred - np.outer(centred @ u1, u1), 1)])  # [2, d]
    sd = (centred @ axes.T).std(0, ddof=1)  # [2]
    total_var = float((centred ** 2).sum()) / (len(ref) - 1)  # tr C0
    return Plane(mean, axes, sd, sd ** 2 / total_var, math.sqrt(total_var))


def project(plane: Plane, x: np.ndarray) -> np.ndarray:
    """z = U (x − μ0): [n, d] -> [n, 2]."""
    return (x - plane.mean) @ plane.axes.T


def in_plane(plane: Plane, x: np.ndarray) -> tuple[float, float]:
    """(in_plane, shift_full) of cloud x [n, d]: the share |U Δμ|² / |Δμ|² of its mean move Δμ = mean(x) − μ0
    that the plane shows, and |Δμ| in units of π0's whole spread sqrt(tr C0). in_plane is NaN when nothing
    moved."""
    move = x.mean(0) - plane.mean  # [d]
    size = float(move @ move)
    shown = float(np.sum((plane.axes @ move) ** 2))
    return (shown / size if size > 0 else math.nan), math.sqrt(size) / plane.total_sd


# ----------------------------------------------------------------------------- shift and overlap

def mean_shift(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(mean(other) − mean(ref)) / sd(ref) along each coordinate: [..., n, k] -> [..., k]. Works on a stack of
    bootstrap resamples [B, n, k] as on one cloud.

    >>> mean_shift(np.array([[0.], [2]]), np.array([[3.], [5]]))   # sd of (0, 2) is sqrt(2)
    array([2.12132034])
    """
    return (other.mean(-2) - ref.mean(-2)) / ref.std(-2, ddof=1)


def scott_bandwidth(x: np.ndarray) -> float:
    """Scott's rule for a Gaussian kernel in 1-D: h = 1.06 s n^(−1/5), the best bandwidth for Gaussian x."""
    return 1.06 * float(np.std(x, ddof=1)) * len(x) ** -0.2


def kernel_density(x: np.ndarray, grid: np.ndarray, h: float, counts: np.ndarray | None = None) -> np.ndarray:
    """Gaussian kernel density of the points x [n] at grid [G]: f(z) = Σ_i c_i φ((z − x_i)/h) / (h Σ_i c_i).

    counts [B, n] weighs each point (a bootstrap resample is the same density with point i counted c_i times)
    and gives [B, G]; without it every point counts once and the result is [G]."""
    kernel = np.exp(-0.5 * ((grid[None, :] - x[:, None]) / h) ** 2) / (h * math.sqrt(2 * math.pi))  # [n, G]
    if counts is None:
        return kernel.mean(0)
    return counts @ kernel / counts.sum(-1, keepdims=True)


def overlap_coefficient(a: np.ndarray, b: np.ndarray, counts: np.ndarray | None = None,
                        grid_size: int = GRID):
    """OVL = ∫ min(f_a, f_b) dz of the kernel densities of a [n] and b [m] (1: identical, 0: disjoint).

    Each density keeps the bandwidth of its whole sample; counts [B, n] (paired: a and b hold the same
    prompts, n = m) gives the overlap of each bootstrap resample, [B]. Returns a float without counts."""
    ha, hb = scott_bandwidth(a), scott_bandwidth(b)
    if max(ha, hb) == 0:  # two single points
        return float(np.all(a[0] == b[0]))
    ha, hb = max(ha, 1e-3 * hb), max(hb, 1e-3 * ha)  # a cloud collapsed to a point: a narrow bump
    pad = 5 * max(ha, hb)  # the kernels' tails beyond 5h hold < 1e-6 of the mass
    grid = np.linspace(min(a.min(), b.min()) - pad, max(a.max(), b.max()) + pad, grid_size)
    both = np.minimum(kernel_density(a, grid, ha, counts), kernel_density(b, grid, hb, counts))
    return np.trapezoid(both, grid, axis=-1) if counts is not None else float(np.trapezoid(both, grid))


def gaussian_overlap(delta: float) -> float:
    """The overlap coefficient of two equal-variance Gaussians whose means are delta standard deviations
    apart: 2Φ(−|δ|/2). gaussian_overlap(2) = 0.3173."""
    return 1 + math.erf(-abs(delta) / 2 / math.sqrt(2))  # 2Φ(x) = 1 + erf(x/√2)


def percentile_interval(values: np.ndarray, level: float) -> np.ndarray:
    """[lo, hi] percentile interval along the first axis: [B, ...] -> [..., 2]."""
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return np.stack([lo, hi], axis=-1)


def compare(ref: np.ndarray, other: np.ndarray, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> dict:
    """Shift and overlap of `other` against `ref`, both [n, 2] in the plane, the same prompts row for row,
    with paired bootstrap intervals over prompts."""
    n = len(ref)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [B, n] prompt indices, shared
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)  # [B, n] how often each prompt was drawn
    boot_shift = mean_shift(ref[idx], other[idx])  # [B, 2]
    overlap = [overlap_coefficient(ref[:, k], other[:, k]) for k in range(2)]
    boot_overlap = np.stack([overlap_coefficient(ref[:, k], other[:, k], counts) for k in range(2)], -1)
    return {"shift": mean_shift(ref, other).tolist(),
            "shift_ci": percentile_interval(boot_shift, level).tolist(),
            "overlap": overlap,
            "overlap_ci": percentile_interval(boot_overlap, level).tolist()}  # [B, 2] -> [2, 2]


def picture_numbers(states: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                    axes: str = "pca") -> dict:
    """One panel: fit the plane on states['base'] ([n, d]) (and, for axes='teacher', πt's move), project every
    model, compare each with π0."""
    plane = fit_plane(states["base"], states["teacher"] if axes == "teacher" else None)
    points = {name: project(plane, x) for name, x in states.items()}
    models = {"base": {"points": points["base"].tolist()}}
    for name, x in states.items():
        if name == "base":
            continue
        share, full = in_plane(plane, x)
        models[name] = {**compare(points["base"], points[name], n_boot, seed, level), "in_plane": share,
                        "shift_full": full, "points": points[name].tolist()}
    return {"n": len(states["base"]), "axes": axes, "explained": plane.explained.tolist(),
            "sd": plane.sd.tolist(), "models": models}


# ----------------------------------------------------------------------------- the figure and the table

def fmt_ci(value: float, ci: list[float], signed: bool = False) -> str:
    return f"{value:{'+' if signed else ''}.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table_rows(panel: dict) -> list[list[str]]:
    """One row per model other than π0: name, shift and overlap along each axis, in_plane, shift_full."""
    rows = []
    for name, m in panel["models"].items():
        if name == "base":
            continue
        shown = f"{m['in_plane']:.0%}" if not math.isnan(m["in_plane"]) else "–"
        rows.append([name, *(fmt_ci(m["shift"][k], m["shift_ci"][k], True) for k in range(2)),
                     *(fmt_ci(m["overlap"][k], m["overlap_ci"][k]) for k in range(2)),
                     shown, f"{m['shift_full']:.2f}"])
    return rows


def header(axes: str) -> list[str]:
    a, b = AXES[axes]
    return ["model", f"shift {a} (σ)", f"shift {b} (σ)", f"overlap {a}", f"overlap {b}", "in plane",
            "|Δμ| (all d)"]


def draw_density(ax, z: np.ndarray, limits: tuple[float, float], color, vertical: bool) -> None:
    """The kernel density of one cloud along one axis (the curve the overlap numbers integrate)."""
    grid = np.linspace(*limits, 300)
    f = kernel_density(z, grid, max(scott_bandwidth(z), 1e-3 * (limits[1] - limits[0])))
    if vertical:  # the density along axis 2 stands beside the scatter, along its y axis
        ax.fill_betweenx(grid, f, alpha=0.15, color=color)
        ax.plot(f, grid, color=color, lw=1.2)
    else:
        ax.fill_between(grid, f, alpha=0.15, color=color)
        ax.plot(grid, f, color=color, lw=1.2)


def axis_label(panel: dict, k: int) -> str:
    share = f"{panel['explained'][k]:.0%} of π0's variance"
    if panel["axes"] == "pca":
        return (f"PC1 of π0's final hidden states at the last prompt token ({share})" if k == 0 else
                f"PC2 of π0's final hidden states ({share})")
    return (f"πt's mean move from π0 (final hidden state, last prompt token; {share})" if k == 0 else
            f"π0's top principal direction orthogonal to it ({share})")


def draw_panel(fig, cells, panel: dict, labels: dict[str, str], colors: dict, set_name: str) -> None:
    """One set: the scatter, the per-axis densities above and to its right, the table of numbers under it."""
    main = fig.add_subplot(cells[1, 0])
    top = fig.add_subplot(cells[0, 0], sharex=main)
    right = fig.add_subplot(cells[1, 1], sharey=main)
    clouds = {name: np.array(panel["models"][name]["points"]) for name in labels}  # name -> [n, 2]
    every = np.concatenate(list(clouds.values()))
    pad = 0.08 * (every.max(0) - every.min(0))
    limits = [(every.min(0)[k] - pad[k], every.max(0)[k] + pad[k]) for k in range(2)]
    for name, z in clouds.items():
        main.scatter(z[:, 0], z[:, 1], s=18, alpha=0.55, color=colors[name], edgecolors="none")
        main.scatter(*z.mean(0), s=170, marker="X", color=colors[name], edgecolors="white", linewidths=1.2)
        draw_density(top, z[:, 0], limits[0], colors[name], vertical=False)
        draw_density(right, z[:, 1], limits[1], colors[name], vertical=True)
    main.set_xlim(limits[0])
    main.set_ylim(limits[1])
    main.set_xlabel(axis_label(panel, 0))
    main.set_ylabel(axis_label(panel, 1))
    main.grid(alpha=0.3)
    top.set_title(f"{set_name} prompts (n = {panel['n']} per model; X = a cloud's mean)", fontsize=12)
    top.tick_params(axis="x", labelbottom=False)  # only the labels: the axis is shared with the scatter
    top.set_yticks([])
    top.set_ylabel("density", fontsize=8)
    right.tick_params(axis="y", labelleft=False)
    right.set_xticks([])
    right.set_xlabel("density", fontsize=8)
    for ax in (top, right):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    table_ax = fig.add_subplot(cells[3, :])
    table_ax.axis("off")
    rows = [[cell.replace(" [", "\n[") for cell in row] for row in table_rows(panel)]  # intervals below
    if rows:
        names = [h.replace(" ", "\n", 1) for h in header(panel["axes"])]  # "shift\nPC1 (σ)": narrow columns
        table = table_ax.table(cellText=rows, colLabels=names, cellLoc="center", bbox=[0, 0, 1, 1],
                               colWidths=[0.16, 0.15, 0.15, 0.15, 0.15, 0.1, 0.14])
        table.auto_set_font_size(False)
        table.set_fontsize(9)


def draw(panels: dict, labels: dict[str, str], path: Path, title: str, level: float) -> None:
    """Both sets side by side, one legend for both, a caption saying how to read the numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    palette = ["#222222", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf"]  # π0 black, πt red, the students in matplotlib's usual order
    colors = {name: palette[i % len(palette)] for i, name in enumerate(labels)}
    n_rows = len(labels)  # the table: a header and one two-line row per model other than π0
    fig = plt.figure(figsize=(16, 11 + 0.45 * n_rows))
    outer = fig.add_gridspec(1, 2, wspace=0.12, left=0.05, right=0.98, top=0.88, bottom=0.1)
    for k, (set_name, panel) in enumerate(panels.items()):
        # rows: density of axis 1, the scatter, room for its x label, the table
        cells = outer[k].subgridspec(4, 2, width_ratios=[4.5, 1], hspace=0.05, wspace=0.04,
                                     height_ratios=[1.1, 4.5, 0.55, 0.5 * n_rows])
        draw_panel(fig, cells, panel, labels, colors, set_name)
    handles = [Line2D([], [], marker="o", ls="", ms=7, color=colors[name], label=labels[name])
               for name in labels]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.945), ncol=min(len(labels), 3),
               fontsize=10, frameon=False)
    fig.suptitle(title, fontsize=14, y=0.985)
    caption = ("Each model against π0 on the same prompts.   shift: the move of the cloud's mean along the "
               "axis, in units of π0's spread along it (0 = same centre).\n"
               "overlap: the area the two densities drawn beside the axes share (1 = identical, "
               "0 = disjoint).   in plane: the share of the model's whole mean move that the axes show.\n"
               "|Δμ|: that whole move, in units of π0's total spread (all dimensions).   "
               f"Brackets: {level:.0%} paired bootstrap intervals over prompts.")
    fig.text(0.5, 0.012, caption, ha="center", fontsize=9.5, linespacing=1.5)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_models(items: list[str]) -> list[tuple[str, Path]]:
    """--models NAME=DIR ...: checked (a model directory with a config and a tokenizer) before any work."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--models takes NAME=DIR, got {item!r}")
        if name in RESERVED or name in (n for n, _ in pairs):
            raise UserError(f"--models: the name {name!r} is taken (base and teacher are always drawn)")
        if not Path(path).exists():
            raise UserError(f"--models {name}: {path}: model directory not found")
        check_model_spec(path)
        pairs.append((name, Path(path)))
    return pairs


def collect_states(base, tok, teacher, students: list[tuple[str, Path]], prompts: dict[str, list[str]],
                   batch_size: int, chat_template=None) -> dict[str, dict[str, np.ndarray]]:
    """x_m(p) for π0, πt (π0 with the hook) and each student, on each set: set -> model -> [n, d]. One student
    in memory at a time."""
    total = (2 + len(students)) * sum(len(p) for p in prompts.values())
    states = {s: {} for s in prompts}
    with tqdm(total=total, desc="hidden states", unit="prompt") as bar:
        for name, hook in (("base", contextlib.nullcontext), ("teacher", teacher.steer)):
            bar.set_postfix_str(name)
            with hook():
                for s, p in prompts.items():
                    states[s][name] = last_token_states(base, tok, p, batch_size, bar)
        for name, path in students:
            bar.set_postfix_str(name)
            model, stok = load_model(str(path), next(base.parameters()).device, chat_template=chat_template)
            if stok.get_vocab() != tok.get_vocab():
                raise UserError(f"--models {name}: {path} has another tokenizer than π0")
            for s, p in prompts.items():
                states[s][name] = last_token_states(model, stok, p, batch_size, bar)
            del model
    return states


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    for name in ("direction.safetensors", "direction.json"):
        if not (run / name).is_file():
            raise UserError(f"{run / name}: file not found (πt needs Stage 1's direction: run "
                            f"extract_direction.py --out {run})")
    meta = load_json(run / "direction.json")
    base_name = args.model or meta.get("model", BUNDLED_MODEL)
    check_model_spec(base_name)
    students = parse_models(args.models)
    paths = {"harmless": args.harmless, "harmful": args.harmful}
    prompts = {s: read_prompts(paths[s], args.n_prompts, args.seed) for s in SETS}
    for s in SETS:
        if len(prompts[s]) < MIN_PROMPTS:
            raise UserError(f"{paths[s]}: {len(prompts[s])} prompts; the picture needs {MIN_PROMPTS} or more")
    png = Path(args.out) if args.out else run / "picture.png"
    if png.suffix.lower() != ".png":
        raise UserError(f"--out {png}: expected a .png path (the numbers go beside it as .json)")
    device = pick_device(args.device)
    seed_everything(args.seed)
    t0 = time.time()

    base, tok = load_model(base_name, device, chat_template=args.chat_template)
    prompts = {s: truncate_prompts(tok, prompts[s], args.max_prompt_tokens, paths[s]) for s in SETS}
    teacher, _ = load_teacher(base, run / "direction.safetensors")
    labels = {"base": "π0 (base)", "teacher": f"πt (teacher: {teacher.describe()})"}
    labels.update({name: f"{name} ({path})" for name, path in students})
    states = collect_states(base, tok, teacher, students, prompts, args.batch_size, args.chat_template)

    panels = {s: picture_numbers(states[s], args.n_boot, args.seed, args.level, args.axes) for s in SETS}
    plane = "PCA of π0's final hidden states" if args.axes == "pca" else "πt's move and π0's main variation"
    title = f"π0, πt and students in π0's capability space ({base_name}; axes: {plane})"
    png.parent.mkdir(parents=True, exist_ok=True)
    draw(panels, labels, png, title, args.level)
    record = {"labels": labels, "axes": args.axes, "panels": panels, "prompts": prompts,
              "base_model": base_name, "run": str(run),
              "direction": {k: meta.get(k) for k in ("layer", "coefficient", "norm", "kind")},
              "models": {name: str(path) for name, path in students}, "data": paths, "n_boot": args.n_boot,
              "level": args.level, "seed": args.seed, "seconds": round(time.time() - t0, 1), **run_info()}
    js = write_json(png.with_suffix(".json"), record)
    for s, panel in panels.items():
        (a, b), ev = AXES[panel["axes"]], panel["explained"]
        print(f"\n{s} (n = {panel['n']}; {a} {ev[0]:.0%}, {b} {ev[1]:.0%} of π0's variance)")
        rows = [header(panel["axes"])] + table_rows(panel)
        widths = [max(len(row[j]) for row in rows) + 3 for j in range(len(rows[0]))]
        for row in rows:
            print("  " + "".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\ntook {time.time() - t0:.0f} s; wrote the picture to {png} and its numbers to {js}")


if __name__ == "__main__":
    run_cli(main)
