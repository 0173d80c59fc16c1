"""The training schedule and the timestep grids, checked bit for bit against diffusers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from reference_pipeline import SD15
from sd_scratch import schedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def euler_reference():
    return EulerDiscreteScheduler(**SD15)


def test_betas_alphas_cumprod_sigmas_equal_diffusers(euler_reference):
    assert schedule.betas().dtype == torch.float32
    assert torch.equal(schedule.betas(), euler_reference.betas)
    assert torch.equal(schedule.alphas_cumprod(), euler_reference.alphas_cumprod)
    # diffusers keeps the training sigmas noisiest first, with a 0 appended.
    assert torch.equal(schedule.sigmas().flip(0), euler_reference.sigmas[:-1])


def test_sigma_range_is_the_familiar_one():
    sigmas = schedule.sigmas()
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)
    assert bool((sigmas[1:] > sigmas[:-1]).all())


def test_linear_beta_schedule_equals_diffusers():
    config = schedule.ScheduleConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    reference = EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    assert torch.equal(schedule.alphas_cumprod(config), reference.alphas_cumprod)


def test_sd15_leading_timesteps():
    assert schedule.spaced_timesteps(50, "leading")[:3].tolist() == [981, 961, 941]
    assert schedule.spaced_timesteps(50, "leading")[-1] == 1
    assert schedule.spaced_timesteps(10, "linspace")[[0, -1]].tolist() == [999, 0]
    assert schedule.spaced_timesteps(10, "trailing")[[0, -1]].tolist() == [999, 99]


@pytest.mark.parametrize("spacing", schedule.SPACINGS)
def test_spaced_timesteps_equal_diffusers_for_every_step_count(spacing, euler_reference):
    euler = EulerDiscreteScheduler(**SD15, timestep_spacing=spacing)
    ddim = DDIMScheduler(**SD15, timestep_spacing=spacing)
    for num_steps in [*range(1, 61), 61, 96, 100, 103, 250, 333, 500, 999, 1000]:
        ours = schedule.spaced_timesteps(num_steps, spacing)
        euler.set_timesteps(num_steps)
        ddim.set_timesteps(num_steps)
        # diffusers' "trailing" sometimes has one point too many (a final t = -1); we stop at num_steps.
        assert np.array_equal(ours.astype(np.float32), euler.timesteps.numpy()[:num_steps]), num_steps
        assert np.array_equal(ours.round().astype(np.int64), ddim.timesteps.numpy()[:num_steps]), num_steps


def test_sigmas_at_equals_diffusers_interpolation(euler_reference):
    euler = EulerDiscreteScheduler(**SD15, timestep_spacing="linspace")
    euler.set_timesteps(30)
    ours = schedule.sigmas_at(schedule.spaced_timesteps(30, "linspace").astype(np.float32))
    assert np.array_equal(ours.astype(np.float32), euler.sigmas.numpy()[:-1])


def test_sigma_to_timestep_equals_diffusers(euler_reference):
    training_sigmas = schedule.sigmas().numpy()
    log_sigmas = np.log(training_sigmas)
    probes = np.concatenate([[1e-3, 0.0292, 0.5, 1.0, 7.5, 14.6146, 20.0], np.geomspace(0.03, 14.6, 97)])
    ours = schedule.sigma_to_timestep(probes)
    theirs = np.array([euler_reference._sigma_to_t(s, log_sigmas) for s in probes])
    assert np.array_equal(ours, theirs)
    # ... and it inverts sigmas_at on the training grid.
    assert np.allclose(schedule.sigma_to_timestep(training_sigmas[::37]), np.arange(1000)[::37], atol=1e-3)


def test_karras_sigmas_equal_diffusers(euler_reference):
    ours = schedule.karras_sigmas(0.0292, 14.6146, 25)
    theirs = euler_reference._convert_to_karras(np.array([14.6146, 0.0292]), 25)
    assert np.array_equal(ours, theirs)
    assert ours[0] == pytest.approx(14.6146) and ours[-1] == pytest.approx(0.0292)


@pytest.mark.parametrize(
    "num_steps, message",
    [(0, "at least 1"), (-3, "at least 1"), (1001, "more than the 1000"), (2.5, "integer"), (True, "integer")],
)
def test_bad_step_counts_are_refused(num_steps, message):
    with pytest.raises(ValueError, match=message):
        schedule.spaced_timesteps(num_steps, "leading")


def test_unknown_spacing_and_beta_schedule_are_refused():
    with pytest.raises(ValueError, match="unknown spacing 'evenly'"):
        schedule.spaced_timesteps(10, "evenly")
    with pytest.raises(ValueError, match="unknown beta_schedule 'cosine'"):
        schedule.betas(schedule.ScheduleConfig(beta_schedule="cosine"))
