"""Will a run fit in memory? A lower bound from the shapes, checked before anything is allocated.

The two largest moments of a run are the UNet's first level, where the activations are widest
relative to the weights, and the VAE decode's last level, at the full image size. Counting only the
tensors that must exist at once there gives a floor on what the run needs beyond the weights:

    UNet   at 1/f of the image, for the 2B images of the guided batch: the transformer's feed-forward
           input (GEGLU: 8 x the level's width) and its residual (1 x), or, on a level without attention,
           a residual block's input, output and one intermediate (3 x the width)
    VAE    at the full image size, for each of B images (or one tile's worth, tiled): the last level's
           input, upsampled at the width of the level above (SD: 256), and its first convolution's
           output at its own width (128)

A run that needs more than this cannot fit; one that needs less may still not (the bound leaves out
the weights, attention's working memory and everything the allocator keeps). Measured with SD 1.5 at
1024x1024, float32, CPU: the decode's floor is 1.6 GB where the decode added 3.58 GB to the process
(benchmarks/results/tiled_decode.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sd_scratch.loading import StableDiffusion

DECODE_TILE = 64  # latents per tile side in vae.decode_tiled's default


@dataclass(frozen=True)
class MemoryFloor:
    unet: int  # bytes: the UNet's activations at its first level
    decode: int  # bytes: the decode's activations at the full size (or at one tile)

    @property
    def largest(self) -> int:
        return max(self.unet, self.decode)


def memory_floor(model: StableDiffusion, batch: int, height: int, width: int, guided: bool,
                 tiled_decode: bool = False) -> MemoryFloor:
    """The fewest bytes the run's two widest moments need beyond the weights (see the module docstring)."""
    unet, vae = model.unet.config, model.vae.config
    factor = vae.downsampling_factor
    positions = (height // factor) * (width // factor)
    unet_batch = 2 * batch if guided else batch
    widths_held = 9 if 0 in unet.attention_levels else 3
    unet_bytes = unet_batch * positions * widths_held * unet.model_channels * model.dtype.itemsize

    if tiled_decode:
        height, width = min(height, DECODE_TILE * factor), min(width, DECODE_TILE * factor)
    widths = [vae.base_channels * m for m in vae.channel_mult]
    decode_widths = widths[min(1, len(widths) - 1)] + widths[0]
    vae_dtype = model.vae.post_quant_conv.weight.dtype
    decode_bytes = batch * height * width * decode_widths * vae_dtype.itemsize
    return MemoryFloor(unet_bytes, decode_bytes)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still get on `device`, or None where that cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")  # Linux; elsewhere unknown
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def largest_fitting_size(model: StableDiffusion, batch: int, height: int, width: int, guided: bool,
                         tiled_decode: bool, available: int) -> tuple[int, int] | None:
    """The largest (height, width) of the same shape, in multiples of 8, whose floor fits `available`."""
    best, low, high = None, 0.0, 1.0
    for _ in range(40):  # bisect the scale
        scale = (low + high) / 2
        h, w = max(8, int(height * scale) // 8 * 8), max(8, int(width * scale) // 8 * 8)
        if memory_floor(model, batch, h, w, guided, tiled_decode).largest <= available:
            best, low = (h, w), scale
        else:
            high = scale
    return best


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n < 1e12 else f"{n / 1e12:.3g} TB"
