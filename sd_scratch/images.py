"""Pictures in and out: tensors <-> PIL images, grids, PNG files with their generation parameters."""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from sd_scratch.checks import finite
# The A1111 labels of our samplers and schedule types: cli keeps torch-free copies of them (equal to samplers'
# and sample's, tests/test_robustness.py checks), and imports nothing of ours but checks, so no import cycle.
from sd_scratch.cli import SAMPLER_LABELS, SCHEDULE_LABELS, SPACINGS


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


# ---------------------------------------------------------------------------------------------------------------
# Masks for inpainting. White repaints, black keeps (the convention of diffusers and AUTOMATIC1111).


def mask_from_pil(image: Image.Image, blur: float = 0, invert: bool = False) -> torch.Tensor:
    """A mask picture -> (1, 1, H, W) in [0, 1], 1 where the picture is to be repainted: the soft mask.

    Read as grayscale (PIL's "L", ITU-R 601 luma, as diffusers' VaeImageProcessor reads masks), inverted if
    asked, then blurred with a Gaussian of radius `blur` pixels (PIL's, as diffusers' `blur`). What the model
    is given is this mask cut at 0.5 (`binarise`): blurring moves that edge outwards where the white region is
    convex and inwards where it is concave, and softens the optional paste-back, which uses the soft mask.
    """
    if image.mode in HIGH_DEPTH_WHITE:  # 16-bit or float masks: keep their scale, then 8 bits as "L" would
        gray = np.asarray(image, dtype=np.float32) / HIGH_DEPTH_WHITE[image.mode]
        image = Image.fromarray((np.clip(gray, 0, 1) * 255).round().astype(np.uint8))
    gray = image.convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    if blur > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]


def binarise(mask: torch.Tensor) -> torch.Tensor:
    """The mask the model is given: 1 (repaint) where the soft mask is at least 0.5, else 0, as diffusers' mask
    processor binarises it."""
    return (mask >= 0.5).to(mask.dtype)


def paste_back(original: torch.Tensor, result: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original pixels where the soft mask keeps them, the result where it repaints, blended between
    (AUTOMATIC1111's default overlay). All in [0, 1]; mask (1 or B, 1, H, W)."""
    mask = mask.to(result.device, result.dtype)
    return original.to(result.device, result.dtype) * (1 - mask) + result * mask


def extend_for_outpainting(image: Image.Image, left: int, top: int, right: int,
                           bottom: int) -> tuple[Image.Image, Image.Image]:
    """The picture on a larger canvas, and the mask of the new border (white). The border starts as the
    picture's edge pixels stretched outwards: at a strength below 1 the model starts from colours that
    continue the picture's, where noise or a flat fill would be read as a frame around it."""
    rgb = np.asarray(image.convert("RGB"))
    extended = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(extended.shape[:2], 255, dtype=np.uint8)
    mask[top:top + rgb.shape[0], left:left + rgb.shape[1]] = 0
    return Image.fromarray(extended), Image.fromarray(mask)


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
        lines.append(f"{NEGATIVE_PROMPT_PREFIX} {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote_value(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def quote_value(value) -> str:
    """A setting's value as A1111 writes it: as a JSON string if it holds a comma, a newline or a colon, which
    would otherwise end it, break the settings line or read as a key; else as it is. ("a, b" -> '"a, b"')

    Like A1111, a value without those characters is never quoted, even one that starts and ends with a double
    quote: that one reads back without its quotes (A1111 has the same blind spot; no value of ours is such).
    """
    text = str(value)
    if "," in text or "\n" in text or ":" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as image:
        return image.text.get("parameters")


# Reading an infotext back (--parameters-from): our PNGs' and the AUTOMATIC1111 web UI's. One from A1111:
#
#     a lighthouse on a cliff at dusk, oil painting
#     stormy sea, (dramatic light:1.2)
#     Negative prompt: blurry, lowres
#     Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768,
#         Model hash: 0123abcd45, Model: seascape_v2, TI hashes: "lowres_neg: 5d0e3fa1c2b7", Version: v1.10.1
#
# (the settings are one line, broken here to fit) becomes, in parse_parameters:
#     prompt           the lines before "Negative prompt:", joined: "a lighthouse ... oil painting\nstormy sea, ..."
#     negative_prompt  from that line on, without the prefix: "blurry, lowres"
#     settings         the last line's "Key: value" pairs, in order, unquoted, all strings:
#                      {"Steps": "30", "Sampler": "DPM++ 2M", ..., "TI hashes": "lowres_neg: 5d0e3fa1c2b7", ...}
# and, in settings_from_parameters, generate()'s keyword arguments:
#     steps=30, sampler="dpmpp_2m", schedule_type="karras", guidance=6.5, seed=1234, width=512, height=768,
#     (no "Clip skip": the model's own layer, the last for SD 1.x); nothing is reported as not understood,
#     since the hashes, model name and version only say what made the picture.

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# One "Key: value" of the settings line, as A1111 reads it. A key is a word character and at least one more
# word character, space, "-" or "/" (so "Schedule type", "Hires upscale", "SD/XL" but never a one-letter key).
# A value is a JSON string (which may hold commas) or else everything up to the next comma, spaces included;
# a quoted value that a comma does not follow is read the second way, quotes and all. Text that fits neither
# (a word with no colon) is passed over.
SETTING = re.compile(r"""
    \s* (\w [\w \-/]+) : \s*
    ( " (?: \\. | [^\\"] )+ "
    | [^,]* )
    (?: , | $)
""", re.VERBOSE)
FEWEST_SETTINGS = 3  # a last line with fewer pairs is a line of the prompt, not the settings (A1111's rule)
IMAGE_SIZE = re.compile(r"(\d+)x(\d+)")  # "Size: 512x768", width first


@dataclass(frozen=True)
class Parameters:
    """An infotext taken apart: what parse_parameters gives and settings_from_parameters reads."""
    prompt: str
    negative_prompt: str
    settings: dict[str, str]  # every "Key: value" of the last line, values unquoted, in order; "Size" as written


def parse_parameters(text: str) -> Parameters:
    """An infotext (parameters_text's, or A1111's) -> its prompt, negative prompt and settings, read as A1111
    reads them, so that a text either wrote means here what it means there:

    - the last line is the settings only if it holds at least 3 "Key: value" pairs; else it is prompt text
      (a prompt that only mentions "style: x" stays a prompt);
    - every other line is stripped of surrounding spaces; those before the first line that starts with
      "Negative prompt:" are the prompt, that line (without the prefix) and the rest the negative prompt, each
      joined with newlines, with empty lines at their start dropped;
    - quoted values are unquoted (JSON); a value that fails to unquote is kept as written;
    - a key with an empty value ("Key: ,") is left out, as A1111 leaves it out (its parser fails on it).
    A key written twice keeps its first place and its last value.
    """
    *lines, last_line = text.strip().split("\n")
    pairs = SETTING.findall(last_line)
    if len(pairs) < FEWEST_SETTINGS:
        lines.append(last_line)
        pairs = []
    prompt_lines, negative_lines = [], []
    in_negative_prompt = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):  # a later line with the prefix loses it too, as in A1111
            in_negative_prompt = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        (negative_lines if in_negative_prompt else prompt_lines).append(line)
    settings = {key: unquote_value(value) for key, value in pairs if value}
    return Parameters("\n".join(prompt_lines).lstrip("\n"), "\n".join(negative_lines).lstrip("\n"), settings)


def unquote_value(text: str) -> str:
    """quote_value undone: a value in double quotes is a JSON string; one that does not decode stays as it is."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


# Fields that say what made the picture, not how: taken in silence. (A different model or VAE does change the
# picture, but the one to use is the checkpoint given on the command line; these only name or hash it.)
INFORMATIONAL_SETTINGS = frozenset({
    "Model", "Model hash", "VAE", "VAE hash", "Version", "TI hashes", "Lora hashes", "Hashes", "Hypernet hash",
    "Init image hash", "User", "Batch size", "Batch pos",  # A1111; every image of a batch has its own seed
    "Preview every",  # ours, on the strip of intermediate steps
})
# Schedule types that mean "the sampler's own spacing of the steps", our default (schedule_type None): A1111
# writes "Automatic" for a sampler that has no schedule of its own and so walks the model's noise levels,
# which its "Uniform" does too. Absent means the same: A1111 and describe() write a schedule only when there is one.
DEFAULT_SCHEDULE_LABELS = ("Automatic", "Uniform")


def settings_from_parameters(parameters: Parameters) -> tuple[dict, list[str]]:
    """The settings sd_scratch can honour, as sample.generate's keyword arguments, and the keys of those it
    cannot (in the text's order, for one warning), from the settings of parse_parameters.

    Understood: Steps, Sampler (A1111's label; an old one such as "DPM++ 2M Karras" carries the schedule type),
    Schedule type, CFG scale, Seed, Size, Clip skip, Denoising strength, Eta (and A1111's "Eta DDIM"),
    Spacing (ours). Informational ones (INFORMATIONAL_SETTINGS) are dropped in silence; every other key is one
    that changes the picture where it was made (hires fix, variation seeds, the RNG, sigma overrides, face
    restoration, extensions' fields...) and is reported. Empty settings (a PNG that had only a prompt) give {}.
    Raises ValueError, in one line, for a sampler or schedule type we lack and for a malformed number.
    """
    settings, not_understood = {}, []
    for key, value in parameters.settings.items():
        if key == "Steps":
            settings["steps"] = whole_number(key, value)
        elif key == "Sampler":
            settings["sampler"], schedule_in_name = sampler_name(value)
            if schedule_in_name is not None:
                settings["schedule_type"] = schedule_in_name
        elif key == "Schedule type":
            settings.setdefault("schedule_type", schedule_type_name(value))  # A1111: the sampler label's wins
        elif key == "CFG scale":
            settings["guidance"] = real_number(key, value)
        elif key == "Seed":
            settings["seed"] = whole_number(key, value)
        elif key == "Size":
            size = IMAGE_SIZE.fullmatch(value.strip())
            if size is None:
                raise ValueError(f"Size {value!r} in the parameters is not WIDTHxHEIGHT, such as 512x768")
            settings["width"], settings["height"] = int(size[1]), int(size[2])
        elif key == "Clip skip":
            layers = whole_number(key, value)  # counted from the last layer, 1; skip_last_layers counts those left out
            if layers < 1:
                raise ValueError(f"Clip skip {value!r} in the parameters is below 1, the last layer")
            settings["skip_last_layers"] = layers - 1
        elif key == "Denoising strength":
            settings["strength"] = real_number(key, value)
        elif key in ("Eta", "Eta DDIM"):  # A1111 writes "Eta DDIM" for DDIM-like samplers, "Eta" for the others
            settings["eta"] = real_number(key, value)
        elif key == "Spacing":
            if value not in SPACINGS:
                raise ValueError(f"Spacing {value!r} in the parameters is none of ours: {', '.join(SPACINGS)}")
            settings["spacing"] = value
        elif key not in INFORMATIONAL_SETTINGS:
            not_understood.append(key)
    # No "Clip skip": the model's own (SD 1.x reads the last layer, SD 2.x the penultimate). describe() writes the
    # field whenever the model's own is not the last layer, or another was asked for.
    if settings.get("schedule_type", "") is None:
        del settings["schedule_type"]  # "Automatic": generate's own default
    return settings, not_understood


def sampler_name(label: str) -> tuple[str, str | None]:
    """A1111's sampler label -> our sampler's name, and the schedule type its label carries, if any.

    Before v1.9 A1111 had no "Schedule type": a Karras variant was a sampler of its own, "DPM++ 2M Karras"
    (also "DPM++ SDE Karras", "DPM++ 2M SDE Exponential"); such a suffix is read as the schedule type. Case is
    ignored, and our own names ("dpmpp_2m") are understood too.
    """
    names = {text.lower(): name for name, sampler_label in SAMPLER_LABELS.items() for text in (name, sampler_label)}
    if label.lower() in names:
        return names[label.lower()], None
    suffixes = [*SCHEDULE_LABELS.values(), *DEFAULT_SCHEDULE_LABELS]
    for suffix in sorted(suffixes, key=len, reverse=True):  # "SGM Uniform" before "Uniform"
        if label.lower().endswith(" " + suffix.lower()):
            base = label[:-len(suffix)].rstrip(" ").lower()
            if base in names:
                return names[base], schedule_type_name(suffix)
    raise ValueError(f"sampler {label!r} in the parameters is none of ours: {', '.join(SAMPLER_LABELS.values())}")


def schedule_type_name(label: str) -> str | None:
    """A1111's "Schedule type" -> our schedule_type; None for the sampler's own spacing (our default)."""
    if label.lower() in (text.lower() for text in DEFAULT_SCHEDULE_LABELS):
        return None
    for name, schedule_label in SCHEDULE_LABELS.items():
        if label.lower() in (name, schedule_label.lower()):
            return name
    raise ValueError(f"schedule type {label!r} in the parameters is none of ours: "
                     f"{', '.join([*DEFAULT_SCHEDULE_LABELS, *SCHEDULE_LABELS.values()])}")


def whole_number(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} {value!r} in the parameters is not a whole number") from None


def real_number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} {value!r} in the parameters is not a number") from None
    return finite(f"{key} in the parameters", number)  # "nan" and "inf" parse, but no sampler can use them


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
