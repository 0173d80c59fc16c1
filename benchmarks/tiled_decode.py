"""Tiled VAE decoding: peak memory and time against the plain decode, and how far the two pictures differ.

    python benchmarks/tiled_decode.py [--big 256] [--compare 128]

Each decode runs in a fresh process that loads the full-size random SD 1.5 checkpoint
(/tmp/sd15_random.safetensors, float32: its tensors stay memory-mapped and only the VAE's are ever
read) and decodes one random latent:

    2048x2048 (a 256x256 latent)  tiled only: the plain decode would need tens of GB
    1024x1024 (a 128x128 latent)  plain and tiled, and the difference between the two images

The images are compared on the [0, 1] pixel scale (decode / 2 + 0.5, clamped). The seam score is the
largest jump of the tiling error from one row or column to the next, over its median jump: about 1
when the error varies smoothly, large where one tile's error gives way to the next one's at once.
Writes benchmarks/results/tiled_decode.md.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from common import FP32_FILE, THREADS, run_in_fresh_process, write_table

CHILD = f"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads({THREADS})
from sd_scratch.loading import load_checkpoint
from sd_scratch.vae import decode_tiled
side, tiled, out = int(sys.argv[1]), sys.argv[2] == "tiled", sys.argv[3]
vae = load_checkpoint(sys.argv[4]).vae  # the UNet's and text encoder's tensors are never read
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    start = time.perf_counter()
    images = decode_tiled(vae, z) if tiled else vae.decode(z)
    seconds = time.perf_counter() - start
np.save(out, (images[0] / 2 + 0.5).clamp(0, 1).numpy())
print(json.dumps(dict(seconds=seconds, before=before, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def decode(side: int, tiled: bool, out: str) -> dict:
    return run_in_fresh_process(CHILD, str(side), "tiled" if tiled else "plain", out, str(FP32_FILE))


def seam_score(error: np.ndarray) -> float:
    rows = np.abs(np.diff(error, axis=1)).mean(axis=(0, 2))
    columns = np.abs(np.diff(error, axis=2)).mean(axis=(0, 1))
    jumps = np.concatenate([rows, columns])
    return float(jumps.max() / np.median(jumps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", type=int, default=256, help="latent side of the tiled-only decode (256: 2048x2048)")
    parser.add_argument("--compare", type=int, default=128, help="latent side of the plain/tiled comparison")
    args = parser.parse_args()
    gb = 1e9
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for side, tiled in [(args.compare, False), (args.compare, True), (args.big, True)]:
            r = decode(side, tiled, f"{tmp}/{side}-{tiled}.npy")
            results[side, tiled] = r
            print(side, tiled, r, flush=True)
            rows.append([f"{side * 8}x{side * 8}", "tiled (64-latent tiles, 16 overlap)" if tiled else "plain",
                         f"{r['seconds']:.0f} s", f"{r['peak'] / gb:.2f} GB", f"{(r['peak'] - r['before']) / gb:.2f} GB"])
        plain, tiled = np.load(f"{tmp}/{args.compare}-False.npy"), np.load(f"{tmp}/{args.compare}-True.npy")
        error = tiled - plain
    notes = (f"One process per row, float32, {THREADS} threads. 'Decode adds' is the peak above the RSS after "
             f"loading (Python, torch, the VAE's 0.33 GB of weights). {args.compare * 8}x{args.compare * 8}, "
             f"tiled against plain, on the [0, 1] scale: largest difference {np.abs(error).max():.3f}, mean "
             f"{np.abs(error).mean():.4f}, 99.9th percentile {np.quantile(np.abs(error), 0.999):.3f} "
             f"(the plain image's standard deviation is {plain.std():.3f}); seam score {seam_score(error):.2f} "
             f"(1 = the error changes as smoothly at tile boundaries as anywhere else).")
    write_table("tiled_decode", "Tiled VAE decode (full-size SD VAE, random weights)",
                ["image", "decode", "time", "peak RSS", "decode adds"], rows, notes)


if __name__ == "__main__":
    main()
