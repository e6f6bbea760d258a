"""Write RUN_DIR/report.html: one self-contained page showing what each stage of the run did.

Built only from the files the stages wrote (direction.json, candidates.json, steering_check.json,
safety_tokens.json, every STUDENT/safesteer.json and STUDENT/train_log.jsonl, eval.json, eval.md,
eval_samples.jsonl); nothing is recomputed. One HTML file with inline CSS, SVG and a little plain JavaScript:
it opens offline, from disk, and names no URL.

    Stage 1   the candidates' bypass / induce / KL scores over positions x blocks, the chosen r outlined; the
              teacher grid's selectivity per block and c
    Stage 2   S (votes, mean Δ, mean score, how often each token occurs in Stage 4's answers), coverage, the
              teacher's continuations with S's tokens marked
    Stage 3   per student: loss terms, learning rate, seconds and sampled refusal per step, refreshes marked
    Stage 4   eval.md's tables; every prompt's answers side by side, S's tokens marked, each with its judge's
              verdicts, filterable by split, style, category and each model's verdict, with a text search

S's tokens are found by tokenizing each answer with the run's own tokenizer (safesteer/report/tokens.py). A
stage that did not run in RUN_DIR is shown as absent. Stage 4 (evaluate.py) writes the report at its end.

Usage:
    python -m safesteer.report runs/demo
    python -m safesteer.report runs/demo --out /tmp/demo_report.html
"""
from __future__ import annotations

from pathlib import Path

from safesteer.cli import Parser
from safesteer.errors import UserError
from safesteer.files import write_text
from safesteer.report.page import page
from safesteer.report.run import load_run
from safesteer.report.answers import answers_data, stage4
from safesteer.report.stages import stage1, stage2, stage3
from safesteer.report.tokens import Highlighter

REPORT = "report.html"


def build_parser() -> Parser:
    p = Parser(__doc__)
    p.prog = "python -m safesteer.report"
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (the stages' --out)")
    p.add_argument("--out", help=f"the HTML file to write (default: RUN_DIR/{REPORT})")
    return p


def checked(files: str, build, *args):
    """build(*args), where a field of the wrong kind (a list for a number, a row without its layer) is a
    one-line error naming the stage's files, not a traceback."""
    try:
        return build(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{files}: not as the stage writes them ({type(e).__name__}: {e})") from None


def build_report(run_dir: str | Path) -> str:
    """The report of run_dir as HTML text."""
    run = load_run(run_dir)
    hl = checked(f"{run.path / 'safety_tokens.json'}", Highlighter, run)
    stage4_files = f"{run.path / 'eval_samples.jsonl'} or eval.json"
    # first: it counts S's tokens in the answers, for Stage 2's table
    data = checked(stage4_files, answers_data, run, hl) if run.samples else None
    models = data["models"] if data else []
    sections = [("stage1", "Stage 1 · the refusal direction r",
                 checked(f"{run.path}/direction.json or candidates.json", stage1, run)),
                ("stage2", "Stage 2 · the safety tokens S",
                 checked(f"{run.path / 'safety_tokens.json'}", stage2, run, hl, models)),
                ("stage3", "Stage 3 · distillation",
                 checked(f"{run.path}/STUDENT/safesteer.json or train_log.jsonl", stage3, run)),
                ("stage4", "Stage 4 · evaluation", checked(stage4_files, stage4, run, data))]
    model = (run.direction or run.tokens or {}).get("model") or (run.evaluation or {}).get("base_model")
    files = ", ".join(str(p.relative_to(run.path)) for p in run.read)
    subtitle = f"model {model} · built from {files}" if model else f"built from {files}"
    return page(f"SafeSteer run {run.path}", subtitle, sections, data)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of run_dir to out (default RUN_DIR/report.html), atomically; returns its path."""
    return write_text(Path(out) if out else Path(run_dir) / REPORT, build_report(run_dir))


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
