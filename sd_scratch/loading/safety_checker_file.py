"""The safety checker (safety_checker.py) of a diffusers SD 1.x folder: its safety_checker/ weights and config, and
the image preprocessing of its feature_extractor/, read strictly.

    checker = load_safety_checker("weights/stable-diffusion-v1-5")
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from sd_scratch.clip_vision import VisionConfig, preprocessing_from_config
from sd_scratch.loading.diffusers_folder import _read_json, _weights_file
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.strict import build_empty, fill_strictly
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.safety_checker import SafetyChecker, SafetyCheckerConfig

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
