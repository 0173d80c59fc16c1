"""What each speed piece of the networks buys: the same call with the piece on and off, interleaved.

    python benchmarks/speed_pieces.py [--repeats 3]

Full SD 1.5 sizes, float32, CPU, 2 threads, the weights of /tmp/sd15_random.safetensors
(make_full_size_checkpoint.py writes it).

    unet.Conv2d              a guided UNet step (batch 2) at 512x512 and 256x256, and one 1280 -> 1280
                             3x3 convolution on 8x8 maps (batch 2), with convolutions over at most
                             SMALL_CONV_POSITIONS positions kept off oneDNN (as shipped), against
                             every convolution through oneDNN (SMALL_CONV_POSITIONS = 0)
    vae.store_channels_last  a 512x512 decode with channels-last weights and activations (VAE.decode,
                             as shipped), against the same decoder on the file's contiguous layout

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

    import sd_scratch.unet as unet_module
    from sd_scratch.loading import load_checkpoint

    torch.set_num_threads(THREADS)
    shipped_positions = unet_module.SMALL_CONV_POSITIONS
    model = load_checkpoint(FP32_FILE)
    plain_vae = load_checkpoint(FP32_FILE).vae  # a second copy, never decoded through VAE.decode: contiguous weights
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=g)
    timestep = torch.tensor([500.0, 500.0])
    z = torch.randn(1, 4, 64, 64, generator=g)

    def unet_step(positions):  # reads `latents` when called
        def run():
            unet_module.SMALL_CONV_POSITIONS = positions
            try:
                return model.unet(latents, timestep, context)
            finally:
                unet_module.SMALL_CONV_POSITIONS = shipped_positions
        return run

    rows = []
    with torch.inference_mode():
        for side in (64, 32):
            latents = torch.randn(2, 4, side, side, generator=g)
            difference = (unet_step(shipped_positions)() - unet_step(0)()).abs().max()
            times = time_interleaved({"on": unet_step(shipped_positions), "off": unet_step(0)}, repeats=args.repeats)
            rows.append(["unet.Conv2d: small maps off oneDNN", f"UNet step, guided (batch 2), {side * 8}x{side * 8}",
                         summary(times["on"]), summary(times["off"]), ratio(times["on"], times["off"]),
                         f"{difference:.0e}"])
        conv = unet_module.Conv2d(1280, 1280, 3, padding=1)
        maps = torch.randn(2, 1280, 8, 8, generator=g)
        difference = (conv(maps) - torch.nn.functional.conv2d(maps, conv.weight, conv.bias, padding=1)).abs().max()
        times = time_interleaved({"on": lambda: conv(maps),
                                  "off": lambda: torch.nn.functional.conv2d(maps, conv.weight, conv.bias, padding=1)},
                                 repeats=10 * args.repeats)
        rows.append(["unet.Conv2d: small maps off oneDNN", "one 1280 -> 1280 3x3 convolution, 8x8, batch 2",
                     summary([1000 * t for t in times["on"]], "ms", 1), summary([1000 * t for t in times["off"]], "ms", 1),
                     ratio(times["on"], times["off"]), f"{difference:.0e}"])

        def plain_decode():
            return plain_vae.decoder(plain_vae.post_quant_conv(z))

        difference = (model.vae.decode(z) - plain_decode()).abs().max()
        times = time_interleaved({"on": lambda: model.vae.decode(z), "off": plain_decode}, repeats=args.repeats)
        rows.append(["vae.store_channels_last: channels-last decoder", "VAE decode, 64x64 latent -> 512x512",
                     summary(times["on"]), summary(times["off"]), ratio(times["on"], times["off"]), f"{difference:.0e}"])

    write_table("speed_pieces", "What each speed piece buys, full SD 1.5, float32",
                ["piece", "call", "with it (as shipped)", "without it", "ratio with/without", "max |difference|"],
                rows, "Calls alternate (with, without, with, ...) after one untimed round each; median (min-max). "
                      "The last column is the largest difference between the two outputs: the same sums in "
                      "another order.")


if __name__ == "__main__":
    main()
