"""The samplers: one small step function per method, and the plan of noise levels it walks down.

A sampler turns the UNet's prediction at one noise level into a latent at the next, lower one.
The loop in sample.py reads, for every sampler:

    plan = make_plan("euler", 50)
    x = noise * plan.init_noise_sigma
    state = initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = unet(scale_model_input(plan, i, x), t, text)   # noise (or v) prediction
        x, state = step(plan, i, x, model_output, state)

`plan` is everything fixed before the loop (timesteps, noise levels); `state` is the little history
a multistep method carries from one call to the next (LMS, PLMS, DPM++ 2M, Heun's first stage).
Both are frozen and handed back to the caller: nothing is remembered inside this module, so the
same inputs always give the same outputs.

Two ways of holding the noisy latent (see schedule.py):
  sigma view  x = x0 + sigma * noise                      euler, euler_a, lms, heun
  alpha view  x = sqrt(a) * x0 + sqrt(1 - a) * noise      ddim, pndm, dpmpp_2m  (a = alpha_bar)
We keep to the view diffusers uses for each sampler, so every intermediate latent equals its own.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from sd_scratch import schedule as noise_schedule

SAMPLER_NAMES = ("euler", "euler_a", "lms", "ddim", "pndm", "dpmpp_2m", "heun")
SIGMA_VIEW_SAMPLERS = ("euler", "euler_a", "lms", "heun")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LMS_ORDER = 4


@dataclass(frozen=True, eq=False)
class Plan:
    """What a sampler needs to know before the loop starts. Index everything by the call number i."""

    name: str
    num_steps: int
    spacing: str
    karras: bool
    eta: float
    prediction_type: str
    timesteps: torch.Tensor  # the t given to the UNet at each call (Heun and PNDM repeat some)
    # Sigma-view samplers and dpmpp_2m: sigmas[i] is the noise level of x at call i, and
    # sigmas[i + 1] the level the step lands on (0 after the last call).
    sigmas: torch.Tensor | None
    # DDIM and PNDM step from timestep t to t - step_ratio, reading alpha_bar off the training
    # schedule; past t = 0 they land on final_alpha_bar.
    alphas_cumprod: torch.Tensor
    final_alpha_bar: torch.Tensor
    step_ratio: int
    init_noise_sigma: float
    start_step: int = 0  # image-to-image: how many of the num_steps steps were skipped


@dataclass(frozen=True, eq=False)
class LmsState:
    derivatives: tuple = ()  # dx/dsigma at the last calls, oldest first (at most LMS_ORDER)


@dataclass(frozen=True, eq=False)
class PlmsState:
    model_outputs: tuple = ()  # the UNet outputs the multistep formula uses, oldest first
    x_start: torch.Tensor | None = None  # x before step 0, which call 1 redoes


@dataclass(frozen=True, eq=False)
class DpmState:
    previous_denoised: torch.Tensor | None = None  # the x0 estimate of the previous call


@dataclass(frozen=True, eq=False)
class HeunState:
    """Between Heun's predictor call and its corrector call: where the step started, and its slope."""

    x: torch.Tensor
    derivative: torch.Tensor


# ----------------------------------------------------------------------------------------------
# The step functions. Each is the update rule of its paper and nothing else.
# ----------------------------------------------------------------------------------------------


def euler_step(x, denoised, sigma, sigma_next):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - denoised) / sigma.

    Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"),
    Algorithm 1 without its second-order correction.
    """
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """Split the way down from sigma to sigma_next into a deterministic part and fresh noise.

    Going down to sigma_down and adding noise of size sigma_up lands at sigma_next, since
    sigma_down**2 + sigma_up**2 = sigma_next**2. eta = 1 is ancestral (DDPM-like) sampling, eta = 0
    is plain Euler (k-diffusion's get_ancestral_step).
    """
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral_step(x, denoised, sigma, sigma_next, noise, eta=1.0):
    """An Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion's
    sample_euler_ancestral: DDPM's ancestral sampling, Ho et al. 2020, in the sigma view)."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_down - sigma) + noise * sigma_up


def lagrange_basis_integral(nodes, j, start, end):
    """Integral from start to end of the Lagrange polynomial that is 1 at nodes[j] and 0 at the others.

    With at most four nodes the polynomial is at most cubic, and two-point Gauss-Legendre quadrature
    is exact for cubics: evaluate at midpoint +- half_width / sqrt(3), each with weight half_width.
    """
    midpoint, half_width = (start + end) / 2, (end - start) / 2
    total = 0.0
    for offset in (-1 / math.sqrt(3), 1 / math.sqrt(3)):
        tau = midpoint + half_width * offset
        basis = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                basis *= (tau - node) / (nodes[j] - node)
        total += half_width * basis
    return total


def lms_step(x, derivatives, derivative_sigmas, sigma_next):
    """Linear multistep (k-diffusion's LMS): x_next = x + sum_j c_j * d_j.

    Fit a polynomial through the last few derivatives d_j (taken at noise levels sigma_j) and
    integrate it from the current sigma to sigma_next: c_j is the integral of the j-th Lagrange
    basis polynomial. With one derivative this is Euler; with even steps it is Adams-Bashforth.
    Both sequences are oldest first; the current sigma is derivative_sigmas[-1].
    """
    nodes = [float(s) for s in derivative_sigmas]
    sigma, sigma_next = nodes[-1], float(sigma_next)
    newest_first = range(len(nodes) - 1, -1, -1)
    coefficients = [lagrange_basis_integral(nodes, j, sigma, sigma_next) for j in newest_first]
    return x + sum(c * derivatives[j] for c, j in zip(coefficients, newest_first))


def heun_corrector_step(x_start, derivative_start, x_predicted, denoised_predicted, sigma, sigma_next):
    """Heun's second stage, the correction of Karras et al. 2022, Algorithm 1.

    The predictor was an Euler step from (x_start, sigma) to x_predicted at sigma_next. Re-take the
    step from x_start with the average of the slopes at both ends: the trapezoid rule.
    """
    derivative_end = (x_predicted - denoised_predicted) / sigma_next
    return x_start + (derivative_start + derivative_end) / 2 * (sigma_next - sigma)


def ddim_step(x, eps, denoised, alpha_bar, alpha_bar_next, eta=0.0, noise=None):
    """DDIM, Song et al. 2021, eq. 12, with the noise size sigma_t(eta) of eq. 16.

    x_next = sqrt(a_next) * x0 + sqrt(1 - a_next - s**2) * eps + s * noise. eta = 0 is the
    deterministic DDIM; eta = 1 has the variance of the DDPM posterior.
    """
    variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
    noise_size = eta * variance**0.5
    direction_to_x = (1 - alpha_bar_next - noise_size**2) ** 0.5 * eps
    x_next = alpha_bar_next**0.5 * denoised + direction_to_x
    if eta > 0:
        x_next = x_next + noise_size * noise
    return x_next


def pndm_transfer(x, eps, alpha_bar, alpha_bar_next):
    """PNDM's transfer part phi (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models").

    Moves x from noise level alpha_bar to alpha_bar_next along the noise direction eps; written
    differently, it is the deterministic DDIM step.
    """
    denominator = alpha_bar * (1 - alpha_bar_next) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_next) ** 0.5
    return (alpha_bar_next / alpha_bar) ** 0.5 * x - (alpha_bar_next - alpha_bar) * eps / denominator


def plms_combined_output(model_outputs):
    """Adams-Bashforth: extrapolate the model output over the step from the last 1 to 4 of them.

    The linear multistep gradient part of PLMS (Liu et al. 2022), oldest output first.
    """
    e = model_outputs[::-1]  # e[0] is the newest
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def alpha_and_noise_level(sigma):
    """sigma view -> alpha view: alpha = sqrt(alpha_bar) = 1 / sqrt(sigma**2 + 1), noise = sigma * alpha."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def dpmpp_2m_step(x, denoised, previous_denoised, sigma_previous, sigma, sigma_next):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Algorithm 2, in the alpha view.

    lambda = log(alpha / noise) is half the log signal-to-noise ratio; h is how far it moves.
        x_next = (noise_next / noise) * x - alpha_next * (exp(-h) - 1) * D
    D is this call's x0 estimate (first order), or, once a previous estimate exists, the estimate
    extrapolated along the last two: D = (1 + 1/(2r)) * x0 - 1/(2r) * x0_previous. The last step,
    down to sigma = 0, stays first order (there h is infinite and x_next = x0).
    """
    alpha, noise = alpha_and_noise_level(sigma)
    alpha_next, noise_next = alpha_and_noise_level(sigma_next)
    lambda_, lambda_next = torch.log(alpha) - torch.log(noise), torch.log(alpha_next) - torch.log(noise_next)
    h = lambda_next - lambda_
    if previous_denoised is None or sigma_next == 0:
        d = denoised
    else:
        alpha_previous, noise_previous = alpha_and_noise_level(sigma_previous)
        r = (lambda_ - (torch.log(alpha_previous) - torch.log(noise_previous))) / h
        d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * previous_denoised
    return (noise_next / noise) * x - alpha_next * (torch.exp(-h) - 1.0) * d


# ----------------------------------------------------------------------------------------------
# From the UNet's output to the clean-latent estimate x0 (and the noise estimate eps).
# ----------------------------------------------------------------------------------------------


def denoised_sigma_view(x, model_output, sigma, prediction_type):
    """x0 from x = x0 + sigma * eps, given eps or, for v-prediction (Salimans & Ho 2022),
    v = sqrt(a) * eps - sqrt(1 - a) * x0: then x0 = x / (sigma**2 + 1) - v * sigma / sqrt(sigma**2 + 1)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def eps_and_denoised_alpha_view(x, model_output, alpha_bar, prediction_type):
    """(eps, x0) from x = sqrt(a) * x0 + sqrt(1 - a) * eps, given eps or v = sqrt(a) eps - sqrt(1-a) x0."""
    if prediction_type == "epsilon":
        eps = model_output
        return eps, (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
    v = model_output
    return alpha_bar**0.5 * v + (1 - alpha_bar) ** 0.5 * x, alpha_bar**0.5 * x - (1 - alpha_bar) ** 0.5 * v


def denoised_dpm(x, model_output, sigma, prediction_type):
    """x0 for dpmpp_2m, whose x is in the alpha view but whose plan is in sigmas."""
    alpha, noise = alpha_and_noise_level(sigma)
    if prediction_type == "epsilon":
        return (x - noise * model_output) / alpha
    return alpha * x - noise * model_output


# ----------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------


def make_plan(
    name: str,
    num_steps: int,
    *,
    spacing: str = "leading",
    karras: bool = False,
    eta: float | None = None,
    prediction_type: str = "epsilon",
    schedule: noise_schedule.ScheduleConfig | None = None,
) -> Plan:
    """The timesteps and noise levels `name` walks for num_steps steps, equal to diffusers'.

    eta: how much fresh noise ancestral samplers add. None means the sampler's usual value: 1 for
    euler_a (what diffusers' EulerAncestralDiscreteScheduler does), 0 for ddim.
    karras: use Karras et al.'s sigmas (rho = 7) instead of the spacing (sigma-based samplers only).
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLER_NAMES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
    if spacing not in noise_schedule.SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(noise_schedule.SPACINGS)}")
    schedule = noise_schedule.SD15_SCHEDULE if schedule is None else schedule
    noise_schedule.check_num_steps(num_steps, schedule)
    eta = _check_eta(name, eta)
    if karras and name in ("ddim", "pndm"):
        raise ValueError(f"karras sigmas need a sigma-based sampler, not {name!r}")

    alphas_cumprod = noise_schedule.alphas_cumprod(schedule)
    final_alpha_bar = torch.tensor(1.0) if schedule.set_alpha_to_one else alphas_cumprod[0]
    timesteps, sigmas = _timesteps_and_sigmas(name, num_steps, spacing, karras, schedule)
    if name in SIGMA_VIEW_SAMPLERS:
        # Start from pure noise at the top sigma. diffusers uses sqrt(sigma_max**2 + 1), the spread
        # of x0 + sigma * noise for unit-variance x0, when the spacing is "leading".
        sigma_max = sigmas.max()
        init_noise_sigma = float((sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max)
    else:
        init_noise_sigma = 1.0  # the alpha view: pure noise has variance 1
    return Plan(
        name=name,
        num_steps=num_steps,
        spacing=spacing,
        karras=bool(karras),
        eta=eta,
        prediction_type=prediction_type,
        timesteps=timesteps,
        sigmas=sigmas,
        alphas_cumprod=alphas_cumprod,
        final_alpha_bar=final_alpha_bar,
        step_ratio=schedule.num_train_timesteps // num_steps,
        init_noise_sigma=init_noise_sigma,
    )


def _check_eta(name, eta):
    if eta is None:
        return 1.0 if name == "euler_a" else 0.0
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and name not in ("euler_a", "ddim"):
        raise ValueError(f"eta only applies to 'euler_a' and 'ddim', not {name!r}")
    return float(eta)


def _timesteps_and_sigmas(name, num_steps, spacing, karras, schedule):
    """The per-call timesteps (dtype as diffusers: float32 for sigma samplers, int64 otherwise)."""
    if name in ("ddim", "pndm"):
        timesteps = noise_schedule.spaced_timesteps(num_steps, spacing, schedule).round().astype(np.int64)
        if name == "pndm" and num_steps > 1:
            # PLMS as SD runs it (skip_prk_steps): the second timestep is visited twice, once for
            # the pseudo improved-Euler correction of the first step.
            timesteps = np.concatenate([timesteps[:2], timesteps[1:]])
        return torch.from_numpy(timesteps), None

    if name == "dpmpp_2m":
        return _dpm_timesteps_and_sigmas(num_steps, spacing, karras, schedule)

    timesteps = noise_schedule.spaced_timesteps(num_steps, spacing, schedule).astype(np.float32)
    sigmas = noise_schedule.sigmas_at(timesteps, schedule)
    if karras:
        sigmas = noise_schedule.karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        timesteps = noise_schedule.sigma_to_timestep(sigmas, schedule).astype(np.float32)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    timesteps = torch.from_numpy(timesteps)
    if name == "heun":
        # Two UNet calls per step: at t_k (predictor), then at t_{k+1} where the predictor landed
        # (corrector). The last step goes to sigma = 0 and is plain Euler.
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    return timesteps, sigmas


def _dpm_timesteps_and_sigmas(num_steps, spacing, karras, schedule):
    """diffusers' DPMSolverMultistepScheduler picks its own grid: N + 1 points, the last (t=0) dropped."""
    training_sigmas = noise_schedule.sigmas(schedule)
    if karras:
        # Karras sigmas over the whole training range, then the nearest whole timestep.
        sigmas = noise_schedule.karras_sigmas(training_sigmas[0].item(), training_sigmas[-1].item(), num_steps)
        timesteps = noise_schedule.sigma_to_timestep(sigmas, schedule).round()
    else:
        if spacing == "trailing":
            timesteps = noise_schedule.spaced_timesteps(num_steps, spacing, schedule)
        else:
            timesteps = noise_schedule.spaced_timesteps(num_steps + 1, spacing, schedule)[:-1]
        timesteps = timesteps.round()
        sigmas = noise_schedule.sigmas_at(timesteps, schedule)
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return torch.from_numpy(timesteps.astype(np.int64)), sigmas


def img2img_plan(plan: Plan, strength: float) -> Plan:
    """The plan cut to start part way down, for image-to-image (diffusers' get_timesteps).

    strength 1 keeps every step (the image is drowned in noise); strength 0.3 keeps the last 30%
    of the steps, so the result stays close to the image.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if plan.start_step != 0:
        raise ValueError("plan is already cut for image-to-image; cut the original plan")
    steps_kept = min(int(plan.num_steps * strength), plan.num_steps)
    if steps_kept == 0:
        raise ValueError(f"strength {strength} of {plan.num_steps} steps leaves no step to run")
    start_step = plan.num_steps - steps_kept
    first_call = start_step * calls_per_step(plan)
    return dataclasses.replace(
        plan,
        timesteps=plan.timesteps[first_call:].clone(),
        sigmas=None if plan.sigmas is None else plan.sigmas[first_call:].clone(),
        start_step=start_step,
    )


def calls_per_step(plan: Plan) -> int:
    """UNet calls per step: 2 for Heun, 1 for the others (diffusers' scheduler.order)."""
    return 2 if plan.name == "heun" else 1


# ----------------------------------------------------------------------------------------------
# What the loop calls.
# ----------------------------------------------------------------------------------------------


def add_noise(plan: Plan, clean_latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x0): put a clean latent at the noise level of the plan's first call."""
    if plan.name in SIGMA_VIEW_SAMPLERS:
        sigma = plan.sigmas[0].to(clean_latents.device, clean_latents.dtype)
        return clean_latents + noise * sigma
    if plan.name == "dpmpp_2m":
        alpha, noise_level = alpha_and_noise_level(plan.sigmas[0].to(clean_latents.device, clean_latents.dtype))
        return alpha * clean_latents + noise_level * noise
    alpha_bar = plan.alphas_cumprod[plan.timesteps[0]].to(clean_latents.device, clean_latents.dtype)
    return alpha_bar**0.5 * clean_latents + (1 - alpha_bar) ** 0.5 * noise


def initial_state(plan: Plan):
    """The empty history the first call starts from (None for the samplers that keep none)."""
    return {"lms": LmsState(), "pndm": PlmsState(), "dpmpp_2m": DpmState()}.get(plan.name)


def scale_model_input(plan: Plan, i: int, x: torch.Tensor) -> torch.Tensor:
    """What the UNet sees at call i. Sigma-view x is divided by sqrt(sigma**2 + 1) back to the alpha
    view the UNet was trained on; the alpha-view samplers pass x through."""
    _check_call(plan, i)
    if plan.name not in SIGMA_VIEW_SAMPLERS:
        return x
    sigma = plan.sigmas[i]
    return x / ((sigma**2 + 1) ** 0.5)


def predicted_x0(plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate at call i (in the alpha view's scale, which is x0's own)."""
    _check_call(plan, i)
    if plan.name in SIGMA_VIEW_SAMPLERS:
        return denoised_sigma_view(x, model_output, plan.sigmas[i], plan.prediction_type)
    if plan.name == "dpmpp_2m":
        return denoised_dpm(x, model_output, plan.sigmas[i], plan.prediction_type)
    alpha_bar = _alpha_bar(plan, plan.timesteps[i])
    return eps_and_denoised_alpha_view(x, model_output, alpha_bar, plan.prediction_type)[1]


def step(plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state, generators=None):
    """Call i's update: returns (x at the next noise level, the state for call i + 1)."""
    _check_call(plan, i)
    return _STEPPERS[plan.name](plan, i, x, model_output, state, generators)


def draw_noise(shape, generators, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn as diffusers' randn_tensor draws it, so seeds give the same images.

    With a list of generators, image b of the batch is drawn from generators[b] on that generator's
    device; the pieces are then moved to `device`.
    """
    if isinstance(generators, (list, tuple)) and len(generators) == 1:
        generators = generators[0]
    if isinstance(generators, (list, tuple)):
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}")
        pieces = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators]
        return torch.cat(pieces).to(device)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generators, device=generators.device, dtype=dtype).to(device)


def _check_call(plan, i):
    if not 0 <= i < len(plan.timesteps):
        raise ValueError(f"call index {i} is outside the plan's {len(plan.timesteps)} calls")


def _alpha_bar(plan, t):
    """alpha_bar at training timestep t; below t = 0 the schedule ends at final_alpha_bar."""
    return plan.alphas_cumprod[t] if t >= 0 else plan.final_alpha_bar


# Each _step_* reads the plan and state, calls the step function above, and builds the next state.
# euler, euler_a and dpmpp_2m work in float32 and hand back the model's dtype, as diffusers does.


def _step_euler(plan, i, x, model_output, state, generators):
    x = x.to(torch.float32)
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    denoised = denoised_sigma_view(x, model_output, sigma, plan.prediction_type)
    return euler_step(x, denoised, sigma, sigma_next).to(model_output.dtype), state


def _step_euler_ancestral(plan, i, x, model_output, state, generators):
    x = x.to(torch.float32)
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    denoised = denoised_sigma_view(x, model_output, sigma, plan.prediction_type)
    noise = torch.zeros_like(model_output)
    if plan.eta > 0:
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    x_next = euler_ancestral_step(x, denoised, sigma, sigma_next, noise, plan.eta)
    return x_next.to(model_output.dtype), state


def _step_lms(plan, i, x, model_output, state, generators):
    sigma = plan.sigmas[i]
    denoised = denoised_sigma_view(x, model_output, sigma, plan.prediction_type)
    derivatives = (*state.derivatives, (x - denoised) / sigma)[-LMS_ORDER:]
    derivative_sigmas = plan.sigmas[i + 1 - len(derivatives) : i + 1]
    x_next = lms_step(x, derivatives, derivative_sigmas, plan.sigmas[i + 1])
    return x_next, LmsState(derivatives)


def _step_heun(plan, i, x, model_output, state, generators):
    sigma = plan.sigmas[i]
    denoised = denoised_sigma_view(x, model_output, sigma, plan.prediction_type)
    if state is None:  # predictor: an Euler step to the next sigma
        sigma_next = plan.sigmas[i + 1]
        x_next = euler_step(x, denoised, sigma, sigma_next)
        if sigma_next == 0:  # the last step: no slope at sigma = 0 to average with
            return x_next, None
        return x_next, HeunState(x=x, derivative=(x - denoised) / sigma)
    # corrector: x is the predictor's result, now at sigma; the step started at sigmas[i - 1]
    x_next = heun_corrector_step(state.x, state.derivative, x, denoised, plan.sigmas[i - 1], sigma)
    return x_next, None


def _step_ddim(plan, i, x, model_output, state, generators):
    # diffusers steps from t to t - T // num_steps whatever the spacing; for "leading" that is
    # exactly the next timestep of the plan.
    t = plan.timesteps[i]
    alpha_bar, alpha_bar_next = _alpha_bar(plan, t), _alpha_bar(plan, t - plan.step_ratio)
    eps, denoised = eps_and_denoised_alpha_view(x, model_output, alpha_bar, plan.prediction_type)
    noise = None
    if plan.eta > 0:
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    return ddim_step(x, eps, denoised, alpha_bar, alpha_bar_next, plan.eta, noise), state


def _step_pndm(plan, i, x, model_output, state, generators):
    """PLMS as Stable Diffusion runs it (Liu et al. 2022, with the Runge-Kutta warm-up skipped).

    call 0: a plain step with the first output, remembering where it started;
    call 1: the pseudo improved-Euler correction: redo step 0 from there with the mean of both outputs;
    call 2+: Adams-Bashforth over up to the last four outputs (call 1's is not kept).
    Like diffusers, the outputs are combined first and v turned into eps once, at the current x.
    """
    t = plan.timesteps[i]
    if i == 1:
        t_from, t_to = t + plan.step_ratio, t
        x, combined = state.x_start, (model_output + state.model_outputs[-1]) / 2
        next_state = PlmsState(state.model_outputs, None)
    else:
        t_from, t_to = t, t - plan.step_ratio
        outputs = (*state.model_outputs[-3:], model_output)
        combined = plms_combined_output(outputs)
        next_state = PlmsState(outputs, x if i == 0 else None)
    alpha_bar, alpha_bar_next = _alpha_bar(plan, t_from), _alpha_bar(plan, t_to)
    eps, _ = eps_and_denoised_alpha_view(x, combined, alpha_bar, plan.prediction_type)
    return pndm_transfer(x, eps, alpha_bar, alpha_bar_next), next_state


def _step_dpmpp_2m(plan, i, x, model_output, state, generators):
    sigma, sigma_next = plan.sigmas[i], plan.sigmas[i + 1]
    denoised = denoised_dpm(x, model_output, sigma, plan.prediction_type)
    sigma_previous = plan.sigmas[i - 1] if state.previous_denoised is not None else None
    x = x.to(torch.float32)
    x_next = dpmpp_2m_step(x, denoised, state.previous_denoised, sigma_previous, sigma, sigma_next)
    return x_next.to(model_output.dtype), DpmState(previous_denoised=denoised)


_STEPPERS = {
    "euler": _step_euler,
    "euler_a": _step_euler_ancestral,
    "lms": _step_lms,
    "ddim": _step_ddim,
    "pndm": _step_pndm,
    "dpmpp_2m": _step_dpmpp_2m,
    "heun": _step_heun,
}
