"""Loading a checkpoint: sd_scratch's single file against diffusers' from_pretrained of the same weights.

    python benchmarks/load.py [--repeats 3]

The weights are the full-size random SD 1.5 in fp16 (/tmp/sd15_random_fp16.safetensors; make it with
make_full_size_checkpoint.py --fp16), and the same tensors as a diffusers folder written once by
diffusers' own save_pretrained. Each load runs in a fresh process (ours, theirs, ours, ...), into
float32 and into float16, and then reads every page of every weight once: a memory-mapped load leaves
pages on disk until they are used, and this puts that cost where it belongs. Reported: the time until the loader
returns, the time until every weight has been read, and the process's peak resident set size
(ru_maxrss). Writes benchmarks/results/load.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import FP16_FILE, THREADS, diffusers_folder, run_in_fresh_process, summary, write_table

FOLDER_FP16 = Path("/tmp/sd15_random_diffusers_fp16")

PREAMBLE = f"""
import json, resource, sys, time
import torch
torch.set_num_threads({THREADS})
"""

OURS = PREAMBLE + r"""
from sd_scratch.loading import load_checkpoint
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
start = time.perf_counter()
model = load_checkpoint(path, dtype=dtype)
returned = time.perf_counter() - start
networks = (model.unet, model.vae, model.text_encoder)
"""

THEIRS = PREAMBLE + r"""
from diffusers import StableDiffusionPipeline
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
returned = time.perf_counter() - start
networks = (pipe.unet, pipe.vae, pipe.text_encoder)
"""

TOUCH = r"""
tensors = [t for network in networks for t in network.state_dict().values()]
assert all(t.dtype == dtype for t in tensors if t.is_floating_point())
for t in tensors:  # read every page of every weight, so that pages a lazy (memory-mapped) load left on disk count too
    t.reshape(-1)[::4096 // t.element_size()].sum()
touched = time.perf_counter() - start
print(json.dumps(dict(returned=returned, touched=touched, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      weights=sum(t.numel() * t.element_size() for t in tensors))))
"""


def load(code: str, path: Path, dtype: str) -> dict:
    return run_in_fresh_process(code + TOUCH, str(path), dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = diffusers_folder(FP16_FILE, FOLDER_FP16, "float16")
    sides = {"sd_scratch, single file": (OURS, FP16_FILE), "diffusers, from_pretrained": (THEIRS, folder)}

    rows = []
    gb = 1e9
    for dtype in ("float32", "float16"):
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, (code, path) in sides.items():
                runs[name].append(load(code, path, dtype))
                print(dtype, name, runs[name][-1], flush=True)
        for name, r in runs.items():
            rows.append([f"fp16 -> {dtype}", name, summary([x["returned"] for x in r]), summary([x["touched"] for x in r]),
                         summary([x["peak"] / gb for x in r], "GB"), f"{r[0]['weights'] / gb:.2f} GB"])
        ours, theirs = runs.values()
        ratios = [f"{statistics.median(x[key] for x in ours) / statistics.median(x[key] for x in theirs):.2f}"
                  for key in ("returned", "touched", "peak")]
        rows.append([f"fp16 -> {dtype}", "ratio ours/theirs", *ratios, ""])
    notes = (f"Medians of {args.repeats} fresh processes per row, (min-max). 'Every weight read' is the time until "
             "the loader returned plus a read of one number in every 4 KB page of every tensor; it is the fair "
             "comparison when a loader maps the file and reads it only when a weight is first used. Peak RSS includes Python, torch and the library (about 0.26 GB for "
             "sd_scratch's imports, 0.45 GB for diffusers').")
    write_table("load", "Loading the full SD 1.5 weights (fp16 on disk)",
                ["load", "", "loader returns", "every weight read", "peak RSS", "weights in memory"], rows, notes)


if __name__ == "__main__":
    main()
