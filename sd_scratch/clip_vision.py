"""Images -> CLIP image embeddings: the vision tower of CLIP (a ViT), and the image preprocessing it was trained with.

Stable Diffusion 1.x's safety checker reads its pictures with it (safety_checker.py); image prompts
(IP-Adapter) read theirs with it too. The tower is the text tower's transformer (text_encoder.py) with
another front and back end:

    front   the image cut into patches of 14x14 pixels, each patch linearly mapped to `width` channels
            (a conv whose kernel and stride are the patch size), a learned "class" vector put before
            them, and a learned position embedding added: 224x224 pixels -> 1 + 16*16 = 257 tokens
    middle  a layer norm (`pre_layrnorm`, misspelt so in OpenAI's and transformers' weights), then N
            pre-norm layers exactly as the text tower's, except that attention is *not* causal: every
            patch sees every other patch, there being no left-to-right order in a picture
    back    the class token's output, layer-normed (`post_layernorm`): the pooled output, CLIP's summary
            of the image; (B, 1 + patches, width) is the last hidden state

    OpenAI CLIP ViT-L/14      width 1024, 24 layers, 16 heads, quick_gelu, 224 px   SD 1.x's safety checker
    OpenCLIP ViT-H/14         width 1280, 32 layers, 16 heads, gelu,       224 px   IP-Adapter's image encoder

The module tree mirrors transformers 4's `CLIPVisionModel` (`vision_model.embeddings.patch_embedding.weight`,
`vision_model.encoder.layers.3.self_attn.q_proj.weight`, ...), as stored in the files people download
(transformers 5 dropped the `vision_model.` level; loaders add it back). With `projection_dim`,
`visual_projection` as in `CLIPVisionModelWithProjection`.

CLIP's images are preprocessed as transformers' `CLIPImageProcessor` does it (`preprocess`): shortest side
resized to 224 with PIL's bicubic filter, centre crop 224x224, values scaled to [0, 1] and normalised
with the mean and standard deviation of CLIP's training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

# The text tower's layers without its causal mask: VisionConfig names width, heads, mlp_width, activation and
# layer_norm_eps as TextEncoderConfig does
from sd_scratch.text_encoder import EncoderLayer


@dataclass(frozen=True)
class VisionConfig:
    width: int = 1024
    layers: int = 24
    heads: int = 16  # heads of 64 channels
    mlp_width: int = 4096  # 4 * width
    patch_size: int = 14
    image_size: int = 224
    channels: int = 3
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # CLIPVisionModelWithProjection's `visual_projection`; None: none

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


CLIP_VIT_L14_VISION = VisionConfig()


class Embeddings(nn.Module):
    """Pixels -> tokens: [class vector, one vector per patch] + position embeddings."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        self.patch_embedding = nn.Conv2d(config.channels, config.width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.patches + 1, config.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # (B, width, 16, 16): one vector per 14x14 patch
        patches = patches.flatten(2).transpose(1, 2)  # (B, 256, width), patches in reading order
        cls = self.class_embedding.expand(len(patches), 1, -1)
        x = torch.cat([cls, patches], dim=1)  # (B, 257, width): the class token first
        return x + self.position_embedding.weight


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        # ModuleDicts only to reproduce the checkpoint's names, e.g. vision_model.encoder.layers.0.*
        self.vision_model = nn.ModuleDict(dict(
            embeddings=Embeddings(config),
            pre_layrnorm=nn.LayerNorm(config.width, eps=config.layer_norm_eps),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config, causal=False)
                                                            for _ in range(config.layers)))),
            post_layernorm=nn.LayerNorm(config.width, eps=config.layer_norm_eps),
        ))
        if config.projection_dim is not None:
            self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 224, 224) preprocessed pixels -> the last hidden state (B, 1 + patches, width) and the pooled
        output (B, width): the class token's, after `post_layernorm`, projected when the tower has a projection."""
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixel_values.to(model.pre_layrnorm.weight.dtype)))
        for layer in model.encoder.layers:
            x = layer(x)
        pooled = model.post_layernorm(x[:, 0])
        if self.config.projection_dim is not None:
            pooled = self.visual_projection(pooled)
        return x, pooled


# --- preprocessing: what CLIPImageProcessor does, step by step ---

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per channel, over CLIP's training images
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    """The fields of a `preprocessor_config.json` (a diffusers folder's `feature_extractor/`) that matter."""
    shortest_edge: int | None = 224  # resize so that the shorter side is this long (None: to resize_to)
    resize_to: tuple[int, int] | None = None  # (height, width), when the config says a fixed size instead
    resample: int = Image.Resampling.BICUBIC  # PIL's filter numbers: 3 is bicubic
    crop: tuple[int, int] | None = (224, 224)  # (height, width) of the centre crop; None: no crop
    rescale_factor: float | None = 1 / 255  # None: the values are not rescaled
    mean: tuple[float, ...] | None = CLIP_MEAN  # None: not normalised
    std: tuple[float, ...] = CLIP_STD


def preprocessing_from_config(config: dict) -> ImagePreprocessing:
    """A preprocessor_config.json's dict -> ImagePreprocessing. Two spellings exist: transformers 4.2x wrote
    `"size": 224, "crop_size": 224` (CLIPFeatureExtractor, as in the SD 1.x folders); later ones write
    `"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}`."""
    size = config.get("size", 224)
    shortest_edge, resize_to = size, None
    if isinstance(size, dict):
        shortest_edge = size.get("shortest_edge")
        if shortest_edge is None:
            resize_to = (size["height"], size["width"])
    crop = config.get("crop_size", 224)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return ImagePreprocessing(
        shortest_edge=shortest_edge if config.get("do_resize", True) else None,
        resize_to=resize_to if config.get("do_resize", True) else None,
        resample=config.get("resample", Image.Resampling.BICUBIC),
        crop=crop if config.get("do_center_crop", True) else None,
        rescale_factor=config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else None,
        mean=tuple(config.get("image_mean", CLIP_MEAN)) if config.get("do_normalize", True) else None,
        std=tuple(config.get("image_std", CLIP_STD)),
    )


def preprocess(images: list[Image.Image], preprocessing: ImagePreprocessing = ImagePreprocessing()) -> torch.Tensor:
    """PIL images of any sizes -> (B, 3, 224, 224) float32, as CLIPImageProcessor (its PIL backend) makes them.

    Resizing works on the 8-bit PIL image, so a picture is quantised to 8 bits before CLIP sees it
    (sd_scratch.images.to_pil does that for a tensor, rounding as diffusers does).
    """
    return torch.stack([_preprocess_one(image, preprocessing) for image in images])


def _preprocess_one(image: Image.Image, p: ImagePreprocessing) -> torch.Tensor:
    if "A" in image.getbands() or "transparency" in image.info:  # transparency -> onto white, as transformers 5 does
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    image = image.convert("RGB")
    if p.shortest_edge is not None:
        # The short side becomes shortest_edge; the long side is scaled alike and rounded *down* (int(), as
        # transformers does): a 512x768 picture becomes 224x336.
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = p.shortest_edge, int(p.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)  # PIL sizes are (width, height)
        image = image.resize(size, resample=p.resample)
    elif p.resize_to is not None:
        image = image.resize(p.resize_to[::-1], resample=p.resample)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8
    if p.crop is not None:
        x = _centre_crop(x, *p.crop)
    x = x.double()
    if p.rescale_factor is not None:
        x = x * p.rescale_factor  # [0, 255] -> [0, 1], in float64 as transformers does, then float32
    x = x.float()
    if p.mean is not None:
        x = (x - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)
    return x


def _centre_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The middle height x width of (C, H, W), the odd pixel left on the bottom/right (as transformers does).
    An image smaller than the crop (no CLIP config makes one) is first padded with zeros around it."""
    H, W = x.shape[-2:]
    if H < height or W < width:
        padded = x.new_zeros((x.shape[0], max(H, height), max(W, width)))
        top, left = (padded.shape[1] - H + 1) // 2, (padded.shape[2] - W + 1) // 2
        padded[:, top:top + H, left:left + W] = x
        x, H, W = padded, padded.shape[1], padded.shape[2]
    top, left = (H - height) // 2, (W - width) // 2
    return x[:, top:top + height, left:left + width]
