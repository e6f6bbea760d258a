"""Benchmark: loading the bundled model, from the GGUF file (first use) and from the converted cache.

Each measurement runs in a fresh subprocess, so imports count the same way in both. "cold" points
$SAFESTEER_CACHE at an empty temporary folder (GGUF de-quantisation + saving the cache + loading);
"cached" loads the converted directory that the cold run left behind.

Usage:
    python -m bench.startup --repeats 3
"""
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from safesteer.cli import Parser, add_repeats, run_cli

SNIPPET = ("import time; t = time.perf_counter(); from safesteer.models import load_model; "
           "load_model('smollm2-135m'); print(time.perf_counter() - t)")


def timed(env):
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = Parser(__doc__)
    add_repeats(p, 3, "cold and cached loads each (the median)")
    args = p.parse_args(argv)
    cold, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "SAFESTEER_CACHE": d}
            cold.append(timed(env))
            cached.append(timed(env))
    c, w = statistics.median(cold), statistics.median(cached)
    print(f"load_model('smollm2-135m'), import of safesteer.models + transformers included, "
          f"median of {args.repeats}:")
    print(f"  first use (GGUF -> cache): {c:6.2f} s")
    print(f"  cached                   : {w:6.2f} s   ({c / w:.0f}x faster)")


if __name__ == "__main__":
    run_cli(main)
