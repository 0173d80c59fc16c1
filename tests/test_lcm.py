"""The LCM sampler (Luo et al. 2023) against diffusers' LCMScheduler: timesteps, step by step, whole runs.

The step-by-step trajectories use a deterministic stand-in for the UNet, eps (or v) = 0.1 * input + 0.01 * t,
fed to both sides, and a batch of two images with their own generators (seeds 1 and 2), so that every
fresh-noise draw must come from the right image's generator in diffusers' order.
"""

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from reference_pipeline import reference_scheduler
from small_models import small_sd
from test_samplers import LATENT_SHAPE, TOLERANCE, dummy_model, generators, relative_error, start_noise
from twins import pipeline_components

from sd_scratch import samplers
from sd_scratch.cli import main
from sd_scratch.images import read_parameters
from sd_scratch.loading import load_checkpoint, save_checkpoint
from sd_scratch.sample import generate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def run_ours(plan, x, gens):
    """The latent after each call, and the clean-latent estimate f(x, t) each call made."""
    latents, estimates, state = [], [], samplers.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = dummy_model(samplers.scale_model_input(plan, i, x), t)
        estimates.append(samplers.predicted_x0(plan, i, x, model_output))
        x, state = samplers.step(plan, i, x, model_output, state, generators=gens)
        latents.append(x)
    return latents, estimates


def run_reference(scheduler, x, gens, timesteps=None):
    latents, estimates = [], []
    for t in scheduler.timesteps if timesteps is None else timesteps:
        model_output = dummy_model(scheduler.scale_model_input(x, t), t)
        output = scheduler.step(model_output, t, x, generator=gens)
        x = output.prev_sample
        latents.append(x)
        estimates.append(output.denoised)
    return latents, estimates


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (x, x_ref) in enumerate(zip(ours, theirs)):
        assert x.dtype == x_ref.dtype
        error = relative_error(x, x_ref)
        assert error <= TOLERANCE, f"call {i}: relative error {error:.2e}"


# ---------------------------------------------------------------------------------------------
# The timesteps
# ---------------------------------------------------------------------------------------------


def test_timesteps_equal_diffusers_for_every_step_count():
    reference = reference_scheduler("lcm")
    for num_steps in range(1, samplers.LCM_ORIGINAL_STEPS + 1):
        reference.set_timesteps(num_steps)
        plan = samplers.make_plan("lcm", num_steps)
        assert plan.timesteps.dtype == reference.timesteps.dtype == torch.int64
        assert torch.equal(plan.timesteps, reference.timesteps), num_steps


def test_timesteps_are_the_distillation_schedule_skipped_evenly():
    assert samplers.make_plan("lcm", 4).timesteps.tolist() == [999, 759, 499, 259]
    assert samplers.make_plan("lcm", 1).timesteps.tolist() == [999]
    assert samplers.make_plan("lcm", 50).timesteps.tolist() == list(range(999, 0, -20))


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_the_spacing_plays_no_part_as_in_diffusers(spacing):
    reference = reference_scheduler("lcm", spacing)
    reference.set_timesteps(6)
    assert torch.equal(samplers.make_plan("lcm", 6, spacing=spacing).timesteps, reference.timesteps)


def test_more_steps_than_the_distillation_schedule_and_other_schedule_types_are_refused():
    with pytest.raises(ValueError, match="num_steps must be at most 50, got 51"):
        samplers.make_plan("lcm", 51)
    with pytest.raises(ValueError, match="karras sigmas need a sigma-based sampler, not 'lcm'"):
        samplers.make_plan("lcm", 4, karras=True)
    with pytest.raises(ValueError, match="'lcm' walks the 'spaced' schedule, not 'exponential'"):
        samplers.make_plan("lcm", 4, schedule_type="exponential")
    with pytest.raises(ValueError, match="eta only applies to"):
        samplers.make_plan("lcm", 4, eta=0.5)


# ---------------------------------------------------------------------------------------------
# Step by step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_trajectory_and_estimates_equal_diffusers(num_steps, prediction_type):
    plan = samplers.make_plan("lcm", num_steps, prediction_type=prediction_type)
    reference = reference_scheduler("lcm", prediction_type=prediction_type)
    reference.set_timesteps(num_steps)
    assert plan.init_noise_sigma == reference.init_noise_sigma == 1.0
    noise = start_noise()
    ours, our_estimates = run_ours(plan, noise, generators(1, 2))
    theirs, their_estimates = run_reference(reference, noise, generators(1, 2))
    assert_same(ours, theirs)
    assert_same(our_estimates, their_estimates)
    assert torch.equal(ours[-1], our_estimates[-1])  # the last step hands back f itself


def test_each_image_draws_from_its_own_generator():
    # Image 1 of a batch seeded (1, 2) is image 0 of a batch of one seeded 2, and image 0 differs from it.
    plan = samplers.make_plan("lcm", 4)
    noise = start_noise()
    batch, _ = run_ours(plan, noise, generators(1, 2))
    single, _ = run_ours(plan, noise[1:], generators(2))
    assert torch.allclose(batch[-1][1:], single[-1], rtol=0, atol=1e-6)
    other, _ = run_ours(plan, noise[1:], generators(1))
    assert not torch.allclose(other[-1], single[-1])


def test_consistency_function_keeps_x_at_t_zero_and_is_nearly_x0_from_t_19():
    x, predicted_x0 = torch.randn(3), torch.randn(3)
    assert torch.equal(samplers.consistency_function(x, predicted_x0, 0), x)
    c_skip, c_out = samplers.consistency_scalings(19)
    assert c_skip < 1e-5 and abs(c_out - 1) < 1e-5


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_img2img_cut_and_trajectory_equal_the_diffusers_img2img_pipelines(strength):
    """StableDiffusionImg2ImgPipeline with LCMScheduler cuts the steps as for every scheduler (get_timesteps)."""
    num_steps = 8
    scheduler = reference_scheduler("lcm")
    scheduler.set_timesteps(num_steps)
    t_start = num_steps - int(num_steps * strength)
    timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(t_start)
    plan = samplers.img2img_plan(samplers.make_plan("lcm", num_steps), strength)
    assert plan.start_step == t_start and torch.equal(plan.timesteps, timesteps)
    clean, noise = start_noise(7), start_noise(8)
    noisy = scheduler.add_noise(clean, noise, timesteps[:1].repeat(LATENT_SHAPE[0]))
    assert torch.equal(samplers.add_noise(plan, clean, noise), noisy)
    ours, _ = run_ours(plan, noisy, generators(1, 2))
    theirs, _ = run_reference(scheduler, noisy, generators(1, 2), timesteps=timesteps)
    assert_same(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Whole runs on small random weights, and the command line
# ---------------------------------------------------------------------------------------------

PROMPTS = ["a red circle on a blue background", "a photograph of an astronaut riding a horse"]
HEIGHT, WIDTH = 48, 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small random SD 1.x as our single file, and the same weights in diffusers' and transformers' classes."""
    path = tmp_path_factory.mktemp("lcm") / "small.safetensors"
    save_checkpoint(path, *small_sd(1, seed=3), image_size=64)
    model = load_checkpoint(path)
    components = {**pipeline_components(path, model), "scheduler": reference_scheduler("lcm"),
                  "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return path, model, components


def test_text_to_image_equals_diffusers_pipeline_with_lcm_scheduler(pair):
    _, model, components = pair
    ours = generate(model, PROMPTS, steps=4, guidance=1.0, sampler="lcm", seed=11, height=HEIGHT, width=WIDTH,
                    progress=False)
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, height=HEIGHT, width=WIDTH,
                  generator=generators(11, 12), output_type="pt").images
    assert ours.images.shape == theirs.shape == (2, 3, HEIGHT, WIDTH)
    assert theirs.std() > 0.02, "random weights should still give images with some structure"
    assert (ours.images - theirs).abs().max() <= 1e-3
    assert "Steps: 4, Sampler: LCM, CFG scale: 1.0, Seed: 12," in ours.parameters[1]


def test_image_to_image_equals_diffusers_img2img_pipeline_with_lcm_scheduler(pair):
    _, model, components = pair
    picture = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ours = generate(model, PROMPTS, steps=4, guidance=1.0, sampler="lcm", seed=3, init_image=picture, strength=0.5,
                    progress=False).images
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, image=picture / 2 + 0.5, strength=0.5, num_inference_steps=4, guidance_scale=1.0,
                  generator=generators(3, 4), output_type="pt").images
    assert (ours - theirs).abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["lcm", "LCM"])
def test_the_command_line_takes_lcm_and_records_it(pair, tmp_path, name):
    path, _, _ = pair
    assert main(["--checkpoint", str(path), "--steps", "4", "--guidance", "1", "--sampler", name,
                 "--height", "32", "--width", "32", "--outdir", str(tmp_path)]) == 0
    assert "Steps: 4, Sampler: LCM, CFG scale: 1.0," in read_parameters(tmp_path / "sample-00000.png")
