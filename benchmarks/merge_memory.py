"""Peak memory of merging two full-size SD 1.5 checkpoints, against the largest tensor plus the bare interpreter.

    python benchmarks/merge_memory.py [--repeats 1]

The inputs are two float32 SD 1.5 single files of random weights (4.3 GB each, 1130 tensors):

    A   /tmp/sd15_random.safetensors         make_full_size_checkpoint.py (seed 0)
    B   /tmp/sd15_random_seed1.safetensors   the same script with torch.manual_seed(1): it has no seed option,
                                             so it is run with torch.manual_seed's argument replaced

Each run is a fresh process (its own ru_maxrss); the merges call sd_scratch.merge.main as the command line does:

    bare interpreter          imports torch and sd_scratch.merge, nothing else
    weighted sum              A B --alpha 0.3
    weighted sum, fp16 out    A B --alpha 0.3 --dtype fp16
    add difference            A B --add-difference A --alpha 0.5 (three inputs read at once)

Reported: the peak resident set size, the ratio of the merge's peak to (the largest tensor + the bare
interpreter's peak), the merge's wall time and the part of it spent hashing the inputs (sha256, for the
recipe in the metadata). Writes benchmarks/results/merge_memory.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from common import FP32_FILE, run_in_fresh_process, summary, write_table

SECOND_FILE = Path("/tmp/sd15_random_seed1.safetensors")
OUTPUT = Path("/tmp/sd15_merge_benchmark.safetensors")
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

BARE = r"""
import json, resource
import torch
import sd_scratch.merge
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

RUN = r"""
import json, resource, sys, time
import sd_scratch.merge as merging
hashing = []
sha256_of = merging.sha256_of
def timed_sha256_of(path):
    start = time.perf_counter()
    digest = sha256_of(path)
    hashing.append(time.perf_counter() - start)
    return digest
merging.sha256_of = timed_sha256_of
start = time.perf_counter()
code = merging.main(json.loads(sys.argv[1]))
seconds = time.perf_counter() - start
assert code == 0, code
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds,
                  "hashing": sum(hashing)}))
"""

MAKE_SECOND_FILE = r"""
import runpy, sys, torch
seed = torch.manual_seed
torch.manual_seed = lambda _: seed(1)
sys.argv = ["make_full_size_checkpoint.py", sys.argv[1]]
runpy.run_path("make_full_size_checkpoint.py", run_name="__main__")
"""

MERGES = {
    "weighted sum": [FP32_FILE, SECOND_FILE, "--alpha", "0.3"],
    "weighted sum, fp16 out": [FP32_FILE, SECOND_FILE, "--alpha", "0.3", "--dtype", "fp16"],
    "add difference (C = A)": [FP32_FILE, SECOND_FILE, "--add-difference", FP32_FILE, "--alpha", "0.5"],
}


def largest_tensor(path: Path) -> tuple[str, int]:
    """The name and byte size of the file's largest tensor, from its safetensors header (no torch here: the
    parent process stays small, see common.py)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    name = max(header, key=lambda k: math.prod(header[k]["shape"]) * ITEMSIZES[header[k]["dtype"]])
    return name, math.prod(header[name]["shape"]) * ITEMSIZES[header[name]["dtype"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not FP32_FILE.exists():
        raise SystemExit(f"{FP32_FILE} is missing: run benchmarks/make_full_size_checkpoint.py {FP32_FILE} first")
    if not SECOND_FILE.exists():
        print(f"writing {SECOND_FILE} (seed 1)")
        subprocess.run([sys.executable, "-c", MAKE_SECOND_FILE, str(SECOND_FILE)], cwd=Path(__file__).parent,
                       check=True)
    name, largest = largest_tensor(FP32_FILE)
    results = {"bare interpreter": [], **{merge: [] for merge in MERGES}}
    try:
        for _ in range(args.repeats):
            results["bare interpreter"].append(run_in_fresh_process(BARE))
            for merge, merge_args in MERGES.items():
                argv = [str(arg) for arg in merge_args] + ["--out", str(OUTPUT), "--force"]
                results[merge].append(run_in_fresh_process(RUN, json.dumps(argv)))
    finally:
        OUTPUT.unlink(missing_ok=True)
    bare = statistics.median(r["peak"] for r in results["bare interpreter"])
    rows = []
    for merge, runs in results.items():
        peak = statistics.median(r["peak"] for r in runs)
        each = ", ".join(f"{r['peak'] / 1e6:.0f}" for r in runs)
        timing = [summary([r["seconds"] for r in runs], "s", 1), summary([r["hashing"] for r in runs], "s", 1)] \
            if "seconds" in runs[0] else ["", ""]
        rows.append([merge, f"{peak / 1e6:.0f} MB ({each})", f"{(peak - bare) / 1e6:+.0f} MB",
                     f"{peak / (largest + bare):.2f}", *timing])
    write_table("merge_memory", "Merging two full-size SD 1.5 files (float32, 4.3 GB each), CPU: peak memory",
                ["run", "peak resident memory (median; each run)", "over the bare interpreter",
                 "peak / (largest tensor + bare)", "merge wall time (median, min-max)", "of which hashing inputs"],
                rows, notes=f"""
The largest tensor is {name}, {largest / 1e6:.0f} MB; the requirement is a
peak under 1.2 x (largest tensor + bare interpreter). {args.repeats} fresh process(es) per row, rows in turn.
The output ({OUTPUT}, 4.3 GB, 2.1 GB in fp16) is written to a temporary file, fsynced and renamed.
Tensors are read, merged and written {1 << 20} elements at a time (CHUNK_ELEMENTS) with plain file reads, so
the peak does not grow with the file or the largest tensor: what is over the bare interpreter is the slices'
buffers, the header and tqdm. The arithmetic runs on one thread (the machine line's 2 threads apply to the bare
import only): on a busy 2-core machine a second OpenMP thread made the weighted sum take 66 s instead of 13 s.
The wall time depends on the disk and on whether the inputs are in the OS's page cache (they mostly were: 23 GB
of memory, other jobs running): reading 8.6 GB (12.8 GB for add difference) and writing the output. Hashing
reads each input once more (sha256 of the whole file, A1111's model hash, recorded in the recipe); --no-hash
skips it.
""")


if __name__ == "__main__":
    main()
