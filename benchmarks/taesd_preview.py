"""TAESD previews at full size: seconds per decode of a 64x64 latent (a 512x512 picture), 2 threads.

    python benchmarks/taesd_preview.py [--repeats 7]

A full-size TAESD of SD's layout (taesd.py's TAESDConfig(): 4 latent channels, 64 wide, 1/8), random
weights (the time does not depend on them), decodes one random 64x64 latent: float32 (the default), and
bfloat16 (oneDNN's AMX kernels where the CPU has them). For scale, a 32x32 latent (256x256) in float32,
and SD's own VAE decoder on the same 64x64 latent (random weights, full size: vae.py's VAEConfig()), once.
The median of `repeats` decodes after one untimed warm-up, calls interleaved so that other load on the
machine slows every row alike. The machine's load average is written with the table.
Writes benchmarks/results/taesd_preview.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import THREADS, time_interleaved, write_table

from sd_scratch.taesd import TAESD
from sd_scratch.vae import VAE


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vae", action=argparse.BooleanOptionalAction, default=True,
                        help="also time SD's VAE decoder once (about 13 s)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    taesd = TAESD().eval()
    taesd_bf16 = TAESD().eval().to(torch.bfloat16)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        runs = {
            "512x512, float32": lambda: taesd.decode(latents),
            "512x512, bfloat16": lambda: taesd_bf16.decode(latents.bfloat16()),
            "256x256, float32": lambda: taesd.decode(latents[..., :32, :32]),
        }
        times = time_interleaved(runs, args.repeats)
        # How far bfloat16 strays, on the [0, 1] pixel scale, with the same weights.
        taesd_bf16.load_state_dict(taesd.state_dict())
        difference = (taesd_bf16.decode(latents.bfloat16()).float() - taesd.decode(latents)).abs().div(2)
        vae_seconds = None
        if args.vae:
            vae = VAE().eval()
            vae.decode(latents[..., :8, :8])  # lays the weights out channels-last
            start = time.perf_counter()
            vae.images_from_latents(latents)
            vae_seconds = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    rows = [[name, f"{statistics.median(t):.3f} s", f"{min(t):.3f} s", f"{max(t):.3f} s"] for name, t in times.items()]
    if vae_seconds is not None:
        rows.append(["SD's VAE decoder, 512x512, float32 (once)", f"{vae_seconds:.2f} s", "", ""])
    parameters = sum(p.numel() for p in taesd.decoder.parameters())
    notes = (f"TAESD decoder of SD's layout ({parameters:,} parameters), random weights, batch 1, "
             f"{THREADS} threads, median of {args.repeats} decodes after a warm-up (min and max beside it). "
             f"Load average (1 min) {load_before:.2f} before, {load_after:.2f} after. bfloat16 against float32, "
             f"same weights, [0, 1] pixel scale: largest difference {difference.max():.4f}, mean "
             f"{difference.mean():.5f}. A 512x512 TAESD decode is about 140 GFLOP (35 convolutions of 64 "
             "channels, 4 of them at 512x512), so float32 on two cores is bound by the convolutions' arithmetic.")
    write_table("taesd_preview", "TAESD preview decode (full-size SD layout, random weights)",
                ["decode", "median", "min", "max"], rows, notes)


if __name__ == "__main__":
    main()
