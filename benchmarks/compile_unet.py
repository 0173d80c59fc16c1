"""When does `--compile` pay off? torch.compile of the UNet on the CPU: the first call's compile time, then the
time per step, against the same UNet run eagerly, with and without inductor's weight freezing.

    python benchmarks/compile_unet.py [--steps 3]

Each way runs in a fresh process on SD 1.5's full-size random weights (float32 file, 2 threads), at 512x512 with
guidance (batch 2 through the UNet), under torch.inference_mode and memory.freed_tensors_kept as `generate`'s
loop runs it:
- eager: the UNet as it is;
- compile: `torch.compile(unet)` (inductor, default mode), what `--compile` does;
- compile + freezing: the same with `torch._inductor.config.freezing = True`, which folds the weights into the
  compiled graph as constants and packs the convolution and linear weights for oneDNN once.
The compiled ways run twice, each in a fresh process: first with an empty inductor cache (what the first ever
`--compile` run on a machine pays), then with the cache that run left (what every later run pays). Reported: the
first call (compile included), the median of the next `steps` calls, the process's peak RSS, and the largest
difference of the output from the eager UNet's (compiled kernels fuse and reorder the arithmetic). Break-even is
how many steps a run must take before compiling has saved more than it cost.
Writes benchmarks/results/compile_unet.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import FP32_FILE, THREADS, run_in_fresh_process, write_table

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(THREADS)
from sd_scratch.loading import load_checkpoint
from sd_scratch.memory import freed_tensors_kept
args = json.loads(sys.argv[1])
model = load_checkpoint(args["path"], dtype=torch.float32)
generator = torch.Generator().manual_seed(0)
latents = torch.randn(2, 4, 64, 64, generator=generator)
context = torch.randn(2, 77, 768, generator=generator)
unet = model.unet
if args["way"] != "eager":
    import torch._inductor.config as inductor_config
    inductor_config.freezing = args["way"] == "compile + freezing"
    unet = torch.compile(unet)
times = []
with torch.inference_mode(), freed_tensors_kept(torch.device("cpu")):
    for call in range(1 + args["steps"]):
        start = time.perf_counter()
        out = unet(latents, torch.tensor(999 - 50 * call), context)
        times.append(time.perf_counter() - start)
        if call == 0:
            first = out.clone()
if args["way"] == "eager":
    np.save(args["reference"], first.numpy())
difference = float((first - torch.from_numpy(np.load(args["reference"]))).abs().max())
print(json.dumps(dict(first=times[0], steps=times[1:], difference=difference,
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="calls timed after the first")
    args = parser.parse_args()

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = f"{tmp}/eager.npy"
        order = [("eager", "eager", None)]
        for way in ("compile", "compile + freezing"):
            cache = Path(tmp) / way.replace(" ", "")  # each way its own inductor cache, empty at first
            order += [(way, f"{way}, empty cache", cache), (way, f"{way}, cache filled", cache)]
        for way, name, cache in order:
            code = CHILD.replace("THREADS", str(THREADS))
            if cache is not None:
                code = f"import os; os.environ['TORCHINDUCTOR_CACHE_DIR'] = {str(cache)!r}\n" + code
            runs[name] = run_in_fresh_process(code, json.dumps(dict(path=str(FP32_FILE), way=way, steps=args.steps,
                                                                     reference=reference)))
            print(name, json.dumps(runs[name]), flush=True)

    eager_step = statistics.median(runs["eager"]["steps"])
    rows = []
    for name, run in runs.items():
        step = statistics.median(run["steps"])
        compile_cost = run["first"] - eager_step
        if name == "eager":
            break_even = ""
        elif step < eager_step:
            break_even = f"{compile_cost / (eager_step - step):.0f} steps"
        else:
            break_even = "never"
        rows.append([name, f"{run['first']:.1f} s", f"{step:.2f} s", f"{step / eager_step:.2f}",
                     f"{run['peak'] / 1e9:.2f} GB", f"{run['difference']:.1e}", break_even])
    notes = (f"SD 1.5's UNet, full-size random weights from a float32 file, 512x512 latents with guidance (batch 2), "
             f"torch.inference_mode and memory.freed_tensors_kept (as in generate's loop). First call: compile (or cache load) and the call itself. Step: median of the "
             f"{args.steps} calls after it. Break-even: (first call - eager step) / (eager step - compiled step), the "
             f"steps after which compiling has paid for itself in this process. Difference: the largest absolute "
             f"difference of the first call's output from the eager UNet's (outputs are of order 1).")
    write_table("compile_unet", "torch.compile of the UNet on the CPU, 512x512",
                ["", "first call", "step", "step / eager", "peak RSS", "difference from eager", "break-even"],
                rows, notes)


if __name__ == "__main__":
    main()
