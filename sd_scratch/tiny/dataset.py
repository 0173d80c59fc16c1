"""The tiny model's training data: one plain shape on a plain background, drawn from a seed.

Every picture is described exactly by its caption and three numbers (where the shape is and how
big), so the text is the whole story and what a model draws can be checked from its pixels:

    "a red circle on a blue background"   colour, shape, background colour (never the same colour twice)

Shapes are drawn with anti-aliased edges: each pixel is covered by a 4 x 4 grid of sample points,
and the fraction of them inside the shape mixes the two colours. All three shapes fill the same
square bounding box of side `size`, so what tells them apart is how much of it they cover: a square
all of it, a circle pi/4, a triangle (apex up, base down) one half.

A fourth shape, the diamond (the box's square turned 45 degrees: its corners touch the middles of the
box's sides; one half of the box too), is drawn only when asked for (`shapes=NEW_SHAPES`): the shipped
model never saw one, and `train_lora.py` teaches it the word with a LoRA. The base dataset, its
palette, captions and random draws are the same with or without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 64
# Far apart in RGB, so a colour is named by its nearest palette entry even after a model's small errors.
COLOURS = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (250, 220, 20),
    "purple": (130, 30, 170),
    "orange": (250, 130, 0),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("diamond",)  # never in the tiny model's training data: what its LoRA teaches (train_lora.py)
SIZE_RANGE = (0.35, 0.7)  # side of the shape's bounding box, as a fraction of the image side
MARGIN = 3  # pixels of background always left around the shape, so the border shows the background
SUBSAMPLES = 4  # anti-aliasing: 4 x 4 sample points per pixel


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Scene:
    colour: str  # of the shape
    shape: str
    background: str
    centre_x: float  # in pixels, from the left edge of the image
    centre_y: float  # in pixels, from the top edge
    size: float  # side of the bounding box, in pixels

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def random_scenes(count: int, seed: int, image_size: int = IMAGE_SIZE,
                  shapes: tuple[str, ...] = SHAPES) -> list[Scene]:
    """`count` scenes drawn uniformly: any of `shapes`, any colour, any other colour behind it, any size and place."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high):
        return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)

    names = list(COLOURS)
    shape_indices = torch.randint(len(shapes), (count,), generator=generator)
    colours = torch.randint(len(names), (count,), generator=generator)
    # An offset of 1..7 around the palette: every background but the shape's own colour, equally often.
    backgrounds = (colours + torch.randint(1, len(names), (count,), generator=generator)) % len(names)
    sizes = uniform(*SIZE_RANGE) * image_size
    half = sizes / 2 + MARGIN
    centres_x = uniform(half, image_size - half)
    centres_y = uniform(half, image_size - half)
    return [
        Scene(names[c], shapes[s], names[b], float(x), float(y), float(size))
        for c, s, b, x, y, size in zip(colours.tolist(), shape_indices.tolist(), backgrounds.tolist(),
                                       centres_x, centres_y, sizes)
    ]


def coverage(scenes: list[Scene], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, S, S): the fraction of each pixel that lies inside the scene's shape, in [0, 1]."""
    # Sample points at (k + 0.5) / SUBSAMPLES inside each pixel; pixel (row i, column j) spans [j, j+1] x [i, i+1].
    points = (torch.arange(image_size * SUBSAMPLES, dtype=torch.float32) + 0.5) / SUBSAMPLES
    y, x = points[None, :, None], points[None, None, :]  # broadcast to (N, rows, columns)

    def column(values):
        return torch.tensor(values, dtype=torch.float32)[:, None, None]

    cx, cy = column([s.centre_x for s in scenes]), column([s.centre_y for s in scenes])
    half = column([s.size / 2 for s in scenes])
    dx, dy = x - cx, y - cy

    def inside(shape):
        if shape == "circle":
            return dx**2 + dy**2 <= half**2
        if shape == "square":
            return (dx.abs() <= half) & (dy.abs() <= half)
        if shape == "triangle":
            # Apex at the top centre, base along the bottom: the half-width grows from 0 to `half`
            # over the height 2 * half, i.e. |dx| <= (dy + half) / 2, above the base.
            return (dx.abs() <= (dy + half) / 2) & (dy <= half)
        if shape == "diamond":  # corners at the middles of the box's sides
            return dx.abs() + dy.abs() <= half
        raise ValueError(f"unknown shape {shape!r}")

    all_shapes = SHAPES + NEW_SHAPES
    shape_index = column([all_shapes.index(s.shape) for s in scenes])
    mask = torch.zeros(len(scenes), image_size * SUBSAMPLES, image_size * SUBSAMPLES, dtype=torch.bool)
    for i, shape in enumerate(all_shapes):
        if (shape_index == i).any():  # the base shapes' masks as before; a diamond's only where one is drawn
            mask |= inside(shape) & (shape_index == i)
    # Average each SUBSAMPLES x SUBSAMPLES block of sample points into its pixel.
    return torch.nn.functional.avg_pool2d(mask.float()[:, None], SUBSAMPLES)[:, 0]


def render(scenes: list[Scene], image_size: int = IMAGE_SIZE, chunk: int = 256) -> torch.Tensor:
    """Scenes -> images (N, 3, S, S) in [-1, 1], the range the VAE encodes."""
    images = []
    for start in range(0, len(scenes), chunk):
        part = scenes[start:start + chunk]
        alpha = coverage(part, image_size)[:, None]  # (n, 1, S, S)
        foreground = palette_tensor([s.colour for s in part])[:, :, None, None]
        background = palette_tensor([s.background for s in part])[:, :, None, None]
        images.append(background + alpha * (foreground - background))
    return torch.cat(images) * 2 - 1


def palette_tensor(names: list[str]) -> torch.Tensor:
    """Colour names -> (N, 3) RGB in [0, 1]."""
    return torch.tensor([COLOURS[n] for n in names], dtype=torch.float32) / 255


def make_dataset(count: int, seed: int, image_size: int = IMAGE_SIZE,
                 shapes: tuple[str, ...] = SHAPES) -> tuple[torch.Tensor, list[str]]:
    """`count` images (N, 3, S, S) in [-1, 1] and their captions, the same for the same seed."""
    scenes = random_scenes(count, seed, image_size, shapes)
    return render(scenes, image_size), [s.caption for s in scenes]
