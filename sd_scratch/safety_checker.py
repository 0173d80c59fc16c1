"""Generated images -> flagged or not: the safety checker that Stable Diffusion 1.x's diffusers folders ship.

    checker = load_safety_checker("weights/stable-diffusion-v1-5")  # its safety_checker/ + feature_extractor/
    verdicts = checker.check(images)                                 # (B, 3, H, W) in [0, 1], or PIL images
    images, blacked = black_out(images, verdicts)                    # flagged images -> black

(load_safety_checker is in loading/safety_checker_file.py; networks do not read files.)

It is CLIP, used as CLIP is meant to be used: the picture is embedded with CLIP's ViT-L/14 vision tower
(clip_vision.py) and `visual_projection` into CLIP's joint image-text space (768 numbers), then compared
by cosine similarity with 17 "concept" embeddings and 3 "special care" embeddings. These 20 vectors were
stored as embeddings, not as words: what they stand for was never published (Rando et al. 2022, "Red-Teaming
the Stable Diffusion Safety Filter", recovered them as CLIP text embeddings of words about nudity and sexual
content, "special care" being about minors). Each has its own threshold (`concept_embeds_weights`,
`special_care_embeds_weights`). For every image:

    special_score[j] = round(cos(image, special_care_embeds[j]) - special_threshold[j] + adjustment, 3)
    adjustment       = 0 until a special-care score is > 0, then 0.01, for the special-care concepts after
                       that one and for every concept: an image near a special-care concept is judged more strictly
    concept_score[j] = round(cos(image, concept_embeds[j]) - concept_threshold[j] + adjustment, 3)
    flagged          = any concept_score > 0

exactly as diffusers' `StableDiffusionSafetyChecker.forward` computes it, rounding included (a score of
0.0004 rounds to 0.0 and does not flag). Its `forward_onnx` differs in two small ways: no rounding, and
the adjustment applies to the concepts only, not to the later special-care ones.

A flagged image is replaced by a black one (zeros), as diffusers does. SD 2.x and SDXL folders ship no checker.

The module tree is diffusers' `StableDiffusionSafetyChecker` as stored in SD 1.x folders, e.g.
`vision_model.vision_model.encoder.layers.0.self_attn.q_proj.weight` (a CLIPVisionModel named `vision_model`,
whose own tree begins with `vision_model.` in transformers 4). loading/safety_checker_file.py reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sd_scratch.clip_vision import ImagePreprocessing, VisionConfig, VisionTower, preprocess
from sd_scratch.images import to_pil

SPECIAL_CARE_ADJUSTMENT = 0.01  # diffusers: "increase this value to create a stronger nsfw filter"


@dataclass(frozen=True)
class SafetyCheckerConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # CLIP ViT-L/14's
    projection_dim: int = 768  # CLIP ViT-L/14's joint image-text space
    concepts: int = 17
    special_care_concepts: int = 3


@dataclass(frozen=True)
class Verdict:
    """The safety checker's verdict on one image. Scores are rounded to 3 decimals; > 0 means the concept fired."""
    flagged: bool  # any concept fired: the image is blacked out
    concept_scores: tuple[float, ...]
    special_scores: tuple[float, ...]

    @property
    def concepts(self) -> list[int]:
        """The indices of the concepts that fired (diffusers' `bad_concepts`)."""
        return [j for j, score in enumerate(self.concept_scores) if score > 0]

    @property
    def special_care(self) -> list[int]:
        return [j for j, score in enumerate(self.special_scores) if score > 0]


class SafetyChecker(nn.Module):
    def __init__(self, config: SafetyCheckerConfig):
        super().__init__()
        self.config = config
        self.preprocessing = ImagePreprocessing()  # the loader sets the folder's feature_extractor/ config
        self.vision_model = VisionTower(config.vision)
        self.visual_projection = nn.Linear(config.vision.width, config.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.empty(config.concepts, config.projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.empty(config.special_care_concepts, config.projection_dim),
                                                requires_grad=False)
        # Despite the name, these are thresholds: how close to a concept an image must come for it to fire.
        self.concept_embeds_weights = nn.Parameter(torch.empty(config.concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.empty(config.special_care_concepts), requires_grad=False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 224, 224) preprocessed pixels -> concept scores (B, concepts) and special scores
        (B, special_care_concepts), float32, rounded to 3 decimals; a score > 0 means the concept fired."""
        _, pooled = self.vision_model(pixel_values)
        image_embeds = self.visual_projection(pooled).float()  # scores in float32 whatever the weights' dtype
        special_cos = cosine_similarity(image_embeds, self.special_care_embeds.float())
        concept_cos = cosine_similarity(image_embeds, self.concept_embeds.float())
        special_thresholds = self.special_care_embeds_weights.float()
        concept_thresholds = self.concept_embeds_weights.float()

        # One special-care concept at a time: once one fires, the ones after it are judged with the adjustment.
        adjustment = torch.zeros(len(image_embeds), device=image_embeds.device)
        special_scores = []
        for j in range(special_cos.shape[1]):
            score = torch.round(special_cos[:, j] - special_thresholds[j] + adjustment, decimals=3)
            adjustment = torch.where(score > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
            special_scores.append(score)
        concept_scores = torch.round(concept_cos - concept_thresholds + adjustment[:, None], decimals=3)
        return concept_scores, torch.stack(special_scores, dim=1)

    def check(self, images: torch.Tensor | list[Image.Image]) -> list[Verdict]:
        """A verdict per image: (B, 3, H, W) in [0, 1] (rounded to 8 bits first, as the saved PNG will be and as
        diffusers' pipelines do), or PIL images, any size."""
        pil_images = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
        weight = self.visual_projection.weight
        pixels = preprocess(pil_images, self.preprocessing).to(weight.device, weight.dtype)
        concept_scores, special_scores = self(pixels)
        rounded = lambda scores: tuple(round(score, 3) for score in scores.tolist())  # 0.05, not 0.0500000007
        return [Verdict(flagged=bool((concepts > 0).any()), concept_scores=rounded(concepts),
                        special_scores=rounded(special))
                for concepts, special in zip(concept_scores.cpu(), special_scores.cpu())]


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M): the cosine of the angle between each row of a and each row of b."""
    return F.normalize(a) @ F.normalize(b).T


def black_out(images, verdicts: list[Verdict]) -> tuple[torch.Tensor | list[Image.Image], list[int]]:
    """The images with the flagged ones replaced by black (zeros, as diffusers does), and the flagged indices.
    images: (B, 3, H, W) tensor (a new tensor is returned) or PIL images (a new list)."""
    flagged = [i for i, verdict in enumerate(verdicts) if verdict.flagged]
    if isinstance(images, torch.Tensor):
        images = images.clone()
        images[flagged] = 0
        return images, flagged
    return [Image.new(image.mode, image.size) if i in flagged else image for i, image in enumerate(images)], flagged


def blacked_out_message(flagged: list[int], count: int) -> str | None:
    """One line saying which images were blacked out (numbered from 1), or None when none was."""
    if not flagged:
        return None
    which = ", ".join(str(i + 1) for i in flagged)
    return (f"the safety checker found potential NSFW content in image {which} of {count} and blacked it out; "
            "try another prompt or seed")
