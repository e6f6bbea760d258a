"""Benchmark: loading the bundled model, from the GGUF file (first use) and from the converted cache.

Each measurement runs in a fresh subprocess, so imports count the same way in both. "cold" points
$SAFESTEER_CACHE at an empty temporary folder (GGUF de-quantisation + saving the cache + loading);
"cached" loads the converted directory that the cold run left behind.

Usage:
    python bench/startup.py --repeats 3
"""
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

SNIPPET = ("import time, sys; sys.path.insert(0, %r); t = time.perf_counter(); import common; "
           "common.load_model('smollm2-135m'); print(time.perf_counter() - t)" % str(ROOT))


def timed(env):
    out = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = common.Parser(__doc__)
    p.add_argument("--repeats", type=common.positive_int, default=3,
                   help="cold and cached loads each (the median)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cold, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            env = {**os.environ, "SAFESTEER_CACHE": d}
            cold.append(timed(env))
            cached.append(timed(env))
    c, w = statistics.median(cold), statistics.median(cached)
    print(f"load_model('smollm2-135m'), import of common + transformers included, median of {args.repeats}:")
    print(f"  first use (GGUF -> cache): {c:6.2f} s")
    print(f"  cached                   : {w:6.2f} s   ({c / w:.0f}x faster)")


if __name__ == "__main__":
    common.run_cli(main)
