"""Pictures in and out: tensors <-> PIL images, grids, PNG files with their generation parameters."""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded to 8 bits as diffusers does."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


# PIL modes that hold more than 8 bits per pixel, and the value of white in each. A 16-bit grayscale
# PNG opens as "I;16" (or "I" in older Pillow): convert("RGB") would clip it at 255, nearly all white.
HIGH_DEPTH_WHITE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}


def from_pil(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image -> (1, 3, H, W) in [-1, 1], the VAE encoder's input; resized (Lanczos) if its size differs.

    8-bit images map 0..255 to [-1, 1]; 16-bit grayscale ones map 0..65535, and 32-bit float ones 0..1,
    with their full depth (a gray picture is its gray in all three channels).
    """
    if image.mode in HIGH_DEPTH_WHITE:
        gray = np.asarray(image, dtype=np.float32) / HIGH_DEPTH_WHITE[image.mode]
        gray = Image.fromarray(np.clip(gray, 0, 1))  # float32: mode "F", resized in full precision, then made RGB
        if gray.size != (width, height):
            gray = gray.resize((width, height), resample=Image.LANCZOS)
        array = np.repeat(np.clip(np.asarray(gray, dtype=np.float32), 0, 1)[:, :, None], 3, axis=2)
    else:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] * 2 - 1


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
    the PNG is written whole under a temporary name, then given its name only if nothing has it."""
    if not claim(png_bytes(image, parameters), path):
        raise FileExistsError(f"{path} exists: sd_scratch never overwrites a file")
    return path


def save_numbered(image: Image.Image, folder: Path, prefix: str, parameters: str | None = None) -> Path:
    """Write `folder/{prefix}-NNNNN.png` under the first free number, and return its path.

    Safe when several runs write into one folder at once: the number is claimed atomically (a run that
    finds it taken between looking and claiming moves on to the next), so none collides or overwrites.
    """
    data = png_bytes(image, parameters)
    number = next_free_number(folder, prefix)
    while not claim(data, folder / f"{prefix}-{number:05d}.png"):
        number += 1  # another run took it after we looked
    return folder / f"{prefix}-{number:05d}.png"


def png_bytes(image: Image.Image, parameters: str | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def claim(data: bytes, path: Path) -> bool:
    """Give `data` the name `path` if no file has it: True if it did, False if the name was taken.

    The bytes go to a temporary file in the same folder, which is then hard-linked to the name: a link
    fails, atomically, if the name exists, so two processes can never both claim one name, and a reader
    never sees a half-written file. (Where the file system has no hard links, the name is created
    exclusively and written, which is exclusive too, but not invisible while it is written.)
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FAT file systems)
            try:
                with open(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
        return True
    finally:
        os.unlink(temporary)


def next_free_number(folder: Path, prefix: str) -> int:
    """The number after the highest `{prefix}-NNNNN...png` in folder, so new files never replace old ones."""
    numbers = [int(name[len(prefix) + 1:len(prefix) + 6]) for name in os.listdir(folder)
               if name.startswith(prefix + "-") and name.endswith(".png") and name[len(prefix) + 1:len(prefix) + 6].isdigit()]
    return max(numbers, default=-1) + 1
