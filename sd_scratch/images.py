"""Pictures in and out: tensors <-> PIL images, grids, PNG files with their generation parameters."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded to 8 bits as diffusers does."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def from_pil(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [-1, 1], the VAE encoder's input; resized (Lanczos) if its size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Lay images out in rows, as the original txt2img script's grid does."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def parameters_text(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The text chunk that image browsers read (the format made common by the AUTOMATIC1111 web UI):

        a red circle on a blue background
        Negative prompt: blurry
        Steps: 25, Sampler: Euler, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny_sd
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in settings.items()))
    return "\n".join(lines)


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as image:
        return image.text.get("parameters")


def save_png(image: Image.Image, path: Path, parameters: str | None = None) -> Path:
    """Write a PNG, with `parameters` in its text chunk. Never overwrites, never leaves half a file:
    the PNG is encoded in memory first, and the file is created with "x" (fail if it exists)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    with open(path, "xb") as f:
        f.write(buffer.getvalue())
    return path


def next_free_number(folder: Path, prefix: str) -> int:
    """The number after the highest `{prefix}-NNNNN...png` in folder, so new files never replace old ones."""
    numbers = [int(name[len(prefix) + 1:len(prefix) + 6]) for name in os.listdir(folder)
               if name.startswith(prefix + "-") and name.endswith(".png") and name[len(prefix) + 1:len(prefix) + 6].isdigit()]
    return max(numbers, default=-1) + 1
