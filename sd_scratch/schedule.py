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

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "linspace", "trailing")
# How the noise levels of the steps are chosen: "spaced" reads them off the spaced timesteps; the others
# place them by a rule of their own, between the levels the spacing would start and end at ("sgm_uniform"
# and "ays" over the whole training range).
SCHEDULE_TYPES = ("spaced", "karras", "exponential", "beta", "sgm_uniform", "ays")


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
    # Not the training schedule but the model family's: which published Align Your Steps timesteps it walks
    # (AYS_SD15_TIMESTEPS below; the loaders give SDXL's models "sdxl").
    ays_family: str = "sd15"


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


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion's get_sigmas_exponential): every step shrinks sigma by one factor."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): the levels at the quantiles of a Beta(0.6, 0.6)
    distribution, evenly spaced in probability, mapped linearly onto [sigma_min, sigma_max] (as diffusers'
    use_beta_sigmas). Beta(0.6, 0.6) is U-shaped, so the steps crowd at both ends of the walk."""
    quantiles = [beta_quantile(p, alpha, beta) for p in 1 - np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def sgm_uniform_sigmas(num_steps: int, schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """The levels at timesteps evenly spaced over the whole training range, from T - 1 down to (not
    including) 0, read between training steps log-linearly: A1111's and ComfyUI's "SGM Uniform"."""
    timesteps = np.linspace(schedule.num_train_timesteps - 1, 0, num_steps + 1)[:-1]
    log_sigmas = np.log(sigmas(schedule).numpy().astype(np.float64))
    low = np.floor(timesteps).astype(np.int64)
    high = np.minimum(low + 1, len(log_sigmas) - 1)
    weight = timesteps - low
    return np.exp((1 - weight) * log_sigmas[low] + weight * log_sigmas[high])


# Align Your Steps (Sabour et al. 2024): the 10-step schedules NVIDIA optimised for SD 1.5 and for SDXL,
# as the training timesteps it published (11 points; the walk goes from the 10th to 0, the 11th is not
# walked). Both models share one training schedule, so only the model family picks the table: SD 1.x and
# 2.x walk SD 1.5's; an SDXL checkpoint passes AYS_SDXL_TIMESTEPS.
AYS_SD15_TIMESTEPS = (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0)
AYS_SDXL_TIMESTEPS = (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0)


def ays_sigmas(num_steps: int, schedule: ScheduleConfig = SD15_SCHEDULE,
               timesteps: tuple[int, ...] = AYS_SD15_TIMESTEPS) -> np.ndarray:
    """The training sigmas at the published timesteps, or, for another step count, their log-linear
    interpolation onto num_steps + 1 evenly spaced points (as NVIDIA's how-to and ComfyUI do); the last
    point, where the walk ends at 0, is dropped."""
    levels = sigmas(schedule).numpy().astype(np.float64)[list(timesteps)]
    if num_steps + 1 != len(levels):
        positions = np.linspace(0, 1, len(levels))
        wanted = np.linspace(0, 1, num_steps + 1)
        levels = np.exp(np.interp(wanted, positions, np.log(levels[::-1])))[::-1]
    return levels[:-1]


def noise_levels(schedule_type: str, sigma_min: float, sigma_max: float, num_steps: int,
                 schedule: ScheduleConfig = SD15_SCHEDULE) -> np.ndarray:
    """num_steps levels, noisiest first, by the rule `schedule_type` names (not "spaced")."""
    if schedule_type == "karras":
        return karras_sigmas(sigma_min, sigma_max, num_steps)
    if schedule_type == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, num_steps)
    if schedule_type == "beta":
        return beta_sigmas(sigma_min, sigma_max, num_steps)
    if schedule_type == "sgm_uniform":
        return sgm_uniform_sigmas(num_steps, schedule)
    if schedule_type == "ays":
        training = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        if any(getattr(schedule, name) != getattr(SD15_SCHEDULE, name) for name in training):
            raise ValueError("the Align Your Steps levels were fitted to SD's training schedule, not to this model's")
        return ays_sigmas(num_steps, schedule, AYS_SDXL_TIMESTEPS if schedule.ays_family == "sdxl" else
                          AYS_SD15_TIMESTEPS)
    raise ValueError(f"unknown schedule type {schedule_type!r}; known: {', '.join(SCHEDULE_TYPES)}")


def beta_quantile(p: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = p (the inverse of the regularized incomplete beta function), by bisection:
    I_x grows with x, and 60 halvings of [0, 1] leave an interval below float64's resolution."""
    if p <= 0 or p >= 1:
        return float(p >= 1)  # the ends exactly (near them I_x can reach 1.0 in floating point early)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if regularized_incomplete_beta(middle, a, b) < p else (low, middle)
    return (low + high) / 2


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the cumulative distribution of Beta(a, b) at x, from its continued fraction
    (Press et al., "Numerical Recipes", sec. 6.4):

        I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) / g,   g = 1 + d_1 / (1 + d_2 / (1 + d_3 / ...))
        d_2m+1 = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),   d_2m = m (b - m) x / ((a + 2m - 1)(a + 2m))

    g is evaluated front to back by Lentz's method. The fraction converges fast below
    x = (a + 1) / (a + b + 2); above it, I_x(a, b) = 1 - I_(1-x)(b, a) is used instead.
    """
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - regularized_incomplete_beta(1 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300  # keeps Lentz's ratios off zero
    g, c, d = 1.0, 1.0, 0.0
    for j in range(1, 400):
        m = j // 2
        if j % 2:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + term * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + term / c
        c = c if abs(c) > tiny else tiny
        g *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) / (a * g)


# --------------------------------------------------------------------------------------------------
# The grids the samplers walk. Each takes (num_steps, spacing, schedule_type, schedule) and returns
# (timesteps given to the UNet, noise levels or None), in the dtypes diffusers uses.


def sigma_grid(num_steps: int, spacing: str, schedule_type: str, schedule: ScheduleConfig = SD15_SCHEDULE):
    """k-diffusion's grid (diffusers' Euler, LMS, Heun): the spaced timesteps, fractional, as float32,
    and the sigma at each, then 0, where the last step lands.

    Another schedule type places the levels by its own rule, between the first and the last sigma of the
    spaced grid ("sgm_uniform" and "ays" over their own range), each with its fractional timestep.
    """
    timesteps = spaced_timesteps(num_steps, spacing, schedule).astype(np.float32)
    levels = sigmas_at(timesteps, schedule)
    if schedule_type != "spaced":
        levels = noise_levels(schedule_type, levels[-1].item(), levels[0].item(), num_steps, schedule)
        timesteps = sigma_to_timestep(levels, schedule).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(np.append(levels, 0.0).astype(np.float32))


def dpm_solver_grid(num_steps: int, spacing: str, schedule_type: str, schedule: ScheduleConfig = SD15_SCHEDULE):
    """diffusers' DPMSolverMultistepScheduler's grid: whole timesteps, and the sigma at each, then 0.

    It spaces num_steps + 1 points and drops the last (t = 0) for "leading" and "linspace". Another
    schedule type spans the whole training range; its timesteps are the nearest whole ones for
    "karras" (and, with no diffusers to follow, "sgm_uniform" and "ays"), and cut to whole ones for
    "exponential" and "beta", as diffusers does.
    """
    if schedule_type == "spaced":
        if spacing == "trailing":
            timesteps = spaced_timesteps(num_steps, spacing, schedule)
        else:
            timesteps = spaced_timesteps(num_steps + 1, spacing, schedule)[:-1]
        timesteps = timesteps.round()
        levels = sigmas_at(timesteps, schedule)
    else:
        training_sigmas = sigmas(schedule)
        levels = noise_levels(schedule_type, training_sigmas[0].item(), training_sigmas[-1].item(), num_steps,
                              schedule)
        timesteps = sigma_to_timestep(levels, schedule)
        if schedule_type not in ("exponential", "beta"):
            timesteps = timesteps.round()
    return (torch.from_numpy(timesteps.astype(np.int64)),
            torch.from_numpy(np.append(levels, 0.0).astype(np.float32)))


def timestep_grid(num_steps: int, spacing: str, schedule_type: str, schedule: ScheduleConfig = SD15_SCHEDULE):
    """The grid of DDIM and PNDM: whole timesteps only (int64); their steps read alpha_bar off the
    training schedule at t and t - T // num_steps, so there are no sigmas (and only the "spaced" type)."""
    return torch.from_numpy(spaced_timesteps(num_steps, spacing, schedule).round().astype(np.int64)), None
