"""Where a whole run's time goes, phase by phase, sd_scratch against diffusers: load, prompt encoding,
each UNet step, the decode, the PNG; with the page faults of each phase.

    python benchmarks/whole_run_phases.py [--repeats 2] [--steps 3] [--weights fp32|fp16] [--cold]

The run of benchmarks/whole_run.py (512x512, 3 guided euler steps, float32 on 2 threads; ours from the
single file, diffusers' StableDiffusionPipeline.from_pretrained from the same weights as a folder), each
side in a fresh process, in turn, and ours a second time with the loop's freed tensors not kept in malloc's
heap (SpeedAndMemory(keep_freed_tensors=False)). Forward hooks on the networks stamp the time and the process's page
faults (ru_minflt, ru_majflt: a major fault read the page from disk) at the start and end of every text
encoder, UNet and VAE decoder call, so the phases are:

    load        load_checkpoint / from_pretrained
    prompt      from the call to the first UNet call: tokenizing, both text encoder passes, the noise
    step k      from the start of UNet call k to the next one's (the UNet, guidance, the sampler's step)
    decode      the VAE decoder's call (the last step ends where it begins)
    finish      from the decoder's end to the PIL image; then `save`, the PNG written

--cold drops the OS's cache of both sides' weight files before every run (needs root: writes
/proc/sys/vm/drop_caches), as after a reboot. Without it, each run finds what the runs before it left
in the cache. Writes benchmarks/results/whole_run_phases_<weights>[_cold].md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import FP16_FILE, FP32_FILE, THREADS, diffusers_folder, run_in_fresh_process, write_table

FOLDERS = {"fp16": Path("/tmp/sd15_random_diffusers_fp16"), "fp32": Path("/tmp/sd15_random_diffusers_fp32")}
FILES = {"fp16": FP16_FILE, "fp32": FP32_FILE}
PROMPT = "a photograph of an astronaut riding a horse"

STAMPS = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(THREADS)
marks = []
def mark(name):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    marks.append((name, time.perf_counter(), usage.ru_minflt, usage.ru_majflt))
def stamp(module, name):
    module.register_forward_pre_hook(lambda *_: mark(name + " start"))
    module.register_forward_hook(lambda *_: mark(name + " end"))
args = json.loads(sys.argv[1])
mark("start")
"""

OURS = STAMPS + r"""
from sd_scratch.loading import load_checkpoint
from sd_scratch.sample import SpeedAndMemory, generate
model = load_checkpoint(args["path"], dtype=torch.float32)
mark("loaded")
stamp(model.text_encoder, "text"); stamp(model.unet, "unet"); stamp(model.vae.decoder, "decoder")
mark("call")
result = generate(model, [args["prompt"]], steps=args["steps"], guidance=7.5, sampler="euler", seed=0,
                  height=512, width=512, progress=False, speed=SpeedAndMemory(keep_freed_tensors=args["keep"]))
mark("image")
result.pil_images[0].save(args["out"])
mark("saved")
print(json.dumps(marks))
"""

THEIRS = STAMPS + r"""
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(args["path"], torch_dtype=torch.float32, safety_checker=None,
                                               requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
mark("loaded")
stamp(pipe.text_encoder, "text"); stamp(pipe.unet, "unet"); stamp(pipe.vae.decoder, "decoder")
mark("call")
image = pipe(args["prompt"], num_inference_steps=args["steps"], guidance_scale=7.5, height=512, width=512,
             generator=torch.Generator("cpu").manual_seed(0)).images[0]
mark("image")
image.save(args["out"])
mark("saved")
print(json.dumps(marks))
"""


def phases(marks: list) -> dict[str, tuple[float, int, int]]:
    """The marks of one run -> {phase: (seconds, minor faults, major faults)}."""
    at = {}
    for name, *values in marks:
        at.setdefault(name, []).append(values)

    def between(a, b):
        return tuple(y - x for x, y in zip(a, b))

    unet_starts = at["unet start"]
    result = {"load": between(at["start"][0], at["loaded"][0]),
              "prompt": between(at["call"][0], unet_starts[0])}
    ends = [*unet_starts[1:], at["decoder start"][0]]
    for k, (begin, end) in enumerate(zip(unet_starts, ends), 1):
        result[f"step {k}"] = between(begin, end)
    result["decode"] = between(at["decoder start"][0], at["decoder end"][0])
    result["finish"] = between(at["decoder end"][0], at["image"][0])
    result["save"] = between(at["image"][0], at["saved"][0])
    result["total"] = between(at["start"][0], at["saved"][0])
    return result


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--weights", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--cold", action="store_true", help="drop the OS's file cache before every run")
    args = parser.parse_args()
    folder = diffusers_folder(FILES[args.weights], FOLDERS[args.weights],
                              {"fp16": "float16", "fp32": "float32"}[args.weights])
    sides = {"sd_scratch": (OURS, str(FILES[args.weights]), True), "diffusers": (THEIRS, str(folder), True),
             "sd_scratch, not kept": (OURS, str(FILES[args.weights]), False)}
    runs = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, (code, path, keep) in sides.items():
                if args.cold:
                    drop_caches()
                arguments = json.dumps(dict(path=path, prompt=PROMPT, steps=args.steps, keep=keep,
                                            out=f"{tmp}/{name}-{len(runs[name])}.png"))
                runs[name].append(phases(run_in_fresh_process(code.replace("THREADS", str(THREADS)), arguments)))
                print(name, {k: round(v[0], 2) for k, v in runs[name][-1].items()}, flush=True)

    def median(name, phase, i):
        return statistics.median(run[phase][i] for run in runs[name])

    rows = []
    for phase in runs["sd_scratch"][0]:
        ours, theirs = median("sd_scratch", phase, 0), median("diffusers", phase, 0)
        faults = [f"{median(name, phase, 1) / 1e3:.0f}k / {median(name, phase, 2) / 1e3:.1f}k" for name in sides]
        not_kept = median("sd_scratch, not kept", phase, 0)
        rows.append([phase, f"{ours:.2f} s", f"{theirs:.2f} s", f"{ours / theirs:.2f}", f"{not_kept:.2f} s", *faults])
    notes = (f"512x512, {args.steps} euler steps with guidance 7.5, {args.weights} weights on disk loaded into float32, "
             f"{THREADS} threads; medians of {args.repeats} fresh processes per side, in turn"
             f"{', the file cache dropped before each' if args.cold else ''}. Faults: minor / major page faults "
             "of the phase, in thousands (a major fault reads its page from disk). 'Not kept': ours with "
             "`SpeedAndMemory(keep_freed_tensors=False)`, glibc's malloc left as it is during the loop.")
    write_table(f"whole_run_phases_{args.weights}{'_cold' if args.cold else ''}",
                f"Whole 512x512 run, phase by phase ({args.weights} weights{', cold file cache' if args.cold else ''})",
                ["phase", "sd_scratch", "diffusers", "ratio", "ours, not kept", "faults, ours", "faults, diffusers",
                 "faults, ours not kept"], rows, notes)


if __name__ == "__main__":
    main()
