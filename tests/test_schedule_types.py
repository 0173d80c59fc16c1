"""The schedule types (how the steps' noise levels are placed) against diffusers, scipy and the published
Align Your Steps levels; every sampler's trajectory on every schedule type it walks."""

import numpy as np
import pytest
import torch
from scipy import stats

from reference_pipeline import reference_scheduler
from sd_scratch import samplers, schedule
from test_samplers import STEP_COUNTS, assert_same_trajectory, generators, run_ours, run_reference, start_noise

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

DIFFUSERS_TYPES = ("exponential", "beta")  # those diffusers' schedulers implement (karras: tests/test_samplers.py)
OWN_TYPES = ("sgm_uniform", "ays")  # those diffusers has no option for: checked against their definitions below


def test_the_incomplete_beta_function_and_its_inverse_equal_scipys():
    for a, b in [(0.6, 0.6), (2.5, 0.7), (1.0, 3.0)]:
        xs = np.linspace(0, 1, 501)
        assert max(abs(schedule.regularized_incomplete_beta(x, a, b) - stats.beta.cdf(x, a, b)) for x in xs) < 1e-13
        ps = np.linspace(0, 1, 101)
        assert max(abs(schedule.beta_quantile(p, a, b) - stats.beta.ppf(p, a, b)) for p in ps) < 1e-13


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
@pytest.mark.parametrize("schedule_type", DIFFUSERS_TYPES)
@pytest.mark.parametrize("name", ["euler", "lms", "heun", "dpmpp_2m", "dpm2", "dpm2_a", "dpmpp_2m_sde",
                                  "dpmpp_2m_sde_heun", "dpmpp_sde", "unipc", "unipc_3"])
def test_trajectory_on_diffusers_schedule_types(name, schedule_type, num_steps):
    plan = samplers.make_plan(name, num_steps, schedule_type=schedule_type)
    reference = reference_scheduler(name, schedule_type=schedule_type)
    reference.set_timesteps(num_steps)
    # Cut to whole timesteps, beta's crowded ends can repeat one (dpmpp_2m at 50 steps: 999 twice); diffusers
    # then starts from the second (its image-to-image rule) and runs off the end. Start it at the first.
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(0)
    assert plan.timesteps.dtype == reference.timesteps.dtype
    # the beta quantiles are ours, not scipy's: equal to 1e-13, which can move a float32 timestep by one ulp
    torch.testing.assert_close(plan.timesteps, reference.timesteps, rtol=1e-6, atol=1e-4)
    noise = start_noise()
    ours = run_ours(plan, noise * plan.init_noise_sigma, generators(1, 2))
    theirs = run_reference(reference, noise * reference.init_noise_sigma, generators(1, 2))
    assert_same_trajectory(ours, theirs)


def k_diffusion_t_to_sigma(t: np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteSchedule.t_to_sigma, the sigma of a fractional timestep (log-linear between steps)."""
    log_sigmas = np.log(schedule.sigmas().numpy().astype(np.float64))
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    return np.exp((1 - (t - low)) * log_sigmas[low] + (t - low) * log_sigmas[high])


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_sgm_uniform_is_evenly_spaced_in_t_over_the_whole_range(num_steps):
    # A1111's sgm_uniform: t from sigma_to_t(sigma_max) to sigma_to_t(sigma_min), num_steps + 1 points,
    # the last dropped.
    expected = k_diffusion_t_to_sigma(np.linspace(999, 0, num_steps + 1)[:-1])
    np.testing.assert_allclose(schedule.sgm_uniform_sigmas(num_steps), expected, rtol=1e-12)
    _, sigmas = schedule.sigma_grid(num_steps, "leading", "sgm_uniform")
    assert sigmas[0] == pytest.approx(14.6146, abs=1e-4) and sigmas[-1] == 0 and len(sigmas) == num_steps + 1


def nvidia_loglinear_interp(levels, count):
    """The interpolation of NVIDIA's Align Your Steps how-to, written out: log sigma, linear in [0, 1]."""
    xs, ys = np.linspace(0, 1, len(levels)), np.log(np.asarray(levels)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, count), xs, ys))[::-1]


# ComfyUI's AlignYourStepsScheduler table for SD 1.5: the training sigmas at NVIDIA's published timesteps.
COMFYUI_AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                   0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_align_your_steps_walks_the_published_timesteps_at_10_steps_and_interpolates_elsewhere(num_steps):
    levels = schedule.ays_sigmas(num_steps)
    # ComfyUI computed its table in float64, we read the float32 training sigmas: equal to 2e-5
    np.testing.assert_allclose(levels, nvidia_loglinear_interp(COMFYUI_AYS_SD1, num_steps + 1)[:-1], rtol=2e-5)
    if num_steps == 10:
        from diffusers.schedulers import AysSchedules
        timesteps, _ = schedule.sigma_grid(10, "leading", "ays")
        np.testing.assert_allclose(timesteps.numpy(), AysSchedules["StableDiffusionTimesteps"], atol=1e-3)


# ComfyUI's table for SDXL, likewise.
COMFYUI_AYS_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                    0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_the_sdxl_align_your_steps_table_is_nvidias_and_interpolates_the_same_way(num_steps):
    from diffusers.schedulers import AysSchedules
    assert list(schedule.AYS_SDXL_TIMESTEPS[:-1]) == AysSchedules["StableDiffusionXLTimesteps"]
    levels = schedule.ays_sigmas(num_steps, timesteps=schedule.AYS_SDXL_TIMESTEPS)
    np.testing.assert_allclose(levels, nvidia_loglinear_interp(COMFYUI_AYS_SDXL, num_steps + 1)[:-1], rtol=2e-5)
    # the two tables share their ends and nothing between
    sd15 = schedule.ays_sigmas(10)
    assert levels[0] == sd15[0] and (num_steps != 10 or np.abs(levels[1:] / sd15[1:] - 1).min() > 0.009)


@pytest.mark.parametrize("num_steps", [3, 10, 25])
@pytest.mark.parametrize("schedule_type", OWN_TYPES)
def test_euler_on_our_own_schedule_types_equals_diffusers_given_the_same_sigmas(schedule_type, num_steps):
    plan = samplers.make_plan("euler", num_steps, schedule_type=schedule_type)
    reference = reference_scheduler("euler")
    reference.set_timesteps(sigmas=plan.sigmas.tolist())
    torch.testing.assert_close(plan.timesteps, reference.timesteps, rtol=1e-6, atol=0)
    assert plan.init_noise_sigma == pytest.approx(float(reference.init_noise_sigma), rel=1e-6)
    noise = start_noise()
    assert_same_trajectory(run_ours(plan, noise * plan.init_noise_sigma),
                           run_reference(reference, noise * reference.init_noise_sigma))


@pytest.mark.parametrize("num_steps", [3, 10, 25])
@pytest.mark.parametrize("schedule_type", OWN_TYPES)
@pytest.mark.parametrize("name", ["euler_a", "lms", "heun", "dpmpp_2m"])
def test_other_samplers_on_our_own_schedule_types_equal_diffusers_stepping_our_grid(name, schedule_type, num_steps):
    """diffusers has no option for these levels: its scheduler is set up, then given our timesteps and
    sigmas, so that what is compared is its stepping on the same grid."""
    plan = samplers.make_plan(name, num_steps, schedule_type=schedule_type)
    reference = reference_scheduler(name)
    reference.set_timesteps(num_steps)
    assert len(reference.timesteps) == len(plan.timesteps)
    reference.timesteps, reference.sigmas = plan.timesteps.clone(), plan.sigmas.clone()
    noise = start_noise()
    assert_same_trajectory(run_ours(plan, noise * plan.init_noise_sigma, generators(1, 2)),
                           run_reference(reference, noise * plan.init_noise_sigma, generators(1, 2)))


@pytest.mark.parametrize("name, schedule_type, message", [
    ("ddim", "ays", "'ddim' walks the 'spaced' schedule, not 'ays'"),
    ("pndm", "beta", "'pndm' walks the 'spaced' schedule, not 'beta'"),
    ("euler", "cosine", "unknown schedule type 'cosine'; known: spaced, karras, exponential, beta, sgm_uniform, ays"),
])
def test_a_schedule_type_a_sampler_cannot_walk_is_refused(name, schedule_type, message):
    with pytest.raises(ValueError, match=message):
        samplers.make_plan(name, 10, schedule_type=schedule_type)


def test_ays_refuses_a_model_trained_on_another_schedule():
    with pytest.raises(ValueError, match="fitted to SD's training schedule"):
        samplers.make_plan("euler", 10, schedule_type="ays", schedule=schedule.ScheduleConfig(beta_schedule="linear"))
