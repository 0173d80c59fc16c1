"""The whole loop against diffusers' pipelines on the same weights, and its seeds."""

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from reference_pipeline import CLASSES, reference_scheduler, scheduler_from_config
from sd_scratch import samplers
from sd_scratch.cli import main
from sd_scratch.images import from_pil, to_pil
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import generate, initial_noise, latent_shape
from sd_scratch.samplers import SAMPLER_NAMES

DIFFUSERS_SAMPLERS = [name for name in SAMPLER_NAMES if name in CLASSES]  # those with a diffusers scheduler
from sd_scratch.schedule import ScheduleConfig
from sd_scratch.tokenizer import WEIGHTS_DIR
from sd_scratch.unet import UNet
from small_models import UNET_SD1, randomize, small_sd
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


def drawing_from(pipe, gens):
    """The pipeline, with a DPMSolverSDE scheduler's Brownian tree replaced by draws from the pipeline's own
    per-image generators, which it uses first for the starting latents: the order our loop draws in."""
    scheduler = pipe.scheduler
    if hasattr(scheduler, "noise_sampler"):
        shape = (len(gens), 4, HEIGHT // 8, WIDTH // 8)
        set_timesteps = scheduler.set_timesteps

        def set_timesteps_and_noise(*args, **kwargs):  # set_timesteps drops any noise sampler: put ours back after
            set_timesteps(*args, **kwargs)
            scheduler.noise_sampler = lambda sigma, sigma_next: samplers.draw_noise(shape, gens, "cpu", torch.float32)

        scheduler.set_timesteps = set_timesteps_and_noise
    return pipe


@pytest.mark.parametrize("layout", ["single file", "diffusers folder"])
@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_text_to_image_equals_diffusers_pipeline(written, layout, sampler, guidance):
    paths, components = written
    model = load_checkpoint(paths[layout])
    eta = 0.5 if sampler == "ddim" else None  # ddim with eta > 0 draws noise; the others' own (euler_a, SDE: 1)
    ours = generate(model, PROMPTS, NEGATIVE, steps=STEPS, guidance=guidance, sampler=sampler, eta=eta, seed=11,
                    height=HEIGHT, width=WIDTH, progress=False).images
    extra = {"eta": eta} if sampler == "ddim" else {}
    gens = generators(11, 2)
    theirs = drawing_from(reference(components, sampler), gens)(
        PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, guidance_scale=guidance, height=HEIGHT,
        width=WIDTH, generator=gens, output_type="pt", **extra).images
    assert ours.shape == theirs.shape == (2, 3, HEIGHT, WIDTH)
    assert theirs.std() > 0.02, "random weights should still give images with some structure"
    assert (ours - theirs).abs().max() <= 1e-3


# LMS is left out on purpose: after the image-to-image cut, diffusers' LMS picks its order from the
# absolute step number, so its first step applies 4th-order coefficients to a single derivative.
# Ours starts with no history, as k-diffusion does (tests/test_samplers.py pins that first step to Euler).
@pytest.mark.parametrize("sampler", [name for name in DIFFUSERS_SAMPLERS if name != "lms"])
@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_image_to_image_equals_diffusers_pipeline(written, sampler, strength):
    paths, components = written
    model = load_checkpoint(paths["single file"])
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(HEIGHT // 8, WIDTH // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    picture = Image.fromarray(pixels).resize((WIDTH, HEIGHT), Image.NEAREST)
    ours = generate(model, PROMPTS, NEGATIVE, steps=STEPS, guidance=7.5, sampler=sampler, seed=3,
                    init_image=from_pil(picture, WIDTH, HEIGHT), strength=strength, progress=False).images
    gens = generators(3, 2)
    theirs = drawing_from(reference(components, sampler, img2img=True), gens)(
        PROMPTS, image=picture, strength=strength, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=gens, output_type="pt").images
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
    assert [image.tobytes() for image in result.pil_images] == [image.tobytes() for image in to_pil(result.images)]
    # the last preview is the x0 prediction at the last step, which Euler's final step lands on (sigma -> 0)
    assert (result.previews[-1] - result.images).abs().max() < 1e-4


def test_bad_sizes_are_refused_with_a_suggestion(written):
    paths, _ = written
    model = load_checkpoint(paths["single file"])
    with pytest.raises(ValueError, match="height must be a multiple of 8, got 50: try 48 or 56"):
        generate(model, "x", height=50, width=64, progress=False)


# --------------------------------------------------------------------------------------------------
# A diffusers folder's own noise schedule

# Two schedules of other models, every value unlike SD's: linear betas over another range, "trailing"
# steps, DDIM and PNDM landing on alpha_bar = 1 and v-prediction; scaled-linear betas to another end,
# "leading" steps with an outdated steps_offset of 0 (which diffusers' pipeline overrules with 1, as we do).
OWN_SCHEDULES = {
    "linear, trailing, v": (dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing",
                                 set_alpha_to_one=True, prediction_type="v_prediction", clip_sample=False),
                            ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                           set_alpha_to_one=True, timestep_spacing="trailing"), "v_prediction"),
    "scaled, leading, offset 0": (dict(beta_end=0.014, timestep_spacing="leading", steps_offset=0,
                                       prediction_type="epsilon", clip_sample=False),
                                  ScheduleConfig(beta_end=0.014, steps_offset=1), "epsilon"),
}


@pytest.fixture(scope="module", params=list(OWN_SCHEDULES))
def folder_with_own_schedule(request, written, tmp_path_factory):
    paths, _ = written
    config_changes, schedule, prediction_type = OWN_SCHEDULES[request.param]
    folder = tmp_path_factory.mktemp("own_schedule") / "folder"
    shutil.copytree(paths["diffusers folder"], folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = {**json.loads(config_path.read_text()), **config_changes}
    config_path.write_text(json.dumps(config))
    return folder, config, schedule, prediction_type


@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler")  # diffusers on steps_offset 0
@pytest.mark.parametrize("sampler", DIFFUSERS_SAMPLERS)
def test_a_folders_scheduler_config_is_honoured_as_diffusers_honours_it(written, folder_with_own_schedule, sampler):
    folder, config, schedule, prediction_type = folder_with_own_schedule
    paths, components = written
    if config.get("steps_offset", 1) != 1:
        with pytest.warns(UserWarning, match="sets steps_offset 0: .*using 1"):
            model = load_checkpoint(folder)
    else:
        model = load_checkpoint(folder)
    assert model.schedule == schedule and model.prediction_type == prediction_type
    settings = dict(steps=STEPS, guidance=7.5, sampler=sampler, seed=11, height=HEIGHT, width=WIDTH, progress=False)
    ours = generate(model, PROMPTS, NEGATIVE, **settings).images
    pipe = StableDiffusionPipeline(**components, scheduler=scheduler_from_config(sampler, config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gens = generators(11, 2)
    theirs = drawing_from(pipe, gens)(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
                                      guidance_scale=7.5, height=HEIGHT, width=WIDTH, generator=gens,
                                      output_type="pt").images
    assert (ours - theirs).abs().max() <= 1e-3
    # The same weights on SD's own schedule make another picture (by 0.04 at least; 10x the bound above),
    # so the comparison above could fail.
    sd_schedule = generate(load_checkpoint(paths["single file"]), PROMPTS, NEGATIVE, **settings).images
    assert (sd_schedule - ours).abs().max() > 10 * 1e-3


# --------------------------------------------------------------------------------------------------
# Inpainting checkpoints: 9 UNet input channels, 4 latent channels


@pytest.fixture(scope="module")
def inpainting_file(tmp_path_factory):
    text_encoder, _, vae = small_sd(1, seed=3)
    unet = randomize(UNet(dataclasses.replace(UNET_SD1, in_channels=9)), seed=4)
    path = tmp_path_factory.mktemp("inpainting") / "inpainting.safetensors"
    save_checkpoint(path, text_encoder, unet, vae, image_size=64)
    return path


def test_starting_noise_has_the_vaes_latent_channels_when_the_unet_takes_9(inpainting_file):
    model = load_checkpoint(inpainting_file)
    assert model.kind == "SD 1.x inpainting" and model.unet.config.in_channels == 9
    assert latent_shape(model, HEIGHT, WIDTH) == (4, HEIGHT // 8, WIDTH // 8)
    noise = initial_noise(generators(5, 2), latent_shape(model, HEIGHT, WIDTH), "cpu")
    assert torch.equal(noise[1:], torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=torch.manual_seed(6)))
    # What the inpainting UNet is handed besides, and how the loop blends for ordinary models: test_inpainting.py


def test_inpainting_checkpoints_need_a_mask(inpainting_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="inpainting checkpoint .* give it an init image and a mask"):
        generate(load_checkpoint(inpainting_file), "x", steps=1, progress=False)
    assert main(["--checkpoint", str(inpainting_file), "--outdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this is an inpainting checkpoint") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
