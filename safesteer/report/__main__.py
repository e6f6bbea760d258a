"""python -m safesteer.report RUN_DIR [--out FILE] (command.py)."""
from safesteer.cli import run_cli
from safesteer.report.command import main

if __name__ == "__main__":
    run_cli(main)
