"""Time per network call, sd_scratch against diffusers and transformers on the same weights.

    python benchmarks/speed.py [--only unet512,unet256,vae,text] [--repeats-unet512 3] ...

Full SD 1.5 sizes, float32, CPU, 2 threads. Both sides hold the weights of the single file
/tmp/sd15_random.safetensors (make_full_size_checkpoint.py writes it): sd_scratch loads it as it is,
diffusers' and transformers' models get it through diffusers' own convert_ldm_*_checkpoint functions.
Calls alternate (ours, theirs, ours, ...) after one untimed round each, so that whatever else the
machine is doing slows both alike; each row gives the median and (min-max).

    UNet     one guided step: batch 2 ([uncond, cond]), timestep 500, 77-token context, 512x512 and 256x256
    VAE      decode of one 64x64 latent to a 512x512 image
    text     CLIP text encoder on a batch of two prompts (77 tokens each)

For the 512x512 UNet step and the decode it also counts the floating-point operations (torch's
FlopCounterMode) and times a 4096 x 4096 float32 matmul now, on the same threads (through torch's BLAS
and through oneDNN, the faster counts): operations / matmul rate is the time the call would take if every
operation ran as fast as a large matmul, a practical floor. For the decode each side's own count: ours
does fewer operations (vae.Upsample convolves the small image).
Writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import FP32_FILE, THREADS, diffusers_models, ratio, summary, time_interleaved, write_table


def matmul_rates(repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a 4096^2 float32 matmul on this machine now (best of `repeats`), through torch's BLAS (`a @ b`:
    MKL in the x86 wheels) and through oneDNN (torch.ops.mkldnn._linear_pointwise; onednn_paths.py says why our
    layers do not use it). MKL takes its fast code only on Intel CPUs, so on an AMD one the faster is oneDNN."""
    import torch
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    ways = {"torch's BLAS": lambda: a @ b}
    if torch.backends.mkldnn.is_available():
        ways["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    rates = {}
    for name, way in ways.items():
        way()
        rates[name] = 2 * 4096**3 / min(_seconds(way) for _ in range(repeats))
    return rates


def matmul_rate(rates: dict[str, float]) -> float:
    """The faster of matmul_rates(), timed on the first call and kept in `rates` for the next."""
    if not rates:
        rates.update(matmul_rates())
    return max(rates.values())


def measured_rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {value / 1e9:.0f} GFLOP/s" for name, value in rates.items())


def counted_flops(call) -> int:
    """Floating-point operations of one call, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="unet512,unet256,vae,text", help="comma-separated subset to run")
    parser.add_argument("--repeats-unet512", type=int, default=3)
    parser.add_argument("--repeats-unet256", type=int, default=5)
    parser.add_argument("--repeats-vae", type=int, default=3)
    parser.add_argument("--repeats-text", type=int, default=10)
    args = parser.parse_args()
    wanted = set(args.only.split(","))

    import torch

    from sd_scratch.loading import load_checkpoint

    torch.set_num_threads(THREADS)
    ours = load_checkpoint(FP32_FILE)
    unet, vae, clip = diffusers_models(FP32_FILE)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=g)
    timestep = torch.tensor([500.0, 500.0])
    ids = ours.tokenizer(["a photograph of an astronaut riding a horse", ""]).input_ids

    rows, notes, rates = [], [], {}  # rates: matmul GFLOP/s, timed once when first needed
    with torch.inference_mode():
        for name, side in [("unet512", 64), ("unet256", 32)]:
            if name not in wanted:
                continue
            latents = torch.randn(2, 4, side, side, generator=g)
            difference = (ours.unet(latents, timestep, context) - unet(latents, timestep, encoder_hidden_states=context).sample).abs().max()
            times = time_interleaved({
                "ours": lambda: ours.unet(latents, timestep, context),
                "theirs": lambda: unet(latents, timestep, encoder_hidden_states=context),
            }, repeats=getattr(args, f"repeats_{name}"))
            rows.append([f"UNet step, guided (batch 2), {side * 8}x{side * 8}", summary(times["ours"]),
                         summary(times["theirs"]), ratio(times["ours"], times["theirs"]), f"{difference:.0e}"])
            if side == 64:
                flops = counted_flops(lambda: ours.unet(latents, timestep, context))
                rate = matmul_rate(rates)
                floor = flops / rate
                notes.append(
                    f"Floor for the 512x512 step: {flops / 1e12:.2f} TFLOP (FlopCounterMode: convolutions, matmuls, "
                    f"attention) at {rate / 1e9:.0f} GFLOP/s (a 4096^2 float32 matmul, timed just now: "
                    f"{measured_rates(rates)}; the faster counts) = {floor:.1f} s. sd_scratch takes "
                    f"{statistics.median(times['ours']) / floor:.2f} x the floor, diffusers "
                    f"{statistics.median(times['theirs']) / floor:.2f} x.")
        if "vae" in wanted:
            z = torch.randn(1, 4, 64, 64, generator=g)
            difference = (ours.vae.decode(z) - vae.decode(z).sample).abs().max()
            times = time_interleaved({"ours": lambda: ours.vae.decode(z), "theirs": lambda: vae.decode(z)},
                                     repeats=args.repeats_vae)
            rows.append(["VAE decode, 64x64 latent -> 512x512", summary(times["ours"]), summary(times["theirs"]),
                         ratio(times["ours"], times["theirs"]), f"{difference:.0e}"])
            ours_flops, their_flops = counted_flops(lambda: ours.vae.decode(z)), counted_flops(lambda: vae.decode(z))
            rate = matmul_rate(rates)
            ours_floor, their_floor = ours_flops / rate, their_flops / rate
            notes.append(
                f"The decode: sd_scratch {ours_flops / 1e12:.2f} TFLOP, diffusers {their_flops / 1e12:.2f} TFLOP "
                f"(vae.Upsample convolves the small image); at {rate / 1e9:.0f} GFLOP/s ({measured_rates(rates)}) "
                f"floors of {ours_floor:.1f} s and {their_floor:.1f} s. sd_scratch takes "
                f"{statistics.median(times['ours']) / ours_floor:.2f} x its floor, diffusers "
                f"{statistics.median(times['theirs']) / their_floor:.2f} x its own.")
        if "text" in wanted:
            difference = (ours.text_encoder(ids) - clip(ids).last_hidden_state).abs().max()
            times = time_interleaved({"ours": lambda: ours.text_encoder(ids), "theirs": lambda: clip(ids)},
                                     repeats=args.repeats_text)
            rows.append(["text encoder, 2 prompts", summary(times["ours"], "s", 3), summary(times["theirs"], "s", 3),
                         ratio(times["ours"], times["theirs"]), f"{difference:.0e}"])

    notes.append("Same weights on both sides (the last column is the largest difference between the two outputs). "
                 "The machine is shared: other processes were using its 2 cores at times, which slows both "
                 "sides alike (the calls alternate) but makes absolute times noisy; the min is the least disturbed.")
    write_table("speed", "Time per call, full SD 1.5, float32",
                ["call", "sd_scratch", "diffusers / transformers", "ratio ours/theirs", "max |difference|"],
                rows, "\n\n".join(notes))


if __name__ == "__main__":
    main()
