"""Two faster CPU paths sd_scratch does not take, and why: their speed and their rounding, measured.

    python benchmarks/onednn_paths.py [--repeats 5]

torch computes a float32 Linear with its BLAS (MKL in the x86 wheels) and a convolution with oneDNN,
rewriting the weight into oneDNN's blocked layout at every call. Two ways around that are faster on
an AMD CPU, where MKL does not take its AVX-512 code:

    oneDNN matmul      torch.ops.mkldnn._linear_pointwise instead of F.linear
    packed weights     the weight rewritten once (mkldnn_reorder_conv2d_weight) and the convolution
                       run by torch.ops.mkldnn._convolution_pointwise, as inductor's weight freezing does

For shapes of SD 1.5's UNet at 512x512 (guided batch of 2), each row times both ways (interleaved,
median) and measures each one's error against the same product in float64: the rms and the largest
difference, with inputs of unit variance and weights scaled to keep outputs of order 1. 2 threads.
Writes benchmarks/results/onednn_paths.md.
"""

from __future__ import annotations

import argparse

from common import THREADS, ratio, summary, time_interleaved, write_table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)

    def errors(result, exact):
        difference = result.double() - exact
        return f"{difference.pow(2).mean().sqrt():.1e} / {difference.abs().max():.1e}"

    def row(call, ways, exact):
        """Time torch's way and the other (interleaved), and measure each one's error against `exact`."""
        (torch_name, torch_way), (other_name, other_way) = ways.items()
        times = time_interleaved(ways, repeats=args.repeats)
        ms = {name: [1000 * t for t in values] for name, values in times.items()}
        rows.append([call, summary(ms[torch_name], "ms", 1), summary(ms[other_name], "ms", 1),
                     ratio(times[other_name], times[torch_name]), errors(torch_way(), exact),
                     errors(other_way(), exact)])

    rows = []
    # (tokens, in, out): the first level's attention projections, its feed-forward in and out, the 16x16 level's
    for tokens, inner, outer in [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (512, 1280, 1280)]:
        x = torch.randn(tokens, inner, generator=g)
        w = torch.randn(outer, inner, generator=g) / inner**0.5
        row(f"Linear ({tokens} x {inner}) @ ({inner} x {outer})",
            {"torch": lambda x=x, w=w: F.linear(x, w),
             "oneDNN": lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")},
            F.linear(x.double(), w.double()))
    # (channels, side): 3x3 convolutions of each level, batch 2
    for channels, side in [(320, 64), (640, 32), (1280, 16), (1280, 8)]:
        x = torch.randn(2, channels, side, side, generator=g)
        w = torch.randn(channels, channels, 3, 3, generator=g) / (9 * channels) ** 0.5
        # oneDNN's blocked layout, made once for this input's shape
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        row(f"3x3 convolution {channels} -> {channels}, {side}x{side}, batch 2",
            {"torch": lambda x=x, w=w: F.conv2d(x, w, padding=1),
             "packed": lambda x=x, packed=packed: torch.ops.mkldnn._convolution_pointwise(
                 x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")},  # padding, stride, dilation, groups
            F.conv2d(x.double(), w.double(), padding=1))

    write_table("onednn_paths", "Faster CPU paths not taken: oneDNN matmul, packed convolution weights (float32)",
                ["call", "torch's way", "the other way", "ratio other/torch", "error, torch's (rms / max)",
                 "error, the other (rms / max)"],
                rows, "Errors against the float64 product of the same float32 inputs. Both other ways are faster on "
                      "this CPU and both round more coarsely than torch's (and diffusers') way; in a whole UNet the "
                      "difference took a LoRA parity test against diffusers past its bound (README, Speed and "
                      "memory: not taken).")


if __name__ == "__main__":
    main()
