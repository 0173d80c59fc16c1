"""How long the command line takes to answer: --help, a usage error, and the default run to its saved PNG.

    python benchmarks/cli_start.py [--repeats 10]

Each is a new process (`python -m sd_scratch.sample ...`), timed from start to exit, the way a user
waits for it; the default run draws the shipped tiny model's picture into a temporary folder. The
median and (min-max) of the repeats, with torch's own thread count (all cores; 2 here).
Writes benchmarks/results/cli_start.md. With PYTHONPATH pointing at another checkout, it measures that.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from common import summary, write_table

CASES = {
    "--help": ["--help"],
    "a usage error (--steps many)": ["--steps", "many"],
    "the default run, to its saved PNG": [],
}


def seconds(args: list[str], outdir: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sd_scratch.sample", *args, "--outdir", outdir], capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as outdir:
        seconds([], outdir)  # once untimed: the files' pages in the OS cache, as for a user's second run
        for name, case in CASES.items():
            rows.append([name, summary([seconds(case, outdir) for _ in range(args.repeats)], "s", 3)])
    write_table("cli_start", "The command line's answer time", ["command", "start to exit"], rows,
                f"{args.repeats} new processes each, one after another; the default run makes one 64x64 image "
                "with the tiny model (25 Euler steps, guidance 3).")


if __name__ == "__main__":
    main()
