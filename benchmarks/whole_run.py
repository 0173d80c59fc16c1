"""A whole text-to-image run, sd_scratch against diffusers' StableDiffusionPipeline: time and peak memory.

    python benchmarks/whole_run.py [--repeats 2] [--steps 3] [--size 512]

Each run is a fresh process that loads the weights, encodes the prompt, takes `steps` guided euler
steps and decodes: sd_scratch from the single file (`load_checkpoint` + `generate`), diffusers from
the same weights in its folder layout (`StableDiffusionPipeline.from_pretrained`, safety_checker=None),
both into float32 on the CPU with 2 threads. Runs alternate: ours, theirs, ours as the command line runs it
(each network freed once done), ours with the loop's freed tensors not kept in malloc's heap. Reported: the
wall time of load + generation, the generation alone, and the process's peak resident set size
(ru_maxrss: weights, activations, the libraries themselves). Both runs save their image, and the
script checks that the two pictures agree, so that both sides did the same work.
Writes benchmarks/results/whole_run_<weights>_<size>.md (with _<steps>_steps when not 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from common import FP16_FILE, FP32_FILE, THREADS, diffusers_folder, run_in_fresh_process, summary, write_table

FOLDERS = {"fp16": Path("/tmp/sd15_random_diffusers_fp16"), "fp32": Path("/tmp/sd15_random_diffusers_fp32")}
FILES = {"fp16": FP16_FILE, "fp32": FP32_FILE}
PROMPT = "a photograph of an astronaut riding a horse"

OURS = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(THREADS)
from sd_scratch.loading import load_checkpoint
from sd_scratch.sample import SpeedAndMemory, generate
args = json.loads(sys.argv[1])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = load_checkpoint(args["path"], dtype=torch.float32)
loaded = time.perf_counter()
images = generate(model, [args["prompt"]], steps=args["steps"], guidance=7.5, sampler="euler", seed=0,
                  height=args["size"], width=args["size"], progress=False,
                  speed=SpeedAndMemory(free_when_done=args["free_when_done"],
                                       keep_freed_tensors=args["keep_freed_tensors"])).images
done = time.perf_counter()
np.save(args["out"], images[0].permute(1, 2, 0).numpy())
print(json.dumps(dict(total=done - start, load=loaded - start, generate=done - loaded, baseline=baseline,
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""

THEIRS = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(THREADS)
from diffusers import StableDiffusionPipeline
args = json.loads(sys.argv[1])
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(args["path"], torch_dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
loaded = time.perf_counter()
images = pipe(args["prompt"], num_inference_steps=args["steps"], guidance_scale=7.5, height=args["size"],
              width=args["size"], generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
done = time.perf_counter()
np.save(args["out"], images[0])
print(json.dumps(dict(total=done - start, load=loaded - start, generate=done - loaded, baseline=baseline,
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def run_child(code: str, **args) -> dict:
    return run_in_fresh_process(code.replace("THREADS", str(THREADS)), json.dumps(args))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--weights", default="fp32", choices=["fp32", "fp16"],
                        help="precision of the weights on disk (both load them into float32)")
    args = parser.parse_args()
    folder = diffusers_folder(FILES[args.weights], FOLDERS[args.weights], {"fp16": "float16", "fp32": "float32"}[args.weights])

    sides = {
        "sd_scratch (single file)": (OURS, dict(path=str(FILES[args.weights]), free_when_done=False,
                                                keep_freed_tensors=True)),
        "diffusers (from_pretrained)": (THEIRS, dict(path=str(folder))),
        "sd_scratch, as the command line runs it": (OURS, dict(path=str(FILES[args.weights]), free_when_done=True,
                                                               keep_freed_tensors=True)),
        "sd_scratch, the loop's freed tensors not kept": (OURS, dict(path=str(FILES[args.weights]), free_when_done=False,
                                                                     keep_freed_tensors=False)),
    }
    results = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for name, (code, paths) in sides.items():
                out = f"{tmp}/{len(results[name])}-{name[:4]}.npy"
                r = run_child(code, prompt=PROMPT, steps=args.steps, size=args.size, out=out, **paths)
                r["image"] = np.load(out)
                results[name].append(r)
                print(name, {k: round(v, 2) for k, v in r.items() if k != "image"}, flush=True)
        ours, theirs, ours_freeing, ours_not_keeping = results.values()
        difference = float(np.abs(ours[0]["image"] - theirs[0]["image"]).max())

    gb = 1e9
    rows = []
    for name, runs in results.items():
        rows.append([name, summary([r["total"] for r in runs], "s", 1), summary([r["generate"] for r in runs], "s", 1),
                     summary([r["peak"] / gb for r in runs], "GB"), f"{statistics.median(r['baseline'] for r in runs) / gb:.2f} GB"])

    def median_ratio(key, ours):
        return f"{statistics.median(r[key] for r in ours) / statistics.median(r[key] for r in theirs):.2f}"

    for name, runs in [("ratio ours/theirs", ours), ("ratio, as the command line runs it", ours_freeing),
                       ("ratio, the loop's freed tensors not kept", ours_not_keeping)]:
        rows.append([name, median_ratio("total", runs), median_ratio("generate", runs), median_ratio("peak", runs), ""])
    notes = (f"{args.size}x{args.size}, {args.steps} euler steps, guidance 7.5 (batch 2 through the UNet), one image, "
             f"{args.weights} weights on disk (the same tensors in both layouts) loaded into float32. Medians of {args.repeats} "
             f"fresh processes each, (min-max). Peak RSS is the process's ru_maxrss; the baseline column is "
             f"the RSS after the imports, before loading. 'As the command line runs it': `generate(..., speed=SpeedAndMemory(free_when_done=True))`, as `python -m sd_scratch.sample` calls it for its last batch (each network's weights freed once done with: the model cannot be used again). 'Not kept': `SpeedAndMemory(keep_freed_tensors=False)`, glibc's malloc left as it is during the loop (memory.freed_tensors_kept). Largest difference between the two images: "
             f"{difference:.1e} on the [0, 1] scale.")
    write_table(f"whole_run_{args.weights}_{args.size}" + (f"_{args.steps}_steps" if args.steps != 3 else ""), f"Whole text-to-image run, {args.size}x{args.size}, {args.steps} steps",
                ["", "load + generate", "generate", "peak RSS", "RSS after imports"], rows, notes)


if __name__ == "__main__":
    main()
