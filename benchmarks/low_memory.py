"""Low-memory mode: the UNet and text encoder in 8 bits (sd_scratch/quantize.py), against float32.

    python benchmarks/low_memory.py [--repeats 2]        full-size SD 1.5, random weights -> results/low_memory.md
    python benchmarks/low_memory.py --tiny               the tiny model's evaluation -> results/low_memory_tiny.md

Full size: needs /tmp/sd15_random.safetensors (python benchmarks/make_full_size_checkpoint.py
/tmp/sd15_random.safetensors). Its 8-bit file is written first, by `python -m sd_scratch.quantize` in a
fresh process (its time and peak RSS are a row too). Then each run is a fresh process that loads the
weights, encodes the prompt, takes 3 guided euler steps at 512x512 and decodes, with 2 threads, as
whole_run.py's: float32 (the reference picture), the 8-bit file, and the float32 file quantised while
loading (`low_memory=True`), each of the last two also as the command line's last batch runs
(free_when_done: each network's weights freed once it is done with). Reported: peak RSS (ru_maxrss, the whole process), the peak
by the end of the UNet loop (load, text and the loop), the RSS when the decode starts, times, and the
PSNR of the picture against float32's.

Tiny: every prompt of sd_scratch.tiny.evaluate (336 pictures) with the samplers and guidance scales of the
table in weights/README.md, by the shipped model in float32 and by its 8-bit file, and the scores side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import FP32_FILE, THREADS, run_in_fresh_process, summary, write_table

INT8_FILE = Path("/tmp/sd15_random_int8.safetensors")
PROMPT = "a photograph of an astronaut riding a horse"

QUANTIZE = r"""
import json, resource, sys, time
from pathlib import Path
from sd_scratch.quantize import quantize_checkpoint
start = time.perf_counter()
said = quantize_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps(dict(seconds=time.perf_counter() - start, said=said,
                      peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""

RUN = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(THREADS)
from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.single_file import load_single_file
from sd_scratch.sample import SpeedAndMemory, generate
args = json.loads(sys.argv[1])

def rss():  # (now, the peak so far) in bytes
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

start = time.perf_counter()
if args["low_memory"]:  # load_checkpoint(path, low_memory=True)
    model = load_single_file(Path(args["path"]), "cpu", torch.float32, None, low_memory=True)
else:
    model = load_checkpoint(args["path"], dtype=torch.float32)
loaded = time.perf_counter()
marks = {"after_load": rss()[0]}
model.unet.register_forward_hook(lambda module, inputs, output: marks.update(loop_peak=rss()[1]))
decode = model.vae.decode
def marked_decode(z):
    marks["before_decode"] = rss()[0]
    return decode(z)
model.vae.decode = marked_decode
images = generate(model, [args["prompt"]], steps=3, guidance=7.5, sampler="euler", seed=0, height=512, width=512,
                  progress=False, speed=SpeedAndMemory(free_when_done=args["free_when_done"])).images
done = time.perf_counter()
np.save(args["out"], images[0].permute(1, 2, 0).numpy())
print(json.dumps(dict(load=loaded - start, generate=done - loaded, peak=rss()[1], **marks)))
"""

RUNS = {  # row -> (weights, low_memory, free_when_done)
    "float32": (FP32_FILE, False, False),
    "8-bit file (sd_scratch.quantize)": (INT8_FILE, False, False),
    "8-bit file, free when done": (INT8_FILE, False, True),
    "float32 file, low_memory=True": (FP32_FILE, True, False),
    "float32 file, low_memory=True, free when done": (FP32_FILE, True, True),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two pictures in [0, 1], in dB."""
    return 10 * math.log10(1 / float(((a - b) ** 2).mean()))


def weight_error(path: Path) -> float:
    """The rms of (w' - w) over the rms of w, over every weight the UNet has in 8 bits: how far the quantised
    weights are from the float ones, for weights of this file's distribution."""
    from sd_scratch.loading import load_checkpoint
    from sd_scratch.quantize import dequantize_weight, layers_to_quantize, quantize_weight

    unet = load_checkpoint(path).unet
    error = total = 0.0
    for name in layers_to_quantize(unet):
        weight = unet.get_submodule(name).weight.detach().float()
        error += (dequantize_weight(*quantize_weight(weight)) - weight).pow(2).sum().item()
        total += weight.pow(2).sum().item()
    return math.sqrt(error / total)


def full_size(repeats: int) -> None:
    if not FP32_FILE.exists():
        sys.exit(f"{FP32_FILE} is missing: python benchmarks/make_full_size_checkpoint.py {FP32_FILE}")
    INT8_FILE.unlink(missing_ok=True)
    quantized = run_in_fresh_process(QUANTIZE, str(FP32_FILE), str(INT8_FILE))
    print(quantized["said"], flush=True)
    results = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name, (path, low_memory, free) in RUNS.items():
                out = f"{tmp}/{i}-{len(results[name])}.npy"
                r = run_in_fresh_process(RUN.replace("THREADS", str(THREADS)), json.dumps(dict(
                    path=str(path), low_memory=low_memory, free_when_done=free, prompt=PROMPT, out=out)))
                r["image"] = np.load(out)
                results[name].append(r)
                print(name, {k: round(v / 1e9 if v > 1e6 else v, 2) for k, v in r.items() if k != "image"}, flush=True)
    reference = results["float32"][0]["image"]
    gb = 1e9
    rows = []
    for name, runs in results.items():
        quality = "(reference)" if name == "float32" else f"{psnr(runs[0]['image'], reference):.1f} dB"
        rows.append([name, summary([r["peak"] / gb for r in runs], "GB"),
                     summary([r["loop_peak"] / gb for r in runs], "GB"),
                     f"{statistics.median(r['before_decode'] for r in runs) / gb:.2f} GB",
                     summary([r["load"] for r in runs], "s", 1), summary([r["generate"] for r in runs], "s", 1),
                     quality])
    rows.append(["python -m sd_scratch.quantize (fp32 file in, 8-bit file out)", f"{quantized['peak'] / gb:.2f} GB",
                 "", "", f"{quantized['seconds']:.1f} s", "", ""])
    from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT  # (torch: only now, after the children ran)

    difference = max(float(np.abs(runs[0]["image"] - reference).max()) for runs in list(results.values())[1:])
    notes = (
        f"{quantized['said']}. 512x512, 3 euler steps, guidance 7.5 (batch 2 through the UNet), one image, random "
        f"full-size SD 1.5 weights, 2 threads on shared cores (times are indicative). Medians of {repeats} fresh "
        "processes each, (min-max). Peak RSS is the process's ru_maxrss; 'peak by the loop's end' the peak until "
        "the last UNet call returned (loading, the text encoder, the loop); 'RSS at the decode' what the process "
        "held when the VAE decode began (the decode adds the rest of the peak). Largest difference of an 8-bit "
        f"picture from the float32 one: {difference:.4f} on the [0, 1] scale (the float32 picture's standard "
        f"deviation: {reference.std():.3f}). Relative rms error of the quantised UNet weights: "
        f"{weight_error(FP32_FILE):.2%} for these random weights (uniform in +-1/sqrt(fan_in), torch's default "
        "initialisation, whose largest weight is close to its typical one: the easy case for a scale set by the "
        f"largest), {weight_error(DEFAULT_CHECKPOINT):.2%} for the trained tiny model's."
    )
    write_table("low_memory", "Low-memory mode (8-bit UNet and text encoder), full-size SD 1.5, 512x512, 3 steps",
                ["", "peak RSS", "peak by the loop's end", "RSS at the decode", "load", "generate",
                 "PSNR against float32"], rows, notes)


def tiny(samplers: list[str], guidances: list[float]) -> None:
    import torch

    from sd_scratch.loading import load_checkpoint
    from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT
    from sd_scratch.quantize import quantize_checkpoint
    from sd_scratch.tiny.evaluate import evaluate, evaluation_prompts

    torch.set_num_threads(THREADS)
    prompts = evaluation_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        int8_file = Path(tmp) / "tiny_sd_int8.safetensors"
        quantize_checkpoint(DEFAULT_CHECKPOINT, int8_file)
        models = {"float32": load_checkpoint(), "8-bit": load_checkpoint(int8_file)}
        rows, seconds, largest = [], {name: 0.0 for name in models}, 0.0
        for sampler in samplers:
            for guidance in guidances:
                scores = {}
                for name, model in models.items():  # interleaved: whatever else the machine does slows both alike
                    started = time.perf_counter()
                    (_, _, scores[name], _), = evaluate(model, [sampler], [guidance], prompts)
                    seconds[name] += time.perf_counter() - started
                points = [100 * abs(getattr(scores["8-bit"], part) - getattr(scores["float32"], part))
                          for part in ("colour", "background", "shape")]
                largest = max(largest, *points)
                rows.append([sampler, f"{guidance:g}", *(f"{100 * s.colour:.1f} / {100 * s.background:.1f} / "
                                                         f"{100 * s.shape:.1f} %" for s in scores.values()),
                             f"{max(points):.1f}"])
                print(rows[-1], flush=True)
    notes = (f"sd_scratch.tiny.evaluate's {len(prompts)} prompt x seed pairs, 25 steps, read from the pixels; the "
             f"shipped file in float32 and its 8-bit file (python -m sd_scratch.quantize). Largest difference of a "
             f"score: {largest:.1f} points. Time for all rows: float32 {seconds['float32'] / 60:.1f} min, 8-bit "
             f"{seconds['8-bit'] / 60:.1f} min (2 threads on shared cores: indicative).")
    write_table("low_memory_tiny", "The tiny model's evaluation with 8-bit weights",
                ["sampler", "guidance", "float32: colour / background / shape", "8-bit", "largest difference (points)"],
                rows, notes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny model's evaluation instead of full size")
    parser.add_argument("--samplers", nargs="+", default=["euler", "euler_a", "lms", "ddim", "pndm", "dpmpp_2m", "heun"])
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 7.5])
    args = parser.parse_args()
    if args.tiny:
        tiny(args.samplers, args.guidance)
    else:
        full_size(args.repeats)


if __name__ == "__main__":
    main()
