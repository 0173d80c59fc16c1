"""Generated images -> flagged or not: the safety checker that Stable Diffusion 1.x's diffusers folders ship.

    checker = load_safety_checker("weights/stable-diffusion-v1-5")      # its safety_checker/ + feature_extractor/
    verdicts = checker.check(images)                                     # (B, 3, H, W) in [0, 1], or PIL images
    images, blacked = black_out(images, verdicts)                        # flagged images -> black

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
whose own tree begins with `vision_model.` in transformers 4).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sd_scratch.clip_vision import ImagePreprocessing, VisionConfig, VisionTower, preprocess, preprocessing_from_config
from sd_scratch.images import to_pil
from sd_scratch.loading.diffusers_folder import _read_json, _weights_file
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.strict import build_empty, fill_strictly
from sd_scratch.loading.tensor_file import TensorFile

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


# --- loading: a diffusers folder's safety_checker/ and feature_extractor/, strictly ---

TOWER = "vision_model.vision_model."  # our names (and transformers 4's files') for the vision tower's tensors
LAYER = re.compile(rf"{re.escape(TOWER)}encoder\.layers\.(\d+)\.")


def load_safety_checker(path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> SafetyChecker:
    """The safety checker of a diffusers SD 1.x folder (its safety_checker/ and feature_extractor/), or of a
    safety_checker folder given directly (its preprocessor_config.json beside the weights, or in a sibling
    feature_extractor/), filled strictly."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"safety checker not found: {path} is not a folder; give a diffusers SD 1.x folder "
                              "(with safety_checker/ and feature_extractor/) or its safety_checker/ folder")
    folder, preprocessor = _safety_checker_files(path)
    weights = _weights_file(folder, "model", fp16_first=dtype == torch.float16)
    file = TensorFile(weights)
    names = safety_checker_key_names(file.keys)
    config_json = _read_json(folder / "config.json")
    try:
        config = infer_safety_checker_config({ours: file.shape(theirs) for ours, theirs in names.items()},
                                             config_json.get("vision_config", {}))
    except KeyError as error:
        raise CheckpointError(f"{weights} holds no tensor {error.args[0]}: it is incomplete or not a Stable "
                              "Diffusion safety checker (StableDiffusionSafetyChecker)") from None
    loaders = {ours: (lambda theirs=theirs: file.get(theirs, device, dtype)) for ours, theirs in names.items()}
    checker = fill_strictly(build_empty(SafetyChecker, config), "safety checker", loaders, device, dtype,
                            str(weights), "StableDiffusionSafetyChecker",
                            question="is this a Stable Diffusion safety_checker/ folder?")
    checker.preprocessing = preprocessing_from_config(_read_json(preprocessor))
    return checker


def _safety_checker_files(path: Path) -> tuple[Path, Path]:
    """The folder holding the checker's weights, and its preprocessor_config.json; a one-line error for a gap."""
    if (path / "safety_checker").is_dir():
        folder, candidates = path / "safety_checker", [path / "feature_extractor" / "preprocessor_config.json"]
    elif (path / "unet").is_dir():
        raise CheckpointError(f"{path} has no safety_checker/ folder (SD 2.x and SDXL folders ship none); "
                              "run without the safety checker, or give an SD 1.x folder that has one")
    else:
        folder = path
        candidates = [path / "preprocessor_config.json", path.parent / "feature_extractor" / "preprocessor_config.json"]
    for candidate in candidates:
        if candidate.exists():
            return folder, candidate
    raise CheckpointError(f"{folder} has no feature_extractor/preprocessor_config.json beside it (the image "
                          f"preprocessing the checker needs, looked for as {' and '.join(map(str, candidates))}); "
                          "download the model's feature_extractor/ folder too")


def safety_checker_key_names(keys: list[str]) -> dict[str, str]:
    """Our key -> the file's key, for every tensor used. The SD 1.x folders (saved with transformers 4) hold
    our names plus `vision_model.vision_model.embeddings.position_ids`, a constant 0..256 never read.
    transformers 5 saves the tower one level up (`vision_model.embeddings...`): that level is put back."""
    names = {}
    for key in keys:
        if key.endswith("embeddings.position_ids"):
            continue
        ours = key
        if key.startswith("vision_model.") and not key.startswith(TOWER):
            ours = TOWER + key.removeprefix("vision_model.")
        names[ours] = key
    return names


def infer_safety_checker_config(shapes: dict[str, torch.Size], vision_json: dict) -> SafetyCheckerConfig:
    """The sizes read off the tensors' shapes; the heads (no tensor shows them), the activation and the layer
    norm's epsilon from config.json's vision_config, when it names them (else CLIP's: 64 channels a head)."""
    width, channels, patch_size, _ = shapes[TOWER + "embeddings.patch_embedding.weight"]
    positions = shapes[TOWER + "embeddings.position_embedding.weight"][0]
    layers = {int(match[1]) for key in shapes if (match := LAYER.match(key))}
    fc1 = [shape for key, shape in shapes.items() if LAYER.match(key) and key.endswith(".mlp.fc1.weight")]
    mlp_width = fc1[0][0] if fc1 else 4 * width  # (a layer without it is named by the strict fill)
    vision = VisionConfig(
        width=width, layers=len(layers), heads=vision_json.get("num_attention_heads", width // 64),
        mlp_width=mlp_width, patch_size=patch_size, image_size=math.isqrt(positions - 1) * patch_size,
        channels=channels, activation=vision_json.get("hidden_act", "quick_gelu"),
        layer_norm_eps=vision_json.get("layer_norm_eps", 1e-5),
    )
    if vision.activation not in ("quick_gelu", "gelu") or vision.width % vision.heads:
        raise CheckpointError(f"the safety checker's config.json names hidden_act {vision.activation!r} and "
                              f"{vision.heads} heads for width {vision.width}: sd_scratch knows CLIP's quick_gelu "
                              "or gelu, with heads dividing the width")
    return SafetyCheckerConfig(vision=vision, projection_dim=shapes["visual_projection.weight"][0],
                               concepts=shapes["concept_embeds"][0],
                               special_care_concepts=shapes["special_care_embeds"][0])
