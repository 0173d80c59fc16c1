"""Will a run fit in memory? A lower bound from the shapes, checked before anything is allocated; and the loop's
freed tensors kept for reuse.

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

Below that, `freed_tensors_kept`: during the denoising loop, glibc's malloc keeps the memory of the
tensors each step frees for the next step, instead of handing it to the OS and faulting it in again.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import threading
from contextlib import contextmanager
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


# --------------------------------------------------------------------------------------------------
# The loop's freed tensors, kept for the next step

# glibc's malloc hands a request above its mmap threshold fresh pages of their own from the OS and gives
# them back when the block is freed; the threshold starts at 128 kB and slides up, as such blocks are
# freed, to at most 32 MB (on 64-bit). The UNet allocates and frees the same tensors at every step, many
# above 32 MB at 512x512 (the feed-forward's 84 MB GEGLU input, with guidance; oneDNN's 59 MB copy of a
# 1280-channel convolution's weights in its own layout, made at every call), and the kernel faults in
# and zeroes each of their pages again, step after step: 0.8 to 1 million page faults a guided 512x512 step
# without what follows, 10 to 140 thousand with it (benchmarks/results/whole_run_phases_fp32.md).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
GLIBC_LARGEST_SLIDING_THRESHOLD = 32 * 1024 * 1024
LOOP_MMAP_THRESHOLD = 1024 * 1024 * 1024
MALLOC_TUNING_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                           "GLIBC_TUNABLES")  # the environment through which a user tunes glibc's malloc
_loops_running = 0
_loops_lock = threading.Lock()


@functools.cache
def glibc_malloc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (whose malloc the settings below are for), else None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


@contextmanager
def freed_tensors_kept(device: torch.device, keep: bool = True):
    """For the denoising loop: glibc keeps the memory of tensors the loop frees, for the next step to reuse.

    Inside, requests up to 1 GB come from malloc's heap, whose freed blocks are reused without the
    kernel's help, and up to 1 GB of free memory at the heap's top is kept. On leaving, the thresholds
    go back to where glibc's sliding threshold ends up (32 MB, and twice that for trimming) and
    malloc_trim hands every free page of the heap back to the OS, so that the decode starts as it would
    have without this. (Not the decode: its tensors differ in size from one level to the next, and in
    the heap the holes that smaller ones left could not take the larger; the heap grew by 0.6 GB over
    a 512x512 decode.) Nothing is computed differently: only where tensors live. Nothing is done off
    glibc, for another device (the loop's tensors are not the CPU's), when `keep` is False, or when
    glibc's malloc was tuned through its environment variables (that is the user's choice, kept).
    """
    global _loops_running
    libc = glibc_malloc() if keep and device.type == "cpu" else None
    if libc is None or any(name in os.environ for name in MALLOC_TUNING_VARIABLES):
        yield
        return
    with _loops_lock:  # loops in several threads at once: the first in sets, the last out restores
        if _loops_running == 0:
            libc.mallopt(M_MMAP_THRESHOLD, LOOP_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, LOOP_MMAP_THRESHOLD)
        _loops_running += 1
    try:
        yield
    finally:
        with _loops_lock:
            _loops_running -= 1
            if _loops_running == 0:
                libc.mallopt(M_MMAP_THRESHOLD, GLIBC_LARGEST_SLIDING_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_LARGEST_SLIDING_THRESHOLD)
                libc.malloc_trim(0)
