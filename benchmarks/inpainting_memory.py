"""What inpainting costs over text-to-image: one full-size 512x512 guided step, peak memory and time.

    python benchmarks/inpainting_memory.py [--repeats 1]

Each run is a fresh process that loads a full-size SD 1.5 single file (float32, CPU, 2 threads), encodes
the prompt, takes one guided euler step at 512x512 and decodes:

    text-to-image             /tmp/sd15_random.safetensors (make_full_size_checkpoint.py)
    image-to-image            the same file, strength 1 (so that the one step runs; one VAE encode more)
    inpainting, 9 channels    /tmp/sd15_inpainting_random.safetensors (make_full_size_checkpoint.py --inpainting)
    inpainting, 4 channels    the ordinary file, the kept region put back after the step

Reported: the process's peak resident set size (ru_maxrss) and the wall time of the generation.
Writes benchmarks/results/inpainting_memory.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import FP32_FILE, THREADS, run_in_fresh_process, summary, write_table

INPAINTING_FILE = Path("/tmp/sd15_inpainting_random.safetensors")

RUN = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(THREADS)
from sd_scratch.loading import load_checkpoint
from sd_scratch.sample import generate
args = json.loads(sys.argv[1])
model = load_checkpoint(args["path"], dtype=torch.float32)
g = torch.Generator().manual_seed(0)
picture = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
mask = torch.zeros(1, 1, 512, 512)
mask[..., 128:384, 128:384] = 1
options = {"text-to-image": {}, "image-to-image": {"init_image": picture, "strength": 1.0},
           "inpainting": {"init_image": picture, "mask": mask}}[args["kind"]]
start = time.perf_counter()
generate(model, "a photograph of an astronaut riding a horse", steps=1, guidance=7.5, height=512, width=512,
         progress=False, **options)
seconds = time.perf_counter() - start
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}))
""".replace("THREADS", str(THREADS))

RUNS = {"text-to-image": (FP32_FILE, "text-to-image"), "image-to-image": (FP32_FILE, "image-to-image"),
        "inpainting, 9 channels": (INPAINTING_FILE, "inpainting"),
        "inpainting, 4 channels (put back)": (FP32_FILE, "inpainting")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for path in (FP32_FILE, INPAINTING_FILE):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run benchmarks/make_full_size_checkpoint.py first (see its --help)")
    results = {name: [] for name in RUNS}
    for _ in range(args.repeats):
        for name, (path, kind) in RUNS.items():
            results[name].append(run_in_fresh_process(RUN, json.dumps({"path": str(path), "kind": kind})))
    base = statistics.median(r["peak"] for r in results["text-to-image"])
    rows = []
    for name, runs in results.items():
        peak = statistics.median(r["peak"] for r in runs)
        each = ", ".join(f"{r['peak'] / 1e9:.3f}" for r in runs)
        rows.append([name, f"{peak / 1e9:.2f} GB ({each})", f"{(peak - base) / 1e6:+.0f} MB",
                     summary([r["seconds"] for r in runs], "s", 1)])
    write_table("inpainting_memory", "One guided 512x512 step, SD 1.5 size, float32, CPU: peak memory by kind of run",
                ["run", "peak resident memory (median; each run, GB)", "against text-to-image", "generation time (median, min-max)"],
                rows, notes=f"""
{args.repeats} fresh process(es) per row, rows in turn. The mask latents themselves are 1 x 64 x 64 and
4 x 64 x 64 floats (80 KB); image-to-image and inpainting also run the VAE's encoder (once for the image, once
more for the picture with the hole), whose weights are released after it, as the text encoder's are.
""")


if __name__ == "__main__":
    main()
