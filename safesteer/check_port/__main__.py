"""python -m safesteer.check_port MODULE:FUNCTION [--hook ...] [--logits ...] [--mask ...] (command.py)."""
from safesteer.check_port.command import main
from safesteer.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
