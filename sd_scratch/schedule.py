"""The noise schedule Stable Diffusion was trained with, and how inference picks its steps from it.

Training noised a clean latent x0 in T = 1000 steps. At step t the noisy latent is

    x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise        (Ho et al. 2020, eq. 4)

where alpha_bar_t is the running product of (1 - beta) up to t. Dividing by sqrt(alpha_bar_t) gives
the same noise level in the "sigma view" of k-diffusion (Karras et al. 2022):

    x = x0 + sigma_t * noise,   sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)

The two views differ only by the factor sqrt(alpha_bar_t) = 1 / sqrt(sigma_t**2 + 1). Samplers that
think in sigmas (Euler, LMS, Heun) hold x in the sigma view and divide it by sqrt(sigma**2 + 1)
before the UNet sees it, because the UNet was trained on the alpha view.

The second half of this file is how inference picks its grid of noise levels from the training
schedule: which timesteps (spacings), which sigmas (interpolated, or Karras'), and the three grids
the samplers walk. The numbers are computed exactly as diffusers computes them (float32 betas;
timestep grids in numpy float64), so that our timesteps and sigmas agree with it bit for bit.
"""

from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "linspace", "trailing")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule. Defaults are SD 1.x/2.x (v1.5 scheduler_config.json)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # Added to every "leading" timestep, so 50 steps run 981, 961, ..., 1 instead of 980, ..., 0.
    steps_offset: int = 1
    # DDIM and PNDM step past t = 0 to alpha_bar = 1 (True) or stop at alpha_bar_0 (False, SD).
    set_alpha_to_one: bool = False
    # How inference spreads its steps over the training timesteps unless told otherwise (SPACINGS).
    # SD 1.x/2.x and SDXL: "leading"; the few-step Turbo and Lightning models: "trailing".
    timestep_spacing: str = "leading"


SD15_SCHEDULE = ScheduleConfig()


def betas(schedule: ScheduleConfig = SD15_SCHEDULE) -> torch.Tensor:
    """The variance of the noise added at each training step, float32 like the reference."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        # Linear in sqrt(beta), then squared: the schedule of the original LDM code.
        root_betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, n, dtype=torch.float32)
        return root_betas**2
    if schedule.beta_schedule == "linear":
        return torch.linspace(schedule.beta_start, schedule.beta_end, n, dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {schedule.beta_schedule!r}; known: 'scaled_linear', 'linear'")


def alphas_cumprod(schedule: ScheduleConfig = SD15_SCHEDULE) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s): how much of x0 survives at step t."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


def sigmas(schedule: ScheduleConfig = SD15_SCHEDULE) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0 .. T-1, rising from 0.029 to 14.6."""
    alpha_bar = alphas_cumprod(schedule)
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def alpha_and_noise_level(sigma):
    """sigma view -> alpha view: alpha = sqrt(alpha_bar) = 1 / sqrt(sigma**2 + 1), noise level = sigma * alpha."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


# --------------------------------------------------------------------------------------------------
# Inference: choosing the steps


def check_num_steps(num_steps, schedule: ScheduleConfig = SD15_SCHEDULE) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps must be an integer, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if num_steps > schedule.num_train_timesteps:
        raise ValueError(
            f"num_steps {num_steps} is more than the {schedule.num_train_timesteps} training timesteps"
        )


def spaced_timesteps(num_steps: int, spacing: str, schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """Pick num_steps of the training timesteps, noisiest first (float64; "linspace" is not rounded).

    The three spacings of "Common Diffusion Noise Schedules and Sample Steps Are Flawed"
    (Lin et al. 2023, table 2), for T = 1000 and 10 steps:
      leading   0, 100, ..., 900 plus steps_offset  -> 901, 801, ..., 1   (SD 1.5's default)
      linspace  evenly from 0 to T-1, both ends     -> 999, 888, ..., 0
      trailing  every T/N counting down from T, - 1 -> 999, 899, ..., 99
    """
    check_num_steps(num_steps, schedule)
    T = schedule.num_train_timesteps
    if spacing == "leading":
        ascending = np.arange(num_steps) * (T // num_steps) + schedule.steps_offset
    elif spacing == "linspace":
        ascending = np.linspace(0, T - 1, num_steps)
    elif spacing == "trailing":
        # np.arange with a float step, as diffusers does, so that halves round the same way. It can
        # overshoot by one point for some num_steps (61, 103, ...); diffusers keeps that extra t = -1.
        descending = np.arange(T, 0, -T / num_steps).round()[:num_steps] - 1
        return descending.astype(np.float64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    return ascending[::-1].astype(np.float64)


def sigmas_at(timesteps: np.ndarray, schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, interpolated linearly between training steps."""
    training_sigmas = sigmas(schedule).numpy()
    return np.interp(timesteps, np.arange(len(training_sigmas)), training_sigmas)


def sigma_to_timestep(sigma: np.ndarray, schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """The (fractional) timestep whose noise level is sigma: the inverse of sigmas_at.

    The UNet is told a timestep, not a sigma, so a sampler that chooses its own sigmas (Karras)
    must find the t with that noise level. log(sigma) is close to linear in t, so we interpolate
    in log space between the two neighbouring training steps.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    training_log_sigmas = np.log(sigmas(schedule).numpy())  # float32, rising with t
    last = len(training_log_sigmas) - 1
    low = np.clip(np.searchsorted(training_log_sigmas, log_sigma, side="right") - 1, 0, last - 1)
    log_low, log_high = training_log_sigmas[low], training_log_sigmas[low + 1]
    weight = np.clip((log_low - log_sigma) / (log_low - log_high), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma**(1/rho), so steps crowd near sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# --------------------------------------------------------------------------------------------------
# The three grids the samplers walk. Each takes (num_steps, spacing, karras, schedule) and returns
# (timesteps given to the UNet, noise levels or None), in the dtypes diffusers uses.


def sigma_grid(num_steps: int, spacing: str, karras: bool, schedule: ScheduleConfig = SD15_SCHEDULE):
    """k-diffusion's grid (diffusers' Euler, LMS, Heun): the spaced timesteps, fractional, as float32,
    and the sigma at each, then 0, where the last step lands.

    karras: the sigmas of Karras et al. 2022 between the spaced grid's first and last sigma instead,
    with the (fractional) timestep of each.
    """
    timesteps = spaced_timesteps(num_steps, spacing, schedule).astype(np.float32)
    levels = sigmas_at(timesteps, schedule)
    if karras:
        levels = karras_sigmas(levels[-1].item(), levels[0].item(), num_steps)
        timesteps = sigma_to_timestep(levels, schedule).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(np.append(levels, 0.0).astype(np.float32))


def dpm_solver_grid(num_steps: int, spacing: str, karras: bool, schedule: ScheduleConfig = SD15_SCHEDULE):
    """diffusers' DPMSolverMultistepScheduler's grid: whole timesteps, and the sigma at each, then 0.

    It spaces num_steps + 1 points and drops the last (t = 0) for "leading" and "linspace". With
    karras, Karras sigmas span the whole training range and each is given its nearest whole timestep.
    """
    if karras:
        training_sigmas = sigmas(schedule)
        levels = karras_sigmas(training_sigmas[0].item(), training_sigmas[-1].item(), num_steps)
        timesteps = sigma_to_timestep(levels, schedule).round()
    else:
        if spacing == "trailing":
            timesteps = spaced_timesteps(num_steps, spacing, schedule)
        else:
            timesteps = spaced_timesteps(num_steps + 1, spacing, schedule)[:-1]
        timesteps = timesteps.round()
        levels = sigmas_at(timesteps, schedule)
    return (torch.from_numpy(timesteps.astype(np.int64)),
            torch.from_numpy(np.append(levels, 0.0).astype(np.float32)))


def timestep_grid(num_steps: int, spacing: str, karras: bool, schedule: ScheduleConfig = SD15_SCHEDULE):
    """The grid of DDIM and PNDM: whole timesteps only (int64); their steps read alpha_bar off the
    training schedule at t and t - T // num_steps, so there are no sigmas. (karras does not apply.)"""
    return torch.from_numpy(spaced_timesteps(num_steps, spacing, schedule).round().astype(np.int64)), None
