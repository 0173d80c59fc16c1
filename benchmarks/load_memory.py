"""Peak resident memory and time of loading a single-file checkpoint.

    python benchmarks/load_memory.py /tmp/sd15_random.safetensors [--dtype fp32|fp16]

Runs the load in a fresh process, reads every weight once (a memory-mapped load leaves pages on disk
until they are used), and reports the process's peak resident set size (ru_maxrss), the baseline
after imports, and both against the size the loaded weights take in memory.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from sd_scratch.loading import load_checkpoint
torch.set_num_threads(2)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dtype = {"fp32": torch.float32, "fp16": torch.float16}[sys.argv[2]]
start = time.perf_counter()
model = load_checkpoint(sys.argv[1], dtype=dtype)
seconds = time.perf_counter() - start
tensors = [t for m in (model.unet, model.vae, model.text_encoder) for t in m.state_dict().values()]
for t in tensors:  # touch every weight, so pages a lazy (memory-mapped) load left on disk are counted too
    t.float().sum()
touched = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps(dict(seconds=seconds, touched=touched, baseline=baseline, peak=peak, weights=weights)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    args = parser.parse_args()
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.path), args.dtype], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    print(f"file {args.path.name} ({args.path.stat().st_size / gb:.2f} GB) -> {args.dtype}")
    print(f"load time          {r['seconds']:.1f} s ({r['touched']:.1f} s until every weight has been read once)")
    print(f"weights in memory  {r['weights'] / gb:.2f} GB")
    print(f"baseline RSS       {r['baseline'] / gb:.2f} GB (python, torch, sd_scratch imported)")
    print(f"peak RSS           {r['peak'] / gb:.2f} GB = {r['peak'] / r['weights']:.2f} x weights "
          f"({(r['peak'] - r['baseline']) / r['weights']:.2f} x above the baseline)")


if __name__ == "__main__":
    main()
