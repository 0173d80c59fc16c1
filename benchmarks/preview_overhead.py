"""What previews cost: one approx preview at 512x512, and a whole 25-step 512x512 run with and without
`--save-intermediates 5 --preview taesd`, on random full-size SD 1.5 weights.

    python benchmarks/preview_overhead.py [--repeats 1] [--vae-previews]

The approx preview (preview.py's SD map: a 4x3 matrix, a bias, a nearest-neighbour upsample to 512x512)
is timed in this process, the median of 200 calls. The whole runs are the command line as a user runs
it, each a new process timed from start to exit (load, 25 guided steps, decode, PNGs), in turn so that
other load on the machine slows each alike: the checkpoint of benchmarks/common.py's FP32_FILE
(`python benchmarks/make_full_size_checkpoint.py` writes it) and a full-size TAESD of random weights
(TAESDConfig(): SD's layout, 1.2 M parameters). The command line runs TAESD previews in bfloat16 on a CPU
with native bfloat16 (cli.preview_dtype). --vae-previews adds a row with the VAE's own previews.
Writes benchmarks/results/preview_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import FP32_FILE, THREADS, summary, write_table

from sd_scratch.loading.taesd_file import save_taesd
from sd_scratch.preview import SD_LATENT_TO_RGB
from sd_scratch.taesd import TAESD

RUN = ["--steps", "25", "--height", "512", "--width", "512", "--guidance", "7.5", "--seed", "1"]


def approx_milliseconds() -> list[float]:
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(220):
        start = time.perf_counter()
        SD_LATENT_TO_RGB(latents, 8)
        times.append((time.perf_counter() - start) * 1000)
    return times[20:]


def whole_run(extra: list[str], outdir: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sd_scratch.sample", "--checkpoint", str(FP32_FILE), *RUN, *extra,
                           "--outdir", str(outdir)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the run {' '.join(extra) or '(no previews)'} failed: {done.stderr.strip()[-400:]}")
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--vae-previews", action="store_true", help="also runs with the VAE's previews (slow)")
    args = parser.parse_args()
    if not FP32_FILE.exists():
        raise SystemExit(f"{FP32_FILE} is missing: python benchmarks/make_full_size_checkpoint.py writes it")
    torch.set_num_threads(THREADS)
    approx = approx_milliseconds()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_taesd(tmp / "taesd.safetensors", TAESD())
        cases = {"no previews": [],
                 "--save-intermediates 5 --preview taesd": ["--save-intermediates", "5", "--preview", "taesd",
                                                            str(tmp / "taesd.safetensors")],
                 "--save-intermediates 5 --preview approx": ["--save-intermediates", "5", "--preview", "approx"]}
        if args.vae_previews:
            cases["--save-intermediates 5 (VAE previews)"] = ["--save-intermediates", "5"]
        times = {name: [] for name in cases}
        for round_ in range(args.repeats):
            for name, extra in cases.items():
                times[name].append(whole_run(extra, tmp / f"{round_}-{len(times[name])}-{name[:20]}"))
                print(name, f"{times[name][-1]:.1f} s", flush=True)
    base = statistics.median(times["no previews"])
    rows = [["one approx preview, 64x64 latents -> 512x512", summary(approx, "ms", 3), ""]]
    rows += [[f"whole run, {name}", summary(values, "s", 1), f"{statistics.median(values) / base:.3f}"]
             for name, values in times.items()]
    notes = (f"Whole runs: `python -m sd_scratch.sample --checkpoint {FP32_FILE.name} {' '.join(RUN)}`, random "
             f"full-size SD 1.5 weights (float32), torch's default threads ({torch.get_num_threads()}), each a new "
             f"process from start to exit, {args.repeats} round(s) in turn; ratio to the run without previews. "
             f"Load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. The approx preview: "
             "the median of 200 calls (min-max beside it).")
    path = write_table("preview_overhead", "What previews cost (512x512, 25 steps, full-size SD 1.5 layout)",
                       ["what", "time", "ratio"], rows, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
