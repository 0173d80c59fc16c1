"""Every sampler against the diffusers scheduler it reimplements, step by step.

The model is a deterministic stand-in, eps = 0.1 * input + 0.01 * t, so the loops are cheap and
any difference in timesteps, input scaling or update rule shows up in the latents.
"""

import dataclasses
import inspect

import pytest
import torch
from diffusers import DDIMScheduler
from scipy import integrate

from reference_pipeline import CLASSES, reference_scheduler
from sd_scratch import samplers

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

STEP_COUNTS = (1, 2, 3, 10, 25, 50)
DIFFUSERS_SAMPLERS = [name for name in samplers.SAMPLER_NAMES if name in CLASSES]  # the others: references below
KARRAS_SAMPLERS = ("euler", "lms", "heun", "dpmpp_2m", "dpm2", "dpm2_a", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                   "dpmpp_sde", "unipc", "unipc_3")  # the ones diffusers has use_karras_sigmas on
TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|, per latent
LATENT_SHAPE = (2, 4, 4, 4)

def dummy_model(model_input, t):
    return 0.1 * model_input + 0.01 * t


def start_noise(seed=0):
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run_ours(plan, x, gens=None):
    latents, state = [], samplers.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = dummy_model(samplers.scale_model_input(plan, i, x), t)
        # (euler_cfgpp also takes the unconditional prediction: here the same, which makes it plain Euler)
        x, state = samplers.step(plan, i, x, model_output, state, generators=gens, unconditional_output=model_output)
        latents.append(x)
    return latents


def run_reference(scheduler, x, gens=None, eta=0.0, timesteps=None):
    latents = []
    if hasattr(scheduler, "noise_sampler"):  # DPMSolverSDE: its Brownian tree replaced by draws from our generators
        scheduler.noise_sampler = lambda sigma, sigma_next: samplers.draw_noise(x.shape, gens, x.device, x.dtype)
    for t in scheduler.timesteps if timesteps is None else timesteps:
        model_output = dummy_model(scheduler.scale_model_input(x, t), t)
        extra = {}
        if "generator" in inspect.signature(scheduler.step).parameters:  # the schedulers that draw noise
            extra = {"generator": gens}
        if isinstance(scheduler, DDIMScheduler):
            extra = {"generator": gens, "eta": eta}
        x = scheduler.step(model_output, t, x, **extra).prev_sample
        latents.append(x)
    return latents


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (x, x_ref) in enumerate(zip(ours, theirs)):
        assert x.dtype == x_ref.dtype
        error = relative_error(x, x_ref)
        assert error <= TOLERANCE, f"call {i}: relative error {error:.2e}"


# Samplers that call the UNet between the grid's levels, at timesteps worked out from a sigma: computed in
# float64 here and in float32 by diffusers, they agree to float32's last bits, not bit for bit.
BETWEEN_LEVELS = ("dpm2", "dpm2_a", "dpmpp_sde")


def assert_same_timesteps(plan, reference):
    assert plan.timesteps.dtype == reference.timesteps.dtype
    if plan.name in BETWEEN_LEVELS:
        torch.testing.assert_close(plan.timesteps, reference.timesteps, rtol=1e-6, atol=1e-4)
    else:
        assert torch.equal(plan.timesteps, reference.timesteps)


def compare_text_to_image(name, num_steps, **plan_options):
    plan = samplers.make_plan(name, num_steps, **plan_options)
    reference = reference_scheduler(
        name,
        plan_options.get("spacing", "leading"),
        plan_options.get("karras", False),
        plan_options.get("prediction_type", "epsilon"),
    )
    reference.set_timesteps(num_steps)
    assert_same_timesteps(plan, reference)
    noise = start_noise()
    ours = run_ours(plan, noise * plan.init_noise_sigma, generators(1, 2))
    theirs = run_reference(reference, noise * reference.init_noise_sigma, generators(1, 2))
    assert_same_trajectory(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Text-to-image trajectories.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_trajectory_equals_diffusers(name, num_steps):
    compare_text_to_image(name, num_steps)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_trajectory_equals_diffusers_other_spacings(name, spacing, num_steps):
    compare_text_to_image(name, num_steps, spacing=spacing)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", KARRAS_SAMPLERS)
def test_trajectory_equals_diffusers_karras(name, spacing, num_steps):
    compare_text_to_image(name, num_steps, spacing=spacing, karras=True)


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_trajectory_equals_diffusers_v_prediction(name, num_steps):
    compare_text_to_image(name, num_steps, prediction_type="v_prediction")


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("num_steps", [1, 10, 25])
def test_ddim_with_eta_draws_noise_like_diffusers(num_steps, eta):
    plan = samplers.make_plan("ddim", num_steps, eta=eta)
    reference = reference_scheduler("ddim")
    reference.set_timesteps(num_steps)
    ours = run_ours(plan, start_noise(), generators(5, 6))
    theirs = run_reference(reference, start_noise(), generators(5, 6), eta=eta)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["euler_a", "ddim"])
def test_single_generator_draws_like_diffusers(name):
    eta = 1.0 if name == "ddim" else None
    plan = samplers.make_plan(name, 10, eta=eta)
    reference = reference_scheduler(name)
    reference.set_timesteps(10)
    ours = run_ours(plan, start_noise() * plan.init_noise_sigma, torch.Generator().manual_seed(3))
    theirs = run_reference(
        reference, start_noise() * reference.init_noise_sigma, torch.Generator().manual_seed(3), eta=1.0
    )
    assert_same_trajectory(ours, theirs)


def test_eta_changes_euler_ancestral_and_zero_eta_is_euler():
    noise = start_noise()
    plan_euler = samplers.make_plan("euler", 10)
    plan_deterministic = samplers.make_plan("euler_a", 10, eta=0.0)
    plan_half = samplers.make_plan("euler_a", 10, eta=0.5)
    euler = run_ours(plan_euler, noise * plan_euler.init_noise_sigma)[-1]
    assert torch.allclose(run_ours(plan_deterministic, noise * plan_euler.init_noise_sigma)[-1], euler)
    half = run_ours(plan_half, noise * plan_euler.init_noise_sigma, generators(1, 2))[-1]
    full = run_ours(samplers.make_plan("euler_a", 10), noise * plan_euler.init_noise_sigma, generators(1, 2))[-1]
    assert not torch.allclose(half, euler) and not torch.allclose(half, full)


# ---------------------------------------------------------------------------------------------
# Starting noise, input scaling and the x0 estimate.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize(
    "name, karras", [(name, False) for name in DIFFUSERS_SAMPLERS] + [(name, True) for name in KARRAS_SAMPLERS]
)
def test_init_noise_sigma_and_input_scaling_equal_diffusers(name, karras, spacing):
    plan = samplers.make_plan(name, 25, spacing=spacing, karras=karras)
    reference = reference_scheduler(name, spacing, karras)
    reference.set_timesteps(25)
    assert plan.init_noise_sigma == float(reference.init_noise_sigma)
    x = start_noise()
    for i, t in enumerate(plan.timesteps):
        if hasattr(reference, "_step_index"):
            reference._step_index = i  # only step() moves diffusers' hidden counter on
        if name in BETWEEN_LEVELS:
            reference.sample = None if i % 2 == 0 else x  # ... and its hidden stage: the first or second call
            reference.mid_point_sigma = plan.sigmas[i]  # (DPMSolverSDE reads the midpoint's level from here)
        assert torch.equal(samplers.scale_model_input(plan, i, x), reference.scale_model_input(x, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["euler", "euler_a", "lms", "heun", "ddim"])
def test_predicted_x0_equals_diffusers_pred_original_sample(name, prediction_type):
    plan = samplers.make_plan(name, 10, prediction_type=prediction_type)
    reference = reference_scheduler(name, prediction_type=prediction_type)
    reference.set_timesteps(10)
    x, state = start_noise() * plan.init_noise_sigma, samplers.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = dummy_model(samplers.scale_model_input(plan, i, x), t)
        extra = {"generator": generators(1, 2)} if name == "euler_a" else {}
        reference.scale_model_input(x, t)  # diffusers warns if step() comes without it
        expected = reference.step(model_output, t, x, **extra).pred_original_sample
        assert relative_error(samplers.predicted_x0(plan, i, x, model_output), expected) <= 1e-6
        x, state = samplers.step(plan, i, x, model_output, state, generators=generators(1, 2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_of_dpm_equals_diffusers(prediction_type):
    plan = samplers.make_plan("dpmpp_2m", 10, prediction_type=prediction_type)
    reference = reference_scheduler("dpmpp_2m", prediction_type=prediction_type)
    reference.set_timesteps(10)
    reference._step_index = 4
    x = start_noise()
    model_output = dummy_model(x, plan.timesteps[4])
    expected = reference.convert_model_output(model_output, sample=x)
    assert relative_error(samplers.predicted_x0(plan, 4, x, model_output), expected) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Image to image.
# ---------------------------------------------------------------------------------------------


def reference_img2img_start(name, num_steps, strength):
    """What StableDiffusionImg2ImgPipeline does: get_timesteps, set_begin_index, add_noise."""
    scheduler = reference_scheduler(name)
    scheduler.set_timesteps(num_steps)
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    clean, noise = start_noise(7), start_noise(8)
    noisy = scheduler.add_noise(clean, noise, timesteps[:1].repeat(LATENT_SHAPE[0]))
    return scheduler, t_start, timesteps, noisy


@pytest.mark.parametrize("num_steps", [10, 50])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_img2img_start_equals_diffusers(name, strength, num_steps):
    _, t_start, timesteps, noisy = reference_img2img_start(name, num_steps, strength)
    plan = samplers.img2img_plan(samplers.make_plan(name, num_steps), strength)
    assert plan.start_step == t_start
    if name in BETWEEN_LEVELS:
        torch.testing.assert_close(plan.timesteps, timesteps, rtol=1e-6, atol=1e-4)
    else:
        assert torch.equal(plan.timesteps, timesteps)
    assert torch.equal(samplers.add_noise(plan, start_noise(7), start_noise(8)), noisy)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", [n for n in DIFFUSERS_SAMPLERS if n != "lms"])
def test_img2img_trajectory_equals_diffusers(name, strength):
    scheduler, _, timesteps, noisy = reference_img2img_start(name, 25, strength)
    plan = samplers.img2img_plan(samplers.make_plan(name, 25), strength)
    ours = run_ours(plan, samplers.add_noise(plan, start_noise(7), start_noise(8)), generators(1, 2))
    assert_same_trajectory(ours, run_reference(scheduler, noisy, generators(1, 2), timesteps=timesteps))


def test_img2img_lms_builds_its_order_up_from_the_cut():
    # Deliberate difference from diffusers: after the cut LMS has no history, so its first step is
    # Euler (as in k-diffusion). diffusers picks the order from the absolute step index and
    # applies 4th-order coefficients to the one derivative it has.
    plan = samplers.img2img_plan(samplers.make_plan("lms", 25), 0.5)
    euler_plan = samplers.img2img_plan(samplers.make_plan("euler", 25), 0.5)
    x = samplers.add_noise(plan, start_noise(7), start_noise(8))
    model_output = dummy_model(samplers.scale_model_input(plan, 0, x), plan.timesteps[0])
    x_lms, state = samplers.step(plan, 0, x, model_output, samplers.initial_state(plan))
    x_euler, _ = samplers.step(euler_plan, 0, x, model_output, None)
    assert torch.allclose(x_lms, x_euler, rtol=1e-6, atol=1e-6)
    assert len(state.derivatives) == 1


def test_img2img_plan_leaves_the_original_untouched():
    plan = samplers.make_plan("heun", 10)
    timesteps, sigmas = plan.timesteps.clone(), plan.sigmas.clone()
    cut = samplers.img2img_plan(plan, 0.5)
    assert len(cut.timesteps) == 2 * 5 - 1 and cut.start_step == 5
    assert torch.equal(plan.timesteps, timesteps) and torch.equal(plan.sigmas, sigmas)
    assert plan.start_step == 0


# ---------------------------------------------------------------------------------------------
# No hidden state.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_running_twice_gives_the_same_result(name):
    plan = samplers.make_plan(name, 10, eta=0.5 if name in ("euler_a", "ddim") else None)
    x = start_noise() * plan.init_noise_sigma
    first = run_ours(plan, x, generators(1, 2))
    second = run_ours(plan, x, generators(1, 2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", samplers.SAMPLER_NAMES)
def test_a_step_repeated_with_the_same_inputs_repeats_its_output(name):
    plan = samplers.make_plan(name, 10)
    x, state = start_noise() * plan.init_noise_sigma, samplers.initial_state(plan)
    for i in range(3):  # get some history into the state
        model_output = dummy_model(samplers.scale_model_input(plan, i, x), plan.timesteps[i])
        x, state = samplers.step(plan, i, x, model_output, state, generators(1, 2), model_output)
    model_output = dummy_model(x, plan.timesteps[3])
    once = samplers.step(plan, 3, x, model_output, state, generators(1, 2), model_output)
    twice = samplers.step(plan, 3, x, model_output, state, generators(1, 2), model_output)
    assert torch.equal(once[0], twice[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.eta = 1.0


def test_heun_ends_with_a_plain_euler_step():
    plan = samplers.make_plan("heun", 3)
    assert plan.sigmas[-1] == 0 and len(plan.timesteps) == 5
    x, state = start_noise() * plan.init_noise_sigma, samplers.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        x, state = samplers.step(plan, i, x, dummy_model(samplers.scale_model_input(plan, i, x), t), state)
        # after a corrector call, and after the last (plain Euler) step, the next call is a predictor
        assert (state.stage == "predictor") == (i % 2 == 1 or i == len(plan.timesteps) - 1)


def test_pndm_names_its_stages_and_redoes_its_first_step_from_the_same_start():
    plan = samplers.make_plan("pndm", 5)
    assert plan.timesteps.tolist() == [801, 601, 601, 401, 201, 1]  # the second timestep twice
    x = start_noise()
    state, stages = samplers.initial_state(plan), []
    for i, t in enumerate(plan.timesteps):
        stages.append(state.stage)
        x_before = x
        x, state = samplers.step(plan, i, x, dummy_model(x, t), state)
        if i == 0:
            assert state.x_start is x_before
    assert stages == ["first", "redo_first", "multistep", "multistep", "multistep", "multistep"]
    assert state.x_start is None and len(state.model_outputs) == 4  # the redo's output is not kept


# ---------------------------------------------------------------------------------------------
# The step functions on their own.
# ---------------------------------------------------------------------------------------------


def test_lms_coefficients_are_exact_integrals():
    nodes, sigma_next = [5.0, 3.1, 2.0, 1.2], 0.7
    for j in range(4):

        def basis(tau, j=j):
            value = 1.0
            for k, node in enumerate(nodes):
                if k != j:
                    value *= (tau - node) / (nodes[j] - node)
            return value

        exact = integrate.quad(basis, nodes[-1], sigma_next, epsabs=1e-13)[0]
        assert samplers.lagrange_basis_integral(nodes, j, nodes[-1], sigma_next) == pytest.approx(exact, rel=1e-12)
    total = sum(samplers.lagrange_basis_integral(nodes, j, nodes[-1], sigma_next) for j in range(4))
    assert total == pytest.approx(sigma_next - nodes[-1])  # the basis sums to 1


def test_euler_step_lands_on_x0_at_sigma_zero():
    x, denoised = torch.randn(3), torch.randn(3)
    assert torch.allclose(samplers.euler_step(x, denoised, torch.tensor(2.0), torch.tensor(0.0)), denoised)


def test_ancestral_sigmas_add_up_to_the_next_level():
    sigma_down, sigma_up = samplers.ancestral_sigmas(torch.tensor(3.0), torch.tensor(2.0))
    assert (sigma_down**2 + sigma_up**2).item() == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, num_steps, options, message",
    [
        ("euler", 0, {}, "num_steps must be at least 1, got 0"),
        ("ddim", -5, {}, "num_steps must be at least 1, got -5"),
        ("lms", 1001, {}, "num_steps 1001 is more than the 1000 training timesteps"),
        ("euler", 10.0, {}, "num_steps must be an integer"),
        ("ddim", 10, {"eta": -0.1}, "eta must be >= 0, got -0.1"),
        ("euler", 10, {"eta": 0.5}, "eta only applies to 'euler_a', 'ddim', 'dpmpp_2m_sde'"),
        ("dpm++", 10, {}, "unknown sampler 'dpm\\+\\+'; known: euler, euler_a, lms, ddim, pndm, dpmpp_2m, heun"),
        ("euler", 10, {"spacing": "even"}, "unknown spacing 'even'; known: leading, linspace, trailing"),
        ("euler", 10, {"prediction_type": "sample"}, "unknown prediction_type 'sample'; known: epsilon, v_prediction"),
        ("ddim", 10, {"karras": True}, "karras sigmas need a sigma-based sampler, not 'ddim'"),
    ],
)
def test_bad_plan_arguments_are_refused(name, num_steps, options, message):
    with pytest.raises(ValueError, match=message):
        samplers.make_plan(name, num_steps, **options)


@pytest.mark.parametrize("strength", [0, -0.5, 1.01, 2])
def test_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        samplers.img2img_plan(samplers.make_plan("euler", 10), strength)


def test_strength_too_small_for_one_step_is_refused():
    with pytest.raises(ValueError, match="leaves no step to run"):
        samplers.img2img_plan(samplers.make_plan("euler", 10), 0.05)


def test_wrong_number_of_generators_is_refused():
    plan = samplers.make_plan("euler_a", 10)
    x = start_noise()
    with pytest.raises(ValueError, match="got 3 generators for a batch of 2"):
        samplers.step(plan, 0, x, x, None, generators=generators(1, 2, 3))


def test_call_index_outside_the_plan_is_refused():
    plan = samplers.make_plan("euler", 10)
    with pytest.raises(ValueError, match="call index 10 is outside the plan's 10 calls"):
        samplers.scale_model_input(plan, 10, start_noise())
