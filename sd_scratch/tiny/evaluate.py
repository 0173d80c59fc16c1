"""Does the tiny model draw what it is asked? Scored from the pixels alone, with no learned classifier.

    python -m sd_scratch.tiny.evaluate                      # every sampler x guidance 1, 3, 7.5
    python -m sd_scratch.tiny.evaluate --samplers euler --guidance 7.5 --count 50

For each (prompt, seed) pair it generates an image and reads back three things:

  background  the per-channel median of the 2-pixel border, named by the nearest palette colour
  foreground  the pixels far from that background colour (the shape's mask); the median of the
              mask's inner pixels, named by the nearest palette colour
  shape       a triangle (apex up) is narrow at the top: its mask is about 1/3 as wide a quarter
              of the way down its bounding box as it is three quarters of the way down, where a
              circle or a square is as wide. Of the two, a square fills all of its bounding box,
              a circle pi/4 = 0.785 of it.

The prompts are every colour x shape x background combination (8 * 3 * 7 = 168), each at two seeds,
shuffled with a fixed seed so that a `--count` prefix is a fair sample of them. `--check-scorer`
scores the training images themselves: the scorer should be right on (nearly) all of them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sd_scratch.loading import load_checkpoint
from sd_scratch.sample import generate
from sd_scratch.samplers import SAMPLER_NAMES, check_guidance, needs_unconditional
from sd_scratch.tiny.dataset import (COLOURS, IMAGE_SIZE, SHAPES, Scene, caption, palette_tensor, random_scenes,
                                    render)

BORDER = 2  # pixels of the image edge read as background
# A pixel belongs to the shape if it is this far (RGB distance, channels in [0, 1]) from the background:
# half the distance between the two closest palette colours (yellow and orange, 0.36).
FOREGROUND_DISTANCE = 0.18
FIRST_SEED = 1000  # the evaluation's k-th prompt uses seed FIRST_SEED + k
MIN_SHAPE_PIXELS = 16  # fewer pixels than this (after cleaning) is "no shape drawn"
# Width at 1/4 of the height / width at 3/4: 1/3 for a triangle, 1 for a circle or a square.
TRIANGLE_BELOW = (1 / 3 + 1) / 2
# Fraction of the bounding box filled: 1 for a square, pi/4 for a circle; decide at the midpoint.
SQUARE_ABOVE = (1 + math.pi / 4) / 2  # 0.89
# The diamond that the LoRA of train_lora.py teaches (read only by read_image_with_diamonds). It is as wide
# at 1/4 as at 3/4 of its height (taper 1, so read_image calls it a circle or a square), and there it is half as
# wide as at its middle (its waist, 1/2), where a circle is 0.85 as wide (over the same bands) and a square as
# wide. The VAE rounds a small diamond's corners: 400 dataset diamonds, encoded and decoded, have waists 0.56
# to 0.76, 400 circles 0.80 to 0.91; the threshold lies between.
DIAMOND_BELOW = 0.78
# A blob with dents can have a narrow waist too, so the mask must also be the diamond of its own bounding box
# (corners at the middles of its sides), intersection over union above this: the decoded diamonds above have
# 0.66 to 0.92 (99% above 0.69), circles 0.58 to 0.71, squares 0.5.
DIAMOND_OVERLAP_ABOVE = 0.7

PALETTE_NAMES = list(COLOURS)
PALETTE = palette_tensor(PALETTE_NAMES)  # (8, 3) in [0, 1]


@dataclass(frozen=True)
class Reading:
    """What the pixels say; None where nothing could be read (no shape found)."""

    colour: str | None
    shape: str | None
    background: str
    taper: float  # the shape's width a quarter of the way down / three quarters of the way down
    fill: float  # the fraction of the bounding box covered by the shape


def nearest_colour(rgb: torch.Tensor) -> str:
    return PALETTE_NAMES[int(torch.cdist(rgb[None].float(), PALETTE).argmin())]


def shape_from_mask(mask: torch.Tensor) -> tuple[str, float, float]:
    """A (H, W) boolean mask of one shape -> (shape name, taper, fill)."""
    rows, columns = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    top, height = int(rows.min()), int(rows.max() - rows.min()) + 1
    box_width = int(columns.max() - columns.min()) + 1
    fill = float(mask.sum()) / (height * box_width)
    # Mean width of the rows in the bands around 1/4 and 3/4 of the height.
    widths = mask.sum(dim=1).float()
    upper = widths[top + height // 8: top + 3 * height // 8 + 1].mean()
    lower = widths[top + 5 * height // 8: top + 7 * height // 8 + 1].mean()
    taper = float(upper / lower.clamp(min=1))
    if taper < TRIANGLE_BELOW:
        return "triangle", taper, fill
    return ("square" if fill > SQUARE_ABOVE else "circle"), taper, fill


def waist(mask: torch.Tensor) -> float:
    """A (H, W) boolean mask of one shape -> the mean width of its rows around 1/4 and 3/4 of its height
    (the bands of shape_from_mask), over the width of its widest row: 1/2 for a diamond."""
    rows = mask.any(dim=1).nonzero()[:, 0]
    top, height = int(rows.min()), int(rows.max() - rows.min()) + 1
    widths = mask.sum(dim=1).float()
    upper = widths[top + height // 8: top + 3 * height // 8 + 1].mean()
    lower = widths[top + 5 * height // 8: top + 7 * height // 8 + 1].mean()
    return float((upper + lower) / 2 / widths.max().clamp(min=1))


def find_shape(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image (3, H, W) in [0, 1] -> (background RGB, the shape's (H, W) mask, the mask's inner pixels)."""
    height, width = image.shape[1:]
    border = torch.ones(height, width, dtype=torch.bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background_rgb = image[:, border].median(dim=1).values

    far = (image - background_rgb[:, None, None]).norm(dim=0) > FOREGROUND_DISTANCE
    # Morphological opening (erode, then dilate, 3 x 3) removes stray pixels and thin fringes.
    eroded = -F.max_pool2d(-far[None, None].float(), 3, stride=1, padding=1)
    mask = F.max_pool2d(eroded, 3, stride=1, padding=1)[0, 0].bool() & far
    return background_rgb, mask, eroded[0, 0].bool()


def read_image(image: torch.Tensor) -> Reading:
    """One image (3, H, W) in [0, 1] -> its colours and shape."""
    return read_found_shape(image, *find_shape(image))


def read_found_shape(image: torch.Tensor, background_rgb: torch.Tensor, mask: torch.Tensor,
                     inner: torch.Tensor) -> Reading:
    """read_image, given what find_shape found in `image`: for callers that need the mask as well."""
    background = nearest_colour(background_rgb)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return Reading(None, None, background, 0.0, 0.0)
    # The colour from the inside of the shape, away from its anti-aliased edge.
    colour = nearest_colour(image[:, inner].median(dim=1).values)
    shape, taper, fill = shape_from_mask(mask)
    return Reading(colour, shape, background, taper, fill)


def box_diamond(mask: torch.Tensor) -> torch.Tensor:
    """The diamond inscribed in the bounding box of a (H, W) boolean mask (corners at the middles of its sides),
    as a mask of pixel centres."""
    rows, columns = mask.any(dim=1).nonzero()[:, 0], mask.any(dim=0).nonzero()[:, 0]
    centre_y, centre_x = float(rows.min() + rows.max()) / 2, float(columns.min() + columns.max()) / 2
    half_height, half_width = float(rows.max() - rows.min() + 1) / 2, float(columns.max() - columns.min() + 1) / 2
    y = torch.arange(mask.shape[0], dtype=torch.float32)[:, None]
    x = torch.arange(mask.shape[1], dtype=torch.float32)[None, :]
    return (x - centre_x).abs() / half_width + (y - centre_y).abs() / half_height <= 1


def read_image_with_diamonds(image: torch.Tensor) -> Reading:
    """read_image, knowing one more shape: a shape read as a circle or a square is a diamond if its waist is
    narrow (below DIAMOND_BELOW) and it is the diamond of its bounding box (overlap above DIAMOND_OVERLAP_ABOVE).
    For judging the LoRA of train_lora.py; everything else reads pictures with read_image, which is unchanged."""
    background_rgb, mask, inner = find_shape(image)
    reading = read_found_shape(image, background_rgb, mask, inner)
    if reading.shape in ("circle", "square") and waist(mask) < DIAMOND_BELOW \
            and overlap(mask, box_diamond(mask)) > DIAMOND_OVERLAP_ABOVE:
        return replace(reading, shape="diamond")
    return reading


def overlap(mask: torch.Tensor, other: torch.Tensor) -> float:
    """Intersection over union of two boolean masks."""
    return float((mask & other).sum() / (mask | other).sum().clamp(min=1))


@dataclass(frozen=True)
class Score:
    colour: float  # fraction of images whose shape has the asked-for colour
    background: float
    shape: float
    count: int


def score(images: torch.Tensor, prompts: list[tuple[str, str, str]]) -> Score:
    """images (N, 3, H, W) in [0, 1]; prompts as (colour, shape, background) triples."""
    return score_readings([read_image(image) for image in images], prompts)


def score_readings(readings: list[Reading], prompts: list[tuple[str, str, str]]) -> Score:
    n = len(readings)
    return Score(
        colour=sum(r.colour == p[0] for r, p in zip(readings, prompts)) / n,
        background=sum(r.background == p[2] for r, p in zip(readings, prompts)) / n,
        shape=sum(r.shape == p[1] for r, p in zip(readings, prompts)) / n,
        count=n,
    )


def evaluation_prompts(repeats: int = 2, shuffle_seed: int = 0) -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) with background != colour, `repeats` times, shuffled.

    The k-th prompt of the list is generated with seed FIRST_SEED + k, so repeats get different
    seeds, and a batch of consecutive prompts is one `generate` call (image i uses seed + i).
    """
    triples = [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if b != c]
    prompts = triples * repeats
    random.Random(shuffle_seed).shuffle(prompts)
    return prompts


def check_scorer(count: int = 1000, seed: int = 12345) -> Score:
    """Score the dataset's own images: how often the scorer reads the truth from a perfect picture."""
    scenes = random_scenes(count, seed)
    images = (render(scenes) + 1) / 2
    return score(images, [(s.colour, s.shape, s.background) for s in scenes])


def evaluate(model, samplers, guidances, prompts, steps: int = 25, batch_size: int = 48):
    """Generate every prompt with every sampler and guidance scale; yields (sampler, guidance, Score, seconds)."""
    for sampler in samplers:
        for guidance in guidances:
            start = time.perf_counter()
            images = []
            for first in range(0, len(prompts), batch_size):
                batch = [caption(*triple) for triple in prompts[first:first + batch_size]]
                images.append(generate(model, batch, steps=steps, guidance=guidance, sampler=sampler,
                                       seed=FIRST_SEED + first, progress=False).images)
            yield sampler, guidance, score(torch.cat(images), prompts), time.perf_counter() - start


def empty_prompt_readings(model, count: int = 16, steps: int = 25, guidance: float = 7.5) -> list[Reading]:
    """What the empty prompt draws at `count` seeds: it should be any shape in any colours."""
    images = generate(model, [""] * count, steps=steps, guidance=guidance, seed=FIRST_SEED, progress=False).images
    return [read_image(image) for image in images]


IMG2IMG_START = ("red", "square", "white")
IMG2IMG_PROMPT = ("blue", "square", "yellow")
IMG2IMG_START_SCENE = Scene(*IMG2IMG_START, centre_x=30.0, centre_y=34.0, size=30.0)


# "Keeps the square": the output's shape reads as a square and covers the start's square, intersection
# over union above this. A square shifted by a sixth of its side still passes (IoU 5/7); one shifted by
# half its side (1/3), or one of half the side in the same place (1/4), does not.
IN_PLACE_ABOVE = 0.5


@dataclass(frozen=True)
class ImageToImage:
    score: Score  # the prompt's colours and shape, read as for any generated image
    in_place: float  # fraction read as a square lying where the start's square was
    all_three: float  # fraction with both asked-for colours and the square in place: the whole task


def image_to_image_score(model, count: int = 8, strength: float = 0.5, steps: int = 25,
                         guidance: float = 7.5, sampler: str = "euler") -> ImageToImage:
    """Start from a picture of a red square and ask for a blue square on a yellow background."""
    start = render([IMG2IMG_START_SCENE])
    images = generate(model, [caption(*IMG2IMG_PROMPT)] * count, steps=steps, guidance=guidance,
                      sampler=sampler, seed=FIRST_SEED, init_image=start, strength=strength, progress=False).images
    return judge_image_to_image((start[0] + 1) / 2, images)


def judge_image_to_image(start: torch.Tensor, images: torch.Tensor) -> ImageToImage:
    """start (3, H, W) and images (N, 3, H, W) in [0, 1]."""
    start_mask = find_shape(start)[1]
    found = [find_shape(image) for image in images]  # (background RGB, mask, inner pixels) per picture
    readings = [read_found_shape(image, *shape) for image, shape in zip(images, found)]
    in_place = [r.shape == "square" and overlap(shape[1], start_mask) > IN_PLACE_ABOVE
                for r, shape in zip(readings, found)]
    colours = [(r.colour, r.background) == (IMG2IMG_PROMPT[0], IMG2IMG_PROMPT[2]) for r in readings]
    return ImageToImage(score_readings(readings, [IMG2IMG_PROMPT] * len(readings)), sum(in_place) / len(images),
                        sum(c and k for c, k in zip(colours, in_place)) / len(images))


# Inpainting: the picture of a red square on white, the square's box (grown by INPAINT_MARGIN pixels) masked,
# and a blue circle asked for. The tiny model has 4 UNet input channels: it inpaints by having the kept region
# put back after every step.
INPAINT_PROMPT = ("blue", "circle", "white")
INPAINT_MARGIN = 4


@dataclass(frozen=True)
class Inpainting:
    score: Score  # the prompt's colour, shape and background, read from the whole picture
    in_mask: float  # fraction whose found shape lies inside the mask (at least 90% of its pixels)
    all_three: float  # fraction read as a blue circle on white lying inside the mask
    outside_change: float  # the largest change outside the mask, on the [0, 1] scale (0 when pasted back)


def inpainting_start() -> tuple[torch.Tensor, torch.Tensor]:
    """The start picture (1, 3, S, S) in [-1, 1] and the mask (1, 1, S, S), 1 over the square's box."""
    start = render([IMG2IMG_START_SCENE])
    square = find_shape((start[0] + 1) / 2)[1]
    rows, columns = square.any(dim=1).nonzero(), square.any(dim=0).nonzero()
    top, bottom = int(rows.min()) - INPAINT_MARGIN, int(rows.max()) + INPAINT_MARGIN + 1
    left, right = int(columns.min()) - INPAINT_MARGIN, int(columns.max()) + INPAINT_MARGIN + 1
    mask = torch.zeros(1, 1, *start.shape[-2:])
    mask[..., max(top, 0):bottom, max(left, 0):right] = 1
    return start, mask


def inpainting_score(model, count: int = 50, steps: int = 25, guidance: float = 3.0, sampler: str = "euler",
                     paste_back: bool = True) -> Inpainting:
    """Repaint the red square's box of the start picture as a blue circle, `count` seeds from FIRST_SEED."""
    start, mask = inpainting_start()
    images = generate(model, [caption(*INPAINT_PROMPT)] * count, steps=steps, guidance=guidance, sampler=sampler,
                      seed=FIRST_SEED, init_image=start, mask=mask, paste_back=paste_back, progress=False).images
    found = [find_shape(image) for image in images]
    readings = [read_found_shape(image, *shape) for image, shape in zip(images, found)]
    inside = [bool(shape[1].any()) and bool((shape[1] & (mask[0, 0] > 0)).sum() >= 0.9 * shape[1].sum())
              for shape in found]
    asked = [(r.colour, r.shape, r.background) == INPAINT_PROMPT for r in readings]
    outside = ((images - (start + 1) / 2).abs() * (1 - mask)).amax().item()
    return Inpainting(score_readings(readings, [INPAINT_PROMPT] * count), sum(inside) / count,
                      sum(a and i for a, i in zip(asked, inside)) / count, outside)


def colour_latents(model, names: list[str]) -> torch.Tensor:
    """(len(names), C): each palette colour's VAE latent (rgb_latents), unscaled."""
    return rgb_latents(model, palette_tensor(names))


@torch.no_grad()
def rgb_latents(model, rgb: torch.Tensor) -> torch.Tensor:
    """(N, C): the VAE latent of each (N, 3) RGB colour in [0, 1], the posterior mean of a flat picture of it.

    It is the mean over the central half of the latent, away from the padded border; unscaled.
    """
    weight = model.vae.quant_conv.weight  # where the VAE lives, and in which dtype
    flat = rgb[:, :, None, None].expand(-1, -1, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    mean, _ = model.vae.encode(flat.to(weight.device, weight.dtype))
    size = mean.shape[-1]
    return mean[:, :, size // 4: size - size // 4, size // 4: size - size // 4].float().mean(dim=(2, 3))


def latent_colour_cosine(model, start: tuple[str, str] = (IMG2IMG_START[0], IMG2IMG_START[2]),
                         asked: tuple[str, str] = (IMG2IMG_PROMPT[0], IMG2IMG_PROMPT[2])) -> float:
    """Cosine between the VAE latents' (shape colour - background) of the start picture and of the prompt.

    `start` and `asked` are (shape colour, background) pairs, by default those of image_to_image_score.

    The conditioned model sees the start picture's shape through its contrast along the asked-for
    colours. A positive cosine shows it the asked-for shape where the old one is; a negative one
    shows it the colours swapped (weights/README.md).
    """
    centre = colour_latents(model, [*start, *asked])
    old, new = centre[0] - centre[1], centre[2] - centre[3]
    return float(old @ new / (old.norm() * new.norm()))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: weights/tiny_sd.safetensors")
    # (not euler_cfgpp, whose guidance is a lambda; not lcm, a sampler for models distilled for it)
    scale_samplers = [name for name in SAMPLER_NAMES if not needs_unconditional(name) and name != "lcm"]
    parser.add_argument("--samplers", nargs="+", default=scale_samplers, choices=SAMPLER_NAMES,
                        help="default: all but euler_cfgpp, whose guidance is a lambda in [0, 1]")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 7.5])
    parser.add_argument("--count", type=int, default=None, help="score only the first COUNT of the 336 pairs")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-scorer", action="store_true", help="only score the dataset's own images")
    parser.add_argument("--no-extras", action="store_true", help="skip the empty-prompt and image-to-image checks")
    args = parser.parse_args(argv)
    for sampler, guidance in itertools.product(args.samplers, args.guidance):
        try:
            check_guidance(sampler, guidance)
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)

    if args.check_scorer:
        result = check_scorer()
        print(f"scorer on {result.count} dataset images: colour {result.colour:.1%}, "
              f"background {result.background:.1%}, shape {result.shape:.1%}")
        return

    model = load_checkpoint(args.checkpoint)
    prompts = evaluation_prompts()[: args.count]
    print(f"{len(prompts)} prompt x seed pairs, {args.steps} steps")
    print(f"{'sampler':<17} {'guidance':>8} {'colour':>7} {'bg':>7} {'shape':>7} {'seconds':>8}")
    for sampler, guidance, result, seconds in evaluate(model, args.samplers, args.guidance, prompts, args.steps):
        print(f"{sampler:<17} {guidance:>8g} {result.colour:>7.1%} {result.background:>7.1%} "
              f"{result.shape:>7.1%} {seconds:>8.1f}", flush=True)
    if args.no_extras:
        return

    readings = empty_prompt_readings(model)
    kinds = {(r.colour, r.shape, r.background) for r in readings}
    print(f"empty prompt, {len(readings)} seeds: {len(kinds)} different (colour, shape, background), "
          f"{len({r.colour for r in readings} - {None})} shape colours, {len({r.background for r in readings})} "
          f"backgrounds, {len({r.shape for r in readings} - {None})} shapes, "
          f"{sum(r.shape is None for r in readings)} with no shape found")
    result = image_to_image_score(model)
    print(f"image to image, {caption(*IMG2IMG_START)} -> {caption(*IMG2IMG_PROMPT)!r} at strength 0.5: "
          f"colour {result.score.colour:.0%}, background {result.score.background:.0%}, "
          f"read as a square {result.score.shape:.0%}, square in place {result.in_place:.0%}, "
          f"all three {result.all_three:.0%}; latent cosine of {IMG2IMG_START[0]} - {IMG2IMG_START[2]} "
          f"with {IMG2IMG_PROMPT[0]} - {IMG2IMG_PROMPT[2]}: {latent_colour_cosine(model):+.2f}")
    for paste_back in (True, False):
        result = inpainting_score(model, paste_back=paste_back)
        print(f"inpainting the red square's box of {caption(*IMG2IMG_START)} -> {caption(*INPAINT_PROMPT)!r}, "
              f"50 seeds, paste-back {'on' if paste_back else 'off'}: all three {result.all_three:.0%}, "
              f"shape inside the mask {result.in_mask:.0%}, largest change outside it {result.outside_change:.3f}")


if __name__ == "__main__":
    main()
