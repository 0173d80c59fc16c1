"""The whole loop against diffusers' pipelines on the same weights, and its seeds."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from reference_pipeline import reference_scheduler
from sd_scratch.images import from_pil
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import generate
from sd_scratch.samplers import SAMPLER_NAMES
from sd_scratch.tokenizer import WEIGHTS_DIR
from small_models import small_sd
from twins import diffusers_twins

PROMPTS = ["a red circle on a blue background", "a photograph of an astronaut riding a horse"]
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 48, 64  # non-square: 6 x 8 latents
STEPS = 6


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small random SD 1.x written in both layouts: our single file, and diffusers' save_pretrained folder."""
    root = tmp_path_factory.mktemp("model")
    single = root / "small.safetensors"
    save_checkpoint(single, *small_sd(1, seed=3), image_size=64)
    probe = load_checkpoint(single)
    twins = diffusers_twins(load_file(str(single)), probe.unet.config, probe.vae.config, probe.text_encoder.config,
                            sample_size=8)
    unet, vae, clip = twins.unet, twins.vae, twins.text_encoder
    tokenizer = CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77)
    components = dict(unet=unet.eval(), vae=vae.eval(), text_encoder=clip.eval(), tokenizer=tokenizer)
    folder = root / "folder"
    StableDiffusionPipeline(**components, scheduler=reference_scheduler("pndm"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return {"single file": single, "diffusers folder": folder}, components


def reference(components, name, img2img=False):
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    pipe = cls(**components, scheduler=reference_scheduler(name), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(seed, n):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_to_image_equals_diffusers_pipeline(written, layout, sampler, guidance):
    paths, components = written
    model = load_checkpoint(paths[layout])
    eta = 0.5 if sampler == "ddim" else (1.0 if sampler == "euler_a" else 0.0)  # ddim with eta > 0 draws noise
    ours = generate(model, PROMPTS, NEGATIVE, steps=STEPS, guidance=guidance, sampler=sampler, eta=eta, seed=11,
                    height=HEIGHT, width=WIDTH, progress=False).images
    extra = {"eta": eta} if sampler == "ddim" else {}
    theirs = reference(components, sampler)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, guidance_scale=guidance, height=HEIGHT,
        width=WIDTH, generator=generators(11, 2), output_type="pt", **extra).images
    assert ours.shape == theirs.shape == (2, 3, HEIGHT, WIDTH)
    assert theirs.std() > 0.02, "random weights should still give images with some structure"
    assert (ours - theirs).abs().max() <= 1e-3


# LMS is left out on purpose: after the image-to-image cut, diffusers' LMS picks its order from the
# absolute step number, so its first step applies 4th-order coefficients to a single derivative.
# Ours starts with no history, as k-diffusion does (tests/test_samplers.py pins that first step to Euler).
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m", "pndm", "heun"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_image_to_image_equals_diffusers_pipeline(written, sampler, strength):
    paths, components = written
    model = load_checkpoint(paths["single file"])
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(HEIGHT // 8, WIDTH // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    picture = Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.NEAREST)
    ours = generate(model, PROMPTS, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, seed=3,
                    init_image=from_pil(picture, WIDTH, HEIGHT), strength=strength, progress=False).images
    theirs = reference(components, sampler, img2img=True)(
        PROMPTS, image=picture, strength=strength, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=generators(3, 2), output_type="pt").images
    assert (ours - theirs).abs().max() <= 1e-3


def test_same_seed_same_image_and_batches_split_by_seed(written):
    paths, _ = written
    model = load_checkpoint(paths["single file"])
    kwargs = dict(steps=4, guidance=7.5, sampler="euler_a", height=HEIGHT, width=WIDTH, progress=False)
    batch = generate(model, PROMPTS[:1] * 2, seed=100, **kwargs).images
    again = generate(model, PROMPTS[:1] * 2, seed=100, **kwargs).images
    single = generate(model, PROMPTS[:1], seed=101, **kwargs).images
    assert torch.equal(batch, again)
    assert torch.allclose(batch[1], single[0], atol=1e-5)  # batched matmuls may round differently
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_previews_show_the_predicted_clean_image(written):
    paths, _ = written
    model = load_checkpoint(paths["single file"])
    result = generate(model, PROMPTS[:1], steps=6, sampler="euler", height=HEIGHT, width=WIDTH, preview_every=2,
                      progress=False)
    assert len(result.previews) == 3 and result.previews[0].shape == result.images.shape
    # the last preview is the x0 prediction at the last step, which Euler's final step lands on (sigma -> 0)
    assert (result.previews[-1] - result.images).abs().max() < 1e-4


def test_bad_sizes_are_refused_with_a_suggestion(written):
    paths, _ = written
    model = load_checkpoint(paths["single file"])
    with pytest.raises(ValueError, match="height must be a multiple of 8, got 50: try 48 or 56"):
        generate(model, "x", height=50, width=64, progress=False)
