"""A run directory as one self-contained HTML page: what each stage did, built from the files it wrote.

    run       load_run: the stages' files, read and checked for shape, never recomputed
    tokens    Highlighter, split_at: S's tokens in an answer, found with the run's own tokenizer
    svg       heat_map, line_chart: the pictures, as inline SVG
    stages    stage1, stage2, stage3: one section per stage
    answers   stage4; answers_data: Stage 4's answers regrouped by prompt, for the page's script
    page      the style, the script that filters and pages the answers, the frame
    command   python -m safesteer.report RUN_DIR [--out FILE]; write_report, which Stage 4 calls
"""
from safesteer.report.command import build_report, main, write_report

__all__ = ["build_report", "main", "write_report"]
