"""What each speed piece of the networks buys: the same call with the piece on and off, interleaved.

    python benchmarks/speed_pieces.py [--repeats 3]

Full SD 1.5 sizes, float32, CPU, 2 threads, the weights of /tmp/sd15_random.safetensors
(make_full_size_checkpoint.py writes it).

    memory.freed_tensors_kept
                             a guided UNet step (batch 2) at 512x512, and one 1280 -> 1280 3x3 convolution
                             on 8x8 maps (batch 2), inside freed_tensors_kept (as generate's loop runs them)
                             and outside it. The context is entered for each call, so each call starts from a
                             trimmed heap: a loop's later steps, which find the heap already grown, gain more.
    vae.store_channels_last  a 512x512 decode with channels-last weights and activations (VAE.decode,
                             as shipped), against the same decoder on the file's contiguous layout
    vae.Upsample             the decoder's last upsample (256 channels, 256x256 -> 512x512) as four 2x2
                             convolutions of the small image, against the 3x3 convolution of the enlarged
                             one; then a whole 512x512 decode each way. Also the rounding error of each way
                             against the same upsample computed in float64

Writes benchmarks/results/speed_pieces.md.
"""

from __future__ import annotations

import argparse

from common import FP32_FILE, THREADS, ratio, summary, time_interleaved, write_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from sd_scratch.loading import load_checkpoint
    from sd_scratch.memory import freed_tensors_kept

    torch.set_num_threads(THREADS)
    model = load_checkpoint(FP32_FILE)
    plain_vae = load_checkpoint(FP32_FILE).vae  # a second copy, never decoded through VAE.decode: contiguous weights
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g)
    latents, context = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    timestep = torch.tensor([500.0, 500.0])
    conv = torch.nn.Conv2d(1280, 1280, 3, padding=1)
    maps = torch.randn(2, 1280, 8, 8, generator=g)

    def kept(call, keep):
        def run():
            with freed_tensors_kept(torch.device("cpu"), keep=keep):
                return call()
        return run

    rows = []
    with torch.inference_mode():
        for name, call, repeats, (unit, scale, digits) in [  # (unit, seconds to unit, digits) for the table
                ("UNet step, guided (batch 2), 512x512", lambda: model.unet(latents, timestep, context), args.repeats,
                 ("s", 1, 2)),
                ("one 1280 -> 1280 3x3 convolution, 8x8, batch 2", lambda: conv(maps), 10 * args.repeats,
                 ("ms", 1000, 1))]:
            difference = (kept(call, True)() - kept(call, False)()).abs().max()
            times = time_interleaved({"on": kept(call, True), "off": kept(call, False)}, repeats=repeats)
            rows.append(["memory.freed_tensors_kept", name, summary([scale * t for t in times["on"]], unit, digits),
                         summary([scale * t for t in times["off"]], unit, digits), ratio(times["on"], times["off"]),
                         f"{difference:.0e}"])

        def plain_decode():
            return plain_vae.decoder(plain_vae.post_quant_conv(z))

        difference = (model.vae.decode(z) - plain_decode()).abs().max()
        times = time_interleaved({"on": lambda: model.vae.decode(z), "off": plain_decode}, repeats=args.repeats)
        rows.append(["vae.store_channels_last: channels-last decoder", "VAE decode, 64x64 latent -> 512x512",
                     summary(times["on"]), summary(times["off"]), ratio(times["on"], times["off"]), f"{difference:.0e}"])

        upsamples = [level.upsample for level in model.vae.decoder.up if hasattr(level.upsample, "conv")]
        last_upsample = model.vae.decoder.up[1].upsample

        def decode(small_image):
            for upsample in upsamples:  # an instance's `forward` stands in for the class's
                if small_image:
                    upsample.__dict__.pop("forward", None)
                else:
                    upsample.forward = upsample.convolve_enlarged  # what vae.Upsample computed before
            return model.vae.decode(z)

        maps = torch.randn(1, 256, 256, 256, generator=g).to(memory_format=torch.channels_last)
        exact = F.conv2d(F.interpolate(maps.double(), scale_factor=2.0), last_upsample.conv.weight.double(),
                         last_upsample.conv.bias.double(), padding=1)  # convolve_enlarged, in float64
        errors = {way: (output.double() - exact) for way, output in
                  [("with", last_upsample(maps)), ("without", last_upsample.convolve_enlarged(maps))]}
        upsample_errors = "; ".join(f"{way} it rms {e.pow(2).mean().sqrt():.1e}, max {e.abs().max():.1e}"
                                    for way, e in errors.items())
        for name, on, off, repeats in [
                ("the last upsample, 256 channels, 256x256 -> 512x512", lambda: last_upsample(maps),
                 lambda: last_upsample.convolve_enlarged(maps), 3 * args.repeats),
                ("VAE decode, 64x64 latent -> 512x512", lambda: decode(True), lambda: decode(False), args.repeats)]:
            difference = (on() - off()).abs().max()
            times = time_interleaved({"on": on, "off": off}, repeats=repeats)
            rows.append(["vae.Upsample: four 2x2 convolutions of the small image", name, summary(times["on"]),
                         summary(times["off"]), ratio(times["on"], times["off"]), f"{difference:.0e}"])

    write_table("speed_pieces", "What each speed piece buys, full SD 1.5, float32",
                ["piece", "call", "with it (as shipped)", "without it", "ratio with/without", "max |difference|"],
                rows, "Calls alternate (with, without, with, ...) after one untimed round each; median (min-max). "
                      "The last column is the largest difference between the two outputs: the same sums in "
                      "another order. vae.Upsample's error against the same upsample in float64 (the last "
                      f"upsample's weights, random 256-channel input of std 1): {upsample_errors}.")


if __name__ == "__main__":
    main()
