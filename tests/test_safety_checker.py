"""The safety checker against diffusers' StableDiffusionSafetyChecker and transformers' CLIP vision tower and
CLIPImageProcessor, on a small random checker saved as a diffusers folder's safety_checker/ + feature_extractor/."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig

from sd_scratch.clip_vision import preprocess, preprocessing_from_config
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.safety_checker_file import load_safety_checker
from sd_scratch.safety_checker import black_out, blacked_out_message

try:  # transformers 5: CLIPImageProcessor is the torchvision one, its PIL twin has its own name
    from transformers import CLIPImageProcessorPil
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

SIZES = [(300, 200), (200, 301), (224, 224), (97, 150), (512, 768)]  # (width, height): wide, tall, exact, small


def pictures() -> list[Image.Image]:
    """Smooth random pictures (a coarse noise grid, enlarged) so that the bicubic filter has something to do."""
    generator = np.random.default_rng(0)
    images = []
    for width, height in SIZES:
        coarse = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        noise = generator.integers(-20, 21, (height, width, 3))
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=int)
        images.append(Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)))
    return images


def reference_embeds(reference: StableDiffusionSafetyChecker, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(reference.visual_projection(reference.vision_model(pixels)[1]))


def set_concepts(reference: StableDiffusionSafetyChecker, pixels: torch.Tensor) -> list[bool]:
    """Concepts placed so that, over the five pictures, 0 is clean, 1 fires a concept, 2 fires a special-care
    concept and so a concept it comes within 0.004 of (the 0.01 adjustment; it fires the next special-care
    concept too), 3 comes within 0.004 of a concept without special care and stays clean, 4 is clean.

    Each concept that targets a picture is its row of the dual basis of the pictures' embeddings: its cosine
    with the target is some c > 0, with every other picture 0 (up to rounding), so the thresholds are exact."""
    embeds = reference_embeds(reference, pixels).double()  # (5, D), unit rows
    dual = torch.linalg.pinv(embeds)  # (D, 5): embeds @ dual = identity
    cos = lambda target: float(1 / dual[:, target].norm())  # the target's cosine with its dual vector
    d = embeds.shape[1]
    null = torch.eye(d, dtype=torch.float64) - embeds.T @ dual.T  # projects onto what no picture has
    random = torch.randn(d, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    never = torch.nn.functional.normalize(null @ random, dim=0).T  # 20 directions at cosine 0 with every picture
    concepts, concept_thresholds = never[:17].clone(), torch.full((17,), 0.3, dtype=torch.float64)
    special, special_thresholds = never[17:].clone(), torch.full((3,), 0.2, dtype=torch.float64)
    for j, target, margin in [(0, 1, 0.05), (1, 2, -0.004), (2, 3, -0.004)]:  # score = cos - threshold
        concepts[j], concept_thresholds[j] = dual[:, target], cos(target) - margin
    for j, target, margin in [(0, 2, 0.05), (1, 2, -0.004)]:
        special[j], special_thresholds[j] = dual[:, target], cos(target) - margin
    with torch.no_grad():
        reference.concept_embeds.copy_(concepts)
        reference.concept_embeds_weights.copy_(concept_thresholds)
        reference.special_care_embeds.copy_(special)
        reference.special_care_embeds_weights.copy_(special_thresholds)
    return [False, True, True, False, False]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A diffusers folder with a small random safety_checker/ (width 64, 2 layers of 2 heads, patch 14, 224 px)
    and feature_extractor/."""
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           patch_size=14, image_size=224),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=48,
    )
    reference = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # weights larger than CLIP's initialisation, so that pictures differ more
        for name, parameter in reference.vision_model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
        reference.visual_projection.weight.normal_(0, 0.2)
    processor = CLIPImageProcessorPil()
    pixels = processor(pictures(), return_tensors="pt").pixel_values
    expected_flags = set_concepts(reference, pixels)
    root = tmp_path_factory.mktemp("sd15")
    reference.save_pretrained(root / "safety_checker")
    processor.save_pretrained(root / "feature_extractor")
    (root / "unet").mkdir()
    return root, reference, processor, expected_flags


def run_reference(reference, pixels):
    """diffusers' forward, and the per-image results it computes but does not return (read off its frame)."""
    seen = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is StableDiffusionSafetyChecker.forward.__wrapped__.__code__:
            seen["result"] = frame.f_locals["result"]

    images = torch.rand(len(pixels), 3, 8, 8) + 0.5
    sys.setprofile(profile)
    try:
        images, flags = reference(clip_input=pixels, images=images)
    finally:
        sys.setprofile(None)
    return images, flags, seen["result"]


def test_vision_tower_matches_transformers(folder):
    root, reference, processor, _ = folder
    checker = load_safety_checker(root)
    assert checker.config.vision.heads == 2 and checker.config.vision.layers == 2
    pixels = processor(pictures(), return_tensors="pt").pixel_values
    with torch.no_grad():
        theirs = reference.vision_model(pixels)
    hidden, pooled = checker.vision_model(pixels)
    assert (hidden - theirs.last_hidden_state).abs().max() < 1e-4
    assert (pooled - theirs.pooler_output).abs().max() < 1e-4


def test_preprocessing_matches_clip_image_processor(folder, tmp_path):
    root, _, processor, _ = folder
    checker = load_safety_checker(root / "safety_checker")  # the safety_checker folder given directly
    images = pictures() + [pictures()[0].convert("RGBA"), pictures()[1].convert("L")]
    theirs = processor(images, return_tensors="pt").pixel_values
    ours = preprocess(images, checker.preprocessing)
    assert ours.shape == theirs.shape == (len(images), 3, 224, 224)
    assert (ours - theirs).abs().max() < 1e-5
    # The SD 1.x folders' spelling (transformers 4.2x's CLIPFeatureExtractor) reads the same.
    old = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
           "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    theirs_old = CLIPImageProcessorPil.from_pretrained(tmp_path)(images, return_tensors="pt").pixel_values
    assert (preprocess(images, preprocessing_from_config(old)) - theirs_old).abs().max() < 1e-5


def test_verdicts_match_diffusers(folder):
    root, reference, processor, expected_flags = folder
    checker = load_safety_checker(root)
    images = pictures()
    _, flags, result = run_reference(reference, processor(images, return_tensors="pt").pixel_values)
    verdicts = checker.check(images)
    assert flags == [v.flagged for v in verdicts] == expected_flags
    for verdict, theirs in zip(verdicts, result):
        assert np.abs(np.subtract(verdict.concept_scores, list(theirs["concept_scores"].values()))).max() < 1e-5
        assert np.abs(np.subtract(verdict.special_scores, list(theirs["special_scores"].values()))).max() < 1e-5
        assert verdict.concepts == theirs["bad_concepts"]
    # Picture 2 fires special-care concept 0, which adjusts the next special-care concept and concept 1 by
    # 0.01: both fire (at 0.006), where the same 0.004 gap leaves picture 3 clean (-0.004).
    assert verdicts[2].special_care == [0, 1] and verdicts[2].concepts == [1]
    assert verdicts[2].concept_scores[1] == verdicts[2].special_scores[1] == 0.006
    assert verdicts[3].concept_scores[2] == -0.004 and not verdicts[3].flagged
    assert verdicts[1].concepts == [0] and verdicts[1].special_care == []


def test_tensor_images_and_black_out(folder):
    root, _, _, _ = folder
    checker = load_safety_checker(root)
    images = pictures()[:3]
    tensor = torch.stack([torch.from_numpy(np.array(image.resize((64, 48)))).permute(2, 0, 1) / 255
                          for image in images])
    verdicts = checker.check(tensor)  # rounded to 8 bits and preprocessed like the PIL pictures
    assert verdicts == checker.check([image.resize((64, 48)) for image in images])
    verdicts = checker.check(images)
    blacked, flagged = black_out(tensor, verdicts)
    assert flagged == [1, 2] and blacked[1:].abs().max() == 0 and torch.equal(blacked[0], tensor[0])
    assert tensor[1].abs().max() > 0  # the caller's tensor untouched
    pil, flagged = black_out(images, verdicts)
    assert flagged == [1, 2] and pil[0] is images[0]
    assert np.asarray(pil[2]).max() == 0 and pil[2].size == images[2].size
    assert blacked_out_message([], 3) is None
    assert "image 2, 3 of 3" in blacked_out_message(flagged, 3)


def test_transformers_4_layout_loads(folder, tmp_path):
    """The files of the SD 1.x folders, saved with transformers 4: the tower one level deeper, position_ids kept."""
    root, reference, _, _ = folder
    shutil.copytree(root / "feature_extractor", tmp_path / "feature_extractor")
    shutil.copytree(root / "safety_checker", tmp_path / "safety_checker")
    path = tmp_path / "safety_checker" / "model.safetensors"
    tensors = load_file(path)
    if not any(key.startswith("vision_model.vision_model.") for key in tensors):  # saved by transformers 5
        tensors = {("vision_model." + key if key.startswith("vision_model.") else key): value
                   for key, value in tensors.items()}
    tensors["vision_model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    save_file(tensors, path)
    checker = load_safety_checker(tmp_path)
    assert torch.equal(checker.concept_embeds, reference.concept_embeds)
    assert torch.equal(checker.vision_model.vision_model.encoder.layers[1].mlp.fc2.weight,
                       reference.vision_model.encoder.layers[1].mlp.fc2.weight)


def test_errors_are_one_line(folder, tmp_path):
    root, _, _, _ = folder
    shutil.copytree(root / "safety_checker", tmp_path / "safety_checker")
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="feature_extractor") as error:
        load_safety_checker(tmp_path)
    assert "\n" not in str(error.value) and "download" in str(error.value)

    shutil.copytree(root / "feature_extractor", tmp_path / "feature_extractor")
    path = tmp_path / "safety_checker" / "model.safetensors"
    tensors = load_file(path)
    fc1 = next(key for key in tensors if key.endswith("encoder.layers.0.mlp.fc1.weight"))  # 1 or 2 vision_model.
    fc9 = fc1.replace("fc1", "fc9")
    tensors[fc9] = tensors.pop(fc1)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(vision_model\.vision_model\.encoder\.layers\.0\.mlp\.fc1\."
                                              r"weight\), 1 unexpected \(vision_model\.vision_model\.encoder") as error:
        load_safety_checker(tmp_path)
    assert "\n" not in str(error.value)

    tensors[fc1] = tensors.pop(fc9)
    tensors["concept_embeds"] = tensors["concept_embeds"][:, :40].contiguous()
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"concept_embeds has shape \(17, 40\)") as error:
        load_safety_checker(tmp_path)
    assert "\n" not in str(error.value)

    del tensors["visual_projection.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="visual_projection.weight") as error:
        load_safety_checker(tmp_path)
    assert "\n" not in str(error.value)

    shutil.rmtree(tmp_path / "safety_checker")
    with pytest.raises(CheckpointError, match="no safety_checker/") as error:
        load_safety_checker(tmp_path)
    assert "\n" not in str(error.value)
