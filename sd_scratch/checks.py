"""Checks of a request that need no torch: image sizes, seeds, finite numbers.

The loop (sample.py) and the command line (cli.py) both use them; the command line does so before it
imports torch, so that a mistake is answered at once.
"""

from __future__ import annotations

import math

SIZE_MULTIPLE = 8  # the VAE halves the image three times (SD): sides are multiples of 8
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes (negative seeds alias 2**64 - |seed|)


def check_size(name: str, pixels: int) -> None:
    """Sides must be positive multiples of 8; the message suggests the nearest ones."""
    if pixels < SIZE_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}, at least {SIZE_MULTIPLE}, got {pixels}")
    if pixels % SIZE_MULTIPLE:
        lower = pixels // SIZE_MULTIPLE * SIZE_MULTIPLE
        raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {pixels}: "
                         f"try {lower} or {lower + SIZE_MULTIPLE}")


def check_seeds(first_seed: int, count: int, name: str = "seed") -> None:
    """Image i of a run uses first_seed + i: every one of the `count` seeds must be a generator's seed."""
    low, high = SEED_RANGE
    last = first_seed + count - 1
    if not low <= first_seed <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {first_seed}")
    if last > high:
        raise ValueError(f"{name} {first_seed} for {count} images: the last image's seed, {last}, is past the "
                         f"largest, {high}; use a seed of at most {high - count + 1}")


def finite(name: str, value: float) -> float:
    """nan and inf are no numbers a sampler can use (nan guidance would silently mean 'no guidance')."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value
