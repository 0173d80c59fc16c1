"""The samplers: for each method, its update rule and the few lines that fit it into the loop.

A sampler turns the UNet's prediction at one noise level into a latent at the next, lower one.
The loop in sample.py reads, for every sampler:

    plan = make_plan("euler", 50)
    x = noise * plan.init_noise_sigma
    state = initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        model_output = unet(scale_model_input(plan, i, x), t, text)   # noise (or v) prediction
        x, state = step(plan, i, x, model_output, state)

`plan` is everything fixed before the loop (timesteps, noise levels); `state` is the little history
a multistep method carries from one call to the next (LMS's slopes, PLMS's stages, the DPM++ and
UniPC estimates, the two stages of Heun, DPM2 and DPM++ SDE).
Both are frozen and handed back to the caller: nothing is remembered inside this module, so the
same inputs always give the same outputs.

Two ways of holding the noisy latent (see schedule.py):
  sigma view  x = x0 + sigma * noise                      euler, euler_a, lms, heun, dpm2, dpm2_a,
                                                          dpmpp_sde, euler_cfgpp
  alpha view  x = sqrt(a) * x0 + sqrt(1 - a) * noise      ddim, pndm, ddpm, dpmpp_2m, the DPM++ 2M and
                                                          3M SDEs, unipc, lcm  (a = alpha_bar)
We keep to the view diffusers uses for each sampler, so every intermediate latent equals its own.

The file reads in this order: the plan and what the loop calls; the UNet's output turned into the
clean-latent estimate x0; then one section per sampler, each with its update rule (the equation of
its paper, nothing else), the adapter that reads the plan and state for it, and the entry that
registers it. The grids of timesteps and sigmas are schedule maths and live in schedule.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sd_scratch import schedule as noise_schedule
from sd_scratch.schedule import alpha_and_noise_level

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True, eq=False)
class Plan:
    """What a sampler needs to know before the loop starts. Index everything by the call number i."""

    name: str
    num_steps: int
    spacing: str
    schedule_type: str  # how the noise levels are placed: schedule.SCHEDULE_TYPES
    eta: float
    prediction_type: str
    view: str  # "sigma" or "alpha": how x holds its noise (above)
    timesteps: torch.Tensor  # the t given to the UNet at each call (Heun and PNDM repeat some)
    # Samplers that walk sigmas: sigmas[i] is the noise level of x at call i, and sigmas[i + 1] the
    # level the step lands on (0 after the last call). None for DDIM and PNDM, which walk timesteps.
    sigmas: torch.Tensor | None
    alphas_cumprod: torch.Tensor  # the training schedule's alpha_bar_t, t = 0 .. T-1
    final_alpha_bar: torch.Tensor  # where DDIM and PNDM land past t = 0
    step_ratio: int  # T // num_steps: how far DDIM and PNDM step in training timesteps
    init_noise_sigma: float
    start_step: int = 0  # image-to-image: how many of the num_steps steps were skipped
    steps_before: int = 0  # SDXL's refiner: the steps the base took before this plan's first (split_plan)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at training timestep t; below t = 0 the schedule ends at final_alpha_bar."""
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_bar


@dataclass(frozen=True)
class Sampler:
    """How one method fits into the loop. Each sampler's section below ends by filling one in."""

    label: str  # as image browsers and the web UIs name it ("Euler a", "DPM++ 2M")
    view: str  # "sigma" or "alpha"
    grid: Callable  # (num_steps, spacing, schedule_type, schedule) -> (timesteps, sigmas or None): see schedule.py
    denoised: Callable  # (plan, i, x, model_output) -> the clean-latent estimate x0 at call i
    step: Callable  # (plan, i, x, model_output, state, generators) -> (x at the next level, next state)
    initial_state: object = None  # the empty history of the first call (None: the sampler keeps none)
    default_eta: float | None = None  # for samplers that add fresh noise: how much unless told (None: no eta)
    schedule_types: tuple[str, ...] = noise_schedule.SCHEDULE_TYPES  # the placements of noise levels it walks
    calls_per_step: int = 1  # UNet calls per step (Heun: 2), diffusers' scheduler.order
    extra_first_calls: int = 0  # calls before the first step's own (PLMS takes its first step twice: 1)
    # CFG++: the step also takes the unconditional prediction, and guidance is lambda in [0, 1] (its section)
    uses_unconditional: bool = False


SAMPLERS: dict[str, Sampler] = {}  # filled in by the sections below, in the order the help lists them


# ----------------------------------------------------------------------------------------------
# What the loop calls
# ----------------------------------------------------------------------------------------------


def make_plan(
    name: str,
    num_steps: int,
    *,
    spacing: str | None = None,
    karras: bool = False,
    schedule_type: str | None = None,
    eta: float | None = None,
    prediction_type: str = "epsilon",
    schedule: noise_schedule.ScheduleConfig | None = None,
) -> Plan:
    """The timesteps and noise levels `name` walks for num_steps steps, equal to diffusers'.

    spacing: how the steps spread over the training timesteps; None means the schedule's own
    (SD 1.x/2.x: "leading").
    schedule_type: how the noise levels are placed (schedule.SCHEDULE_TYPES; None: "spaced", the levels of
    the spaced timesteps). karras=True is schedule_type="karras": Karras et al.'s sigmas (rho = 7).
    eta: how much fresh noise ancestral samplers add. None means the sampler's usual value: 1 for
    euler_a (what diffusers' EulerAncestralDiscreteScheduler does), 0 for ddim.
    schedule: the model's training schedule (default SD 1.x/2.x's).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
    schedule = noise_schedule.SD15_SCHEDULE if schedule is None else schedule
    spacing = schedule.timestep_spacing if spacing is None else spacing
    if spacing not in noise_schedule.SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(noise_schedule.SPACINGS)}")
    noise_schedule.check_num_steps(num_steps, schedule)
    eta = _check_eta(name, sampler, eta)
    if karras and schedule_type not in (None, "karras"):
        raise ValueError(f"karras asks for the 'karras' schedule type, and schedule_type asks for {schedule_type!r}")
    schedule_type = "karras" if karras else schedule_type or "spaced"
    if schedule_type not in noise_schedule.SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {schedule_type!r}; known: {', '.join(noise_schedule.SCHEDULE_TYPES)}")
    if schedule_type not in sampler.schedule_types:
        if schedule_type == "karras":
            raise ValueError(f"karras sigmas need a sigma-based sampler, not {name!r}")
        raise ValueError(f"{name!r} walks the {' or '.join(map(repr, sampler.schedule_types))} schedule, "
                         f"not {schedule_type!r}")

    alphas_cumprod = noise_schedule.alphas_cumprod(schedule)
    timesteps, sigmas = sampler.grid(num_steps, spacing, schedule_type, schedule)
    if sampler.view == "sigma":
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
        schedule_type=schedule_type,
        eta=eta,
        prediction_type=prediction_type,
        view=sampler.view,
        timesteps=timesteps,
        sigmas=sigmas,
        alphas_cumprod=alphas_cumprod,
        final_alpha_bar=torch.tensor(1.0) if schedule.set_alpha_to_one else alphas_cumprod[0],
        step_ratio=schedule.num_train_timesteps // num_steps,
        init_noise_sigma=init_noise_sigma,
    )


def _check_eta(name, sampler, eta):
    if eta is None:
        return sampler.default_eta or 0.0
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and sampler.default_eta is None:
        takers = [n for n, s in SAMPLERS.items() if s.default_eta is not None]
        raise ValueError(f"eta only applies to {', '.join(map(repr, takers))}, not {name!r}")
    return float(eta)


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


def split_plan(plan: Plan, switch: float) -> tuple[Plan, Plan]:
    """The plan cut in two for SDXL's base and refiner ("an ensemble of expert denoisers", Podell et al. 2023):
    the steps at training timesteps t >= T (1 - switch) for the base, the rest for the refiner, as diffusers'
    `denoising_end` / `denoising_start` cut them (switch 0.8 of 1000 timesteps: the base takes t >= 200).

    The base's part keeps the whole sigma list, so its last call lands on the refiner's first level. The
    refiner's sampler starts afresh (an empty history), as diffusers' img2img pipeline starts its scheduler.
    A sampler of several calls per step is cut between steps, never inside one.
    """
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch < 1:
        raise ValueError(f"the refiner's switch must be a fraction in (0, 1), got {switch!r}")
    T = len(plan.alphas_cumprod)
    cutoff = round(T - switch * T)
    calls = range(len(plan.timesteps))
    first_call_of_step = {}
    for i in calls:
        first_call_of_step.setdefault(step_of_call(plan, i), i)
    base_steps = sum(1 for i in first_call_of_step.values() if plan.timesteps[i] >= cutoff)
    base_calls = sum(1 for i in calls if step_of_call(plan, i) < base_steps)
    if base_calls in (0, len(plan.timesteps)):
        who, fix = ("base", "a larger switch") if base_calls == 0 else ("refiner", "a smaller switch")
        raise ValueError(f"switching at {switch} of {plan.num_steps} steps leaves the {who} no step: give {fix}, "
                         "or more steps")
    base = dataclasses.replace(plan, timesteps=plan.timesteps[:base_calls].clone())
    refiner = dataclasses.replace(
        plan, timesteps=plan.timesteps[base_calls:].clone(),
        sigmas=None if plan.sigmas is None else plan.sigmas[base_calls:].clone(),
        steps_before=plan.steps_before + base_steps,
    )
    return base, refiner


def calls_per_step(plan: Plan) -> int:
    """UNet calls per step: 2 for Heun, 1 for the others (diffusers' scheduler.order)."""
    return SAMPLERS[plan.name].calls_per_step


def add_noise(plan: Plan, clean_latents: torch.Tensor, noise: torch.Tensor, call: int = 0) -> torch.Tensor:
    """The forward process q(x_t | x0): put a clean latent at the noise level x has at call `call` (0: the
    plan's start, for image-to-image; inpainting puts the kept region back at every call's level). Past the
    last call x is clean."""
    if not 0 <= call <= len(plan.timesteps):
        raise ValueError(f"call {call} is outside this plan of {len(plan.timesteps)} calls")
    if plan.view == "sigma":
        sigma = plan.sigmas[call].to(clean_latents.device, clean_latents.dtype)  # sigmas end with 0
        return clean_latents + noise * sigma
    if plan.sigmas is not None:  # dpmpp_2m: an alpha-view sampler that walks sigmas
        alpha, noise_level = alpha_and_noise_level(plan.sigmas[call].to(clean_latents.device, clean_latents.dtype))
        return alpha * clean_latents + noise_level * noise
    if call == len(plan.timesteps):
        return clean_latents
    alpha_bar = plan.alphas_cumprod[plan.timesteps[call]].to(clean_latents.device, clean_latents.dtype)
    return alpha_bar**0.5 * clean_latents + (1 - alpha_bar) ** 0.5 * noise


def initial_state(plan: Plan):
    """The empty history the first call starts from (None for the samplers that keep none)."""
    return SAMPLERS[plan.name].initial_state


def scale_model_input(plan: Plan, i: int, x: torch.Tensor) -> torch.Tensor:
    """What the UNet sees at call i. Sigma-view x is divided by sqrt(sigma**2 + 1) back to the alpha
    view the UNet was trained on; the alpha-view samplers pass x through."""
    _check_call(plan, i)
    if plan.view == "alpha":
        return x
    sigma = plan.sigmas[i]
    return x / ((sigma**2 + 1) ** 0.5)


def step_of_call(plan: Plan, i: int) -> int:
    """Which step call i belongs to, counting the steps this plan runs from 0 (prompt editing switches by step;
    a refiner's plan goes on counting from the base's steps)."""
    _check_call(plan, i)
    sampler = SAMPLERS[plan.name]
    calls_before = sampler.extra_first_calls if plan.steps_before == 0 else 0
    return plan.steps_before + max(i - calls_before, 0) // sampler.calls_per_step


def predicted_x0(plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate at call i (in the alpha view's scale, which is x0's own)."""
    _check_call(plan, i)
    return SAMPLERS[plan.name].denoised(plan, i, x, model_output)


def step(plan: Plan, i: int, x: torch.Tensor, model_output: torch.Tensor, state, generators=None,
         unconditional_output: torch.Tensor | None = None):
    """Call i's update: returns (x at the next noise level, the state for call i + 1).

    unconditional_output: the UNet's unconditional prediction, which CFG++ re-noises with (others ignore it).
    """
    _check_call(plan, i)
    sampler = SAMPLERS[plan.name]
    if sampler.uses_unconditional:
        if unconditional_output is None:
            raise ValueError(f"{plan.name!r} needs the unconditional prediction as well as the guided one")
        return sampler.step(plan, i, x, model_output, state, generators, unconditional_output)
    return sampler.step(plan, i, x, model_output, state, generators)


def needs_unconditional(name: str) -> bool:
    """Whether the sampler re-noises with the unconditional prediction (CFG++): then it is made at any guidance."""
    return SAMPLERS[name].uses_unconditional


def check_guidance(name: str, guidance: float) -> None:
    """CFG++ takes its own guidance, lambda in [0, 1] (see its section); the others any scale >= 0."""
    if SAMPLERS[name].uses_unconditional and not 0 <= guidance <= 1:
        raise ValueError(f"{name!r} takes CFG++'s guidance lambda, from 0 (unconditional) to 1 (the prompt's "
                         f"own prediction), got {guidance}; 0.6 acts like a CFG scale of 2 to 5 at 25 steps")


def _check_call(plan, i):
    if not 0 <= i < len(plan.timesteps):
        raise ValueError(f"call index {i} is outside the plan's {len(plan.timesteps)} calls")


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


# ----------------------------------------------------------------------------------------------
# From the UNet's output to the clean-latent estimate x0 (and the noise estimate eps)
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


def denoised_at_sigma(plan, i, x, model_output):
    """x0 at call i of a sampler that holds x in the sigma view."""
    return denoised_sigma_view(x, model_output, plan.sigmas[i], plan.prediction_type)


def denoised_at_timestep(plan, i, x, model_output):
    """x0 at call i of DDIM or PNDM, whose x is in the alpha view at timestep t."""
    return eps_and_denoised_alpha_view(x, model_output, plan.alpha_bar(plan.timesteps[i]), plan.prediction_type)[1]


# ----------------------------------------------------------------------------------------------
# Euler. Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
# Models"), Algorithm 1 without its second-order correction.
# ----------------------------------------------------------------------------------------------


def euler_step(x, denoised, sigma, sigma_next):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - denoised) / sigma."""
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_next - sigma)


def step_euler(plan, i, x, model_output, state, generators):
    # euler, euler_a and dpmpp_2m step in float32 and hand back the model's dtype, as diffusers does.
    x = x.to(torch.float32)
    denoised = denoised_at_sigma(plan, i, x, model_output)
    return euler_step(x, denoised, plan.sigmas[i], plan.sigmas[i + 1]).to(model_output.dtype), state


SAMPLERS["euler"] = Sampler("Euler", "sigma", noise_schedule.sigma_grid, denoised_at_sigma, step_euler)


# ----------------------------------------------------------------------------------------------
# Euler ancestral: DDPM's ancestral sampling (Ho et al. 2020) in the sigma view, as k-diffusion's
# sample_euler_ancestral writes it.
# ----------------------------------------------------------------------------------------------


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
    """An Euler step down to sigma_down, then fresh noise of size sigma_up."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    derivative = (x - denoised) / sigma
    return x + derivative * (sigma_down - sigma) + noise * sigma_up


def step_euler_ancestral(plan, i, x, model_output, state, generators):
    x = x.to(torch.float32)
    denoised = denoised_at_sigma(plan, i, x, model_output)
    noise = torch.zeros_like(model_output)
    if plan.eta > 0:
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    x_next = euler_ancestral_step(x, denoised, plan.sigmas[i], plan.sigmas[i + 1], noise, plan.eta)
    return x_next.to(model_output.dtype), state


SAMPLERS["euler_a"] = Sampler("Euler a", "sigma", noise_schedule.sigma_grid, denoised_at_sigma,
                              step_euler_ancestral, default_eta=1.0)


# ----------------------------------------------------------------------------------------------
# LMS: linear multistep in sigma, as k-diffusion's sample_lms.
# ----------------------------------------------------------------------------------------------

LMS_ORDER = 4


@dataclass(frozen=True, eq=False)
class LmsState:
    derivatives: tuple = ()  # dx/dsigma at the last calls, oldest first (at most LMS_ORDER)


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
    """x_next = x + sum_j c_j * d_j.

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


def step_lms(plan, i, x, model_output, state, generators):
    denoised = denoised_at_sigma(plan, i, x, model_output)
    # The order builds up from the first call (k-diffusion), so after an image-to-image cut too.
    derivatives = (*state.derivatives, (x - denoised) / plan.sigmas[i])[-LMS_ORDER:]
    derivative_sigmas = plan.sigmas[i + 1 - len(derivatives) : i + 1]
    return lms_step(x, derivatives, derivative_sigmas, plan.sigmas[i + 1]), LmsState(derivatives)


SAMPLERS["lms"] = Sampler("LMS", "sigma", noise_schedule.sigma_grid, denoised_at_sigma, step_lms, LmsState())


# ----------------------------------------------------------------------------------------------
# DDIM. Song et al. 2021, "Denoising Diffusion Implicit Models".
# ----------------------------------------------------------------------------------------------


def ddim_step(x, eps, denoised, alpha_bar, alpha_bar_next, eta=0.0, noise=None):
    """Eq. 12, with the noise size sigma_t(eta) of eq. 16.

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


def step_ddim(plan, i, x, model_output, state, generators):
    # diffusers steps from t to t - T // num_steps whatever the spacing; for "leading" that is
    # exactly the next timestep of the plan.
    t = plan.timesteps[i]
    alpha_bar, alpha_bar_next = plan.alpha_bar(t), plan.alpha_bar(t - plan.step_ratio)
    eps, denoised = eps_and_denoised_alpha_view(x, model_output, alpha_bar, plan.prediction_type)
    noise = None
    if plan.eta > 0:
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    return ddim_step(x, eps, denoised, alpha_bar, alpha_bar_next, plan.eta, noise), state


SAMPLERS["ddim"] = Sampler("DDIM", "alpha", noise_schedule.timestep_grid, denoised_at_timestep, step_ddim,
                           default_eta=0.0, schedule_types=("spaced",))


# ----------------------------------------------------------------------------------------------
# PNDM, or PLMS as Stable Diffusion runs it: Liu et al. 2022, "Pseudo Numerical Methods for
# Diffusion Models on Manifolds", with the Runge-Kutta warm-up skipped (diffusers' skip_prk_steps).
# Its three stages:
#   "first"      a plain step with the first output, remembering where it started;
#   "redo_first" the pseudo improved-Euler correction: redo that step from the same start with the
#                mean of both outputs (the UNet is called at the second timestep twice);
#   "multistep"  Adams-Bashforth over up to the last four outputs (the redo's is not kept).
# Like diffusers, the outputs are combined first and v turned into eps once, at the current x.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PlmsState:
    stage: str = "first"
    model_outputs: tuple = ()  # the UNet outputs the multistep formula uses, oldest first
    x_start: torch.Tensor | None = None  # x before the first step, which "redo_first" starts from again


def pndm_transfer(x, eps, alpha_bar, alpha_bar_next):
    """PNDM's transfer part phi: moves x from noise level alpha_bar to alpha_bar_next along the noise
    direction eps. Written differently, it is the deterministic DDIM step."""
    denominator = alpha_bar * (1 - alpha_bar_next) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_next) ** 0.5
    return (alpha_bar_next / alpha_bar) ** 0.5 * x - (alpha_bar_next - alpha_bar) * eps / denominator


def plms_combined_output(model_outputs):
    """Adams-Bashforth: extrapolate the model output over the step from the last 1 to 4 of them,
    oldest first (the linear multistep gradient part of PLMS)."""
    e = model_outputs[::-1]  # e[0] is the newest
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def plms_grid(num_steps, spacing, schedule_type, schedule):
    """The timestep grid with the second timestep visited twice, for the "redo_first" stage."""
    timesteps, _ = noise_schedule.timestep_grid(num_steps, spacing, schedule_type, schedule)
    if num_steps > 1:
        timesteps = torch.cat([timesteps[:2], timesteps[1:]])
    return timesteps, None


def step_pndm(plan, i, x, model_output, state, generators):
    t = plan.timesteps[i]
    if state.stage == "redo_first":  # back to where the first step started: from t + step_ratio to t
        t_from, t_to = t + plan.step_ratio, t
        x, combined = state.x_start, (model_output + state.model_outputs[-1]) / 2
        next_state = PlmsState("multistep", state.model_outputs)
    else:
        t_from, t_to = t, t - plan.step_ratio
        outputs = (*state.model_outputs[-3:], model_output)
        combined = plms_combined_output(outputs)
        next_state = PlmsState("redo_first", outputs, x) if state.stage == "first" else PlmsState("multistep", outputs)
    alpha_bar, alpha_bar_next = plan.alpha_bar(t_from), plan.alpha_bar(t_to)
    eps, _ = eps_and_denoised_alpha_view(x, combined, alpha_bar, plan.prediction_type)
    return pndm_transfer(x, eps, alpha_bar, alpha_bar_next), next_state


SAMPLERS["pndm"] = Sampler("PLMS", "alpha", plms_grid, denoised_at_timestep, step_pndm, PlmsState(),
                           schedule_types=("spaced",), extra_first_calls=1)


# ----------------------------------------------------------------------------------------------
# DPM++ 2M. Lu et al. 2022, "DPM-Solver++", Algorithm 2: x in the alpha view, the plan in sigmas.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DpmState:
    denoised: tuple = ()  # the x0 estimate of the previous call (none before the first), with ...
    sigmas: tuple = ()  # ... the noise level it was made at


def denoised_dpm(plan, i, x, model_output):
    """x0 at call i: the alpha view, with alpha and the noise level read off the plan's sigma."""
    alpha, noise = alpha_and_noise_level(plan.sigmas[i])
    if plan.prediction_type == "epsilon":
        return (x - noise * model_output) / alpha
    return alpha * x - noise * model_output


def dpmpp_2m_step(x, denoised, previous_denoised, sigma_previous, sigma, sigma_next):
    """lambda = log(alpha / noise) is half the log signal-to-noise ratio; h is how far it moves.

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


def step_dpmpp_2m(plan, i, x, model_output, state, generators):
    sigma = plan.sigmas[i]
    denoised = denoised_dpm(plan, i, x, model_output)
    previous_denoised, sigma_previous = (state.denoised[-1], state.sigmas[-1]) if state.denoised else (None, None)
    x_next = dpmpp_2m_step(x.to(torch.float32), denoised, previous_denoised, sigma_previous, sigma, plan.sigmas[i + 1])
    return x_next.to(model_output.dtype), DpmState((denoised,), (sigma,))


SAMPLERS["dpmpp_2m"] = Sampler("DPM++ 2M", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm, step_dpmpp_2m,
                               DpmState())


# ----------------------------------------------------------------------------------------------
# Heun. Karras et al. 2022, Algorithm 1: an Euler step (the "predictor" stage), then a second UNet
# call where it landed and the step re-taken with the mean of both slopes (the "corrector").
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeunState:
    stage: str = "predictor"
    # Between the predictor and the corrector: where the step started, at which sigma, and its slope.
    x_start: torch.Tensor | None = None
    sigma_start: torch.Tensor | None = None
    derivative_start: torch.Tensor | None = None


def heun_corrector_step(x_start, derivative_start, x_predicted, denoised_predicted, sigma, sigma_next):
    """The predictor was an Euler step from (x_start, sigma) to x_predicted at sigma_next. Re-take the
    step from x_start with the average of the slopes at both ends: the trapezoid rule."""
    derivative_end = (x_predicted - denoised_predicted) / sigma_next
    return x_start + (derivative_start + derivative_end) / 2 * (sigma_next - sigma)


def heun_grid(num_steps, spacing, schedule_type, schedule):
    """Two UNet calls per step: at t_k (predictor), then at t_{k+1} where the predictor landed
    (corrector). The last step goes to sigma = 0 and is plain Euler."""
    timesteps, sigmas = noise_schedule.sigma_grid(num_steps, spacing, schedule_type, schedule)
    sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
    return timesteps, sigmas


def step_heun(plan, i, x, model_output, state, generators):
    sigma = plan.sigmas[i]
    denoised = denoised_at_sigma(plan, i, x, model_output)
    if state.stage == "corrector":  # x is the predictor's result, now at sigma
        x_next = heun_corrector_step(state.x_start, state.derivative_start, x, denoised, state.sigma_start, sigma)
        return x_next, HeunState()
    sigma_next = plan.sigmas[i + 1]
    x_next = euler_step(x, denoised, sigma, sigma_next)
    if sigma_next == 0:  # the last step: no slope at sigma = 0 to average with
        return x_next, HeunState()
    return x_next, HeunState("corrector", x, sigma, (x - denoised) / sigma)


SAMPLERS["heun"] = Sampler("Heun", "sigma", heun_grid, denoised_at_sigma, step_heun, HeunState(), calls_per_step=2)


# ----------------------------------------------------------------------------------------------
# DPM2 and DPM2 ancestral: k-diffusion's sample_dpm_2 and sample_dpm_2_ancestral, "inspired by
# DPM-Solver-2" (Lu et al. 2022) and Karras et al. 2022's Algorithm 2. Like Heun, two UNet calls per
# step, but the second is at the step's midpoint in log sigma, and its slope alone takes the whole step:
#   "first"   an Euler step from (x, sigma) to the midpoint sigma_mid = sqrt(sigma * sigma_next);
#   "second"  the slope there, d_mid, applied from the start: x_next = x + d_mid * (sigma_next - sigma).
# The ancestral variant walks to sigma_down (midpoint between sigma and sigma_down) and then adds fresh
# noise of size sigma_up, as euler_a does at eta = 1 (the only eta here, as in diffusers). The last step,
# down to 0, is one Euler step (its midpoint is 0).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MidpointState:
    stage: str = "first"
    # Between the two calls: where the step started, and at which sigma.
    x_start: torch.Tensor | None = None
    sigma_start: torch.Tensor | None = None


def log_midpoint(sigma, sigma_next):
    """The midpoint of the step in log sigma, exp((log sigma + log sigma_next) / 2); 0 when sigma_next is 0.
    (Interpolated from sigma_next's end, as diffusers' KDPM2 does, so that the floats agree bit for bit.)"""
    return sigma_next.log().lerp(sigma.log(), 0.5).exp()


def dpm2_grid(num_steps, spacing, schedule_type, schedule, ancestral=False):
    """k-diffusion's levels with each step's midpoint: between s_k and s_k+1 (ancestral: s_k's sigma_down). As
    diffusers' KDPM2: Karras timesteps rounded, and float64 when the schedule type is not "spaced"."""
    timesteps, sigmas = noise_schedule.sigma_grid(num_steps, spacing, schedule_type, schedule)
    if schedule_type != "spaced":
        timesteps = timesteps.double()
        if schedule_type == "karras":
            timesteps = timesteps.round()
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    if ancestral:  # each step's sigma_down (ancestral_sigmas at eta = 1, for every step at once), from its start
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        midpoints = sigma.log().lerp(((sigma_next**2 - sigma_up**2) ** 0.5).log(), 0.5).exp()
    else:
        midpoints = log_midpoint(sigma, sigma_next)
    return with_midpoints(timesteps, sigmas, midpoints, schedule)


def with_midpoints(timesteps, sigmas, midpoints, schedule):
    """A grid with a second UNet call at each step's midpoint: sigmas [s0, m0, s1, m1, ..., s_N-1, 0] and
    [t0, t(m0), t1, t(m1), ..., t_N-1]. The last step's midpoint (0, at the end of the walk) is not called."""
    midpoint_timesteps = torch.from_numpy(noise_schedule.sigma_to_timestep(midpoints[:-1].numpy(), schedule))
    calls = torch.stack([sigmas[:-1], midpoints.to(sigmas.dtype)], dim=1).flatten()[:-1]
    call_timesteps = torch.stack([timesteps[:-1], midpoint_timesteps.to(timesteps.dtype)], dim=1).flatten()
    return torch.cat([call_timesteps, timesteps[-1:]]), torch.cat([calls, sigmas[-1:]])


def step_dpm2(plan, i, x, model_output, state, generators):
    return _dpm2_stage(plan, i, x, model_output, state, generators, ancestral=False)


def step_dpm2_ancestral(plan, i, x, model_output, state, generators):
    return _dpm2_stage(plan, i, x, model_output, state, generators, ancestral=True)


def _dpm2_stage(plan, i, x, model_output, state, generators, ancestral):
    sigma = plan.sigmas[i]
    derivative = (x - denoised_at_sigma(plan, i, x, model_output)) / sigma
    if state.stage == "first":  # to the midpoint, plan.sigmas[i + 1] (0 at the last step: plain Euler)
        x_next = x + derivative * (plan.sigmas[i + 1] - sigma)
        if plan.sigmas[i + 1] == 0:
            return x_next, MidpointState()
        return x_next, MidpointState("second", x, sigma)
    # at the midpoint: the whole step from where it started, with the midpoint's slope
    sigma_start, sigma_next = state.sigma_start, plan.sigmas[i + 1]
    if not ancestral:
        return state.x_start + derivative * (sigma_next - sigma_start), MidpointState()
    sigma_down, sigma_up = ancestral_sigmas(sigma_start, sigma_next)
    noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    return state.x_start + derivative * (sigma_down - sigma_start) + noise * sigma_up, MidpointState()


SAMPLERS["dpm2"] = Sampler("DPM2", "sigma", dpm2_grid, denoised_at_sigma, step_dpm2, MidpointState(),
                           calls_per_step=2)
SAMPLERS["dpm2_a"] = Sampler("DPM2 a", "sigma", functools.partial(dpm2_grid, ancestral=True), denoised_at_sigma,
                             step_dpm2_ancestral, MidpointState(), calls_per_step=2)


# ----------------------------------------------------------------------------------------------
# DPM++ 2M SDE and 3M SDE: the stochastic DPM-Solver++ of Lu et al. 2022 ("DPM-Solver++", sec. 5), as
# k-diffusion's sample_dpmpp_2m_sde and sample_dpmpp_3m_sde write it, with eta: 0 is the ODE (DPM++ 2M),
# 1 the SDE that diffusers (algorithm_type "sde-dpmsolver++") and the web UIs run. Like DPM++ 2M: x in the
# alpha view on the same grid, lambda = log(alpha / noise), h = lambda_next - lambda. One step:
#
#     x_next = (noise_next / noise) e^(-eta h) x + alpha_next (1 - e^(-h_eta)) D0 + correction
#              + noise_next sqrt(1 - e^(-2 eta h)) z,            h_eta = (1 + eta) h, z ~ N(0, I)
#
# D0 is this call's x0 estimate; the correction extrapolates along the previous ones (none at the first
# step, nor on the last, which lands on x0 itself):
#   2M, midpoint:  0.5 alpha_next (1 - e^(-h_eta)) D1           D1 = (D0 - D0_previous) / r, r = h_previous / h
#   2M, Heun:      alpha_next phi_2 D1                           phi_2 = 1 - (1 - e^(-h_eta)) / h_eta
#   3M:            alpha_next phi_2 D1' - alpha_next phi_3 D2    phi_3 = phi_2 / h_eta - 0.5, with D1' and D2
#                  the first and second divided differences of the last three estimates (2M Heun with two)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SdeMultistepState:
    denoised: tuple = ()  # the x0 estimates of the last calls, oldest first (at most two) ...
    sigmas: tuple = ()  # ... and the noise levels they were made at


def half_log_snr(sigma):
    """lambda = log(alpha / noise level) = -log(sigma): half the log signal-to-noise ratio."""
    alpha, noise = alpha_and_noise_level(sigma)
    return torch.log(alpha) - torch.log(noise)


def dpmpp_sde_step(x, denoised_history, sigma_history, sigma_next, eta, noise, correction):
    """One step as the section's comment writes it. The histories end with this call's estimate and level."""
    denoised, sigma = denoised_history[-1], sigma_history[-1]
    alpha_next, noise_next = alpha_and_noise_level(sigma_next)
    if sigma_next == 0:  # the walk's end: x0 itself
        return alpha_next * denoised
    _, noise_level = alpha_and_noise_level(sigma)
    lambdas = [half_log_snr(s) for s in sigma_history]
    h = half_log_snr(sigma_next) - lambdas[-1]
    h_eta = (1 + eta) * h
    x_next = (noise_next / noise_level * torch.exp(-eta * h)) * x + (alpha_next * (1 - torch.exp(-h_eta))) * denoised
    phi_2 = (torch.exp(-h_eta) - 1) / h_eta + 1
    if len(denoised_history) == 3 and correction == "3m":
        r0, r1 = (lambdas[-1] - lambdas[-2]) / h, (lambdas[-2] - lambdas[-3]) / h
        d1_0 = (denoised - denoised_history[-2]) / r0
        d1_1 = (denoised_history[-2] - denoised_history[-3]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        x_next = x_next + (alpha_next * phi_2) * d1 - (alpha_next * phi_3) * d2
    elif len(denoised_history) >= 2:
        d1 = (1.0 / ((lambdas[-1] - lambdas[-2]) / h)) * (denoised - denoised_history[-2])
        if correction == "midpoint":
            x_next = x_next + 0.5 * (alpha_next * (1 - torch.exp(-h_eta))) * d1
        else:  # "heun", and "3m" with only two estimates
            x_next = x_next + (alpha_next * phi_2) * d1
    if eta > 0:
        x_next = x_next + noise_next * torch.sqrt(1.0 - torch.exp(-2 * eta * h)) * noise
    return x_next


def _step_dpmpp_sde_multistep(plan, i, x, model_output, state, generators, correction, history):
    sigma = plan.sigmas[i]
    denoised = denoised_dpm(plan, i, x, model_output)
    denoised_history = (*state.denoised, denoised)[-history:]
    sigma_history = (*state.sigmas, sigma)[-history:]
    noise = None
    if plan.eta > 0 and plan.sigmas[i + 1] > 0:
        noise = draw_noise(model_output.shape, generators, model_output.device, torch.float32)
    x_next = dpmpp_sde_step(x.to(torch.float32), denoised_history, sigma_history, plan.sigmas[i + 1], plan.eta, noise,
                            correction)
    kept = history - 1  # what the next call extrapolates along
    return x_next.to(model_output.dtype), SdeMultistepState(denoised_history[-kept:], sigma_history[-kept:])


def step_dpmpp_2m_sde(plan, i, x, model_output, state, generators):
    return _step_dpmpp_sde_multistep(plan, i, x, model_output, state, generators, "midpoint", history=2)


def step_dpmpp_2m_sde_heun(plan, i, x, model_output, state, generators):
    return _step_dpmpp_sde_multistep(plan, i, x, model_output, state, generators, "heun", history=2)


def step_dpmpp_3m_sde(plan, i, x, model_output, state, generators):
    return _step_dpmpp_sde_multistep(plan, i, x, model_output, state, generators, "3m", history=3)


SAMPLERS["dpmpp_2m_sde"] = Sampler("DPM++ 2M SDE", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm,
                                   step_dpmpp_2m_sde, SdeMultistepState(), default_eta=1.0)
SAMPLERS["dpmpp_2m_sde_heun"] = Sampler("DPM++ 2M SDE Heun", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm,
                                        step_dpmpp_2m_sde_heun, SdeMultistepState(), default_eta=1.0)
SAMPLERS["dpmpp_3m_sde"] = Sampler("DPM++ 3M SDE", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm,
                                   step_dpmpp_3m_sde, SdeMultistepState(), default_eta=1.0)


# ----------------------------------------------------------------------------------------------
# DPM++ SDE: the stochastic, second-order, single-step DPM-Solver++ (Lu et al. 2022), k-diffusion's
# sample_dpmpp_sde with r = 1/2. Each step calls the UNet twice, like DPM2, at sigma and at the
# step's midpoint in log sigma; each stage is an ancestral exponential-integrator step: to sigma_down
# along the current x0 estimate, then fresh noise of size sigma_up (as euler_a, with eta):
#   "first"   from (x, sigma) to the midpoint, with this call's estimate;
#   "second"  from the same start to sigma_next, with the midpoint's estimate alone (k-diffusion's
#             (1 - 1/(2r)) x0 + 1/(2r) x0_mid at r = 1/2).
# k-diffusion and the web UIs draw its noise from a Brownian tree (torchsde) seeded once per image;
# here, as with every other sampler, each draw comes from the image's own generator.
# ----------------------------------------------------------------------------------------------


def ancestral_exponential_step(x, denoised, sigma, sigma_next, noise, eta=1.0):
    """DPM-Solver++(1) (the exponential integrator: x moves along x0 in log sigma) down to sigma_down, then
    noise of size sigma_up: x_next = (sigma_down / sigma) x + (1 - sigma_down / sigma) x0 + sigma_up z."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    ratio = sigma_down / sigma
    return ratio * x + (1 - ratio) * denoised + noise * sigma_up


def dpmpp_sde_grid(num_steps, spacing, schedule_type, schedule):
    """The levels with each step's log-sigma midpoint (float64 timesteps, as diffusers' DPMSolverSDE)."""
    timesteps, sigmas = noise_schedule.sigma_grid(num_steps, spacing, schedule_type, schedule)
    return with_midpoints(timesteps.double(), sigmas, log_midpoint(sigmas[:-1], sigmas[1:]), schedule)


def step_dpmpp_sde(plan, i, x, model_output, state, generators):
    sigma = plan.sigmas[i]
    denoised = denoised_at_sigma(plan, i, x, model_output)
    if state.stage == "first":
        sigma_next = plan.sigmas[i + 1]  # the midpoint (0 at the last step: plain Euler, no noise)
        if sigma_next == 0:
            return euler_step(x, denoised, sigma, sigma_next), MidpointState()
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
        return ancestral_exponential_step(x, denoised, sigma, sigma_next, noise, plan.eta), MidpointState(
            "second", x, sigma)
    noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    x_next = ancestral_exponential_step(state.x_start, denoised, state.sigma_start, plan.sigmas[i + 1], noise, plan.eta)
    return x_next, MidpointState()


SAMPLERS["dpmpp_sde"] = Sampler("DPM++ SDE", "sigma", dpmpp_sde_grid, denoised_at_sigma, step_dpmpp_sde,
                                MidpointState(), default_eta=1.0, calls_per_step=2)


# ----------------------------------------------------------------------------------------------
# DDPM: Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"), the ancestral sampler of the
# model's own Markov chain: each step draws from the posterior q(x_prev | x_t, x0) given the x0
# estimate, where prev is the plan's next timestep (past the last one, alpha_bar = 1: a clean image).
# ----------------------------------------------------------------------------------------------


def ddpm_step(x, denoised, alpha_bar, alpha_bar_prev, noise):
    """Eq. 6-7 between two timesteps of the plan: with alpha = alpha_bar / alpha_bar_prev, what survives of
    x_prev in x_t, and beta = 1 - alpha,

        x_prev = sqrt(alpha_bar_prev) beta / (1 - alpha_bar) x0 + sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar) x_t
                 + sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) beta) z

    (the posterior's own variance, diffusers' "fixed_small", kept above 1e-20 where it vanishes)."""
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    denoised_coefficient = (alpha_bar_prev**0.5 * beta) / (1 - alpha_bar)
    x_coefficient = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
    x_prev = denoised_coefficient * denoised + x_coefficient * x
    if noise is None:
        return x_prev
    variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
    return x_prev + variance**0.5 * noise


def step_ddpm(plan, i, x, model_output, state, generators):
    t = plan.timesteps[i]
    alpha_bar = plan.alpha_bar(t)
    alpha_bar_prev = plan.alpha_bar(plan.timesteps[i + 1]) if i + 1 < len(plan.timesteps) else torch.tensor(1.0)
    _, denoised = eps_and_denoised_alpha_view(x, model_output, alpha_bar, plan.prediction_type)
    noise = None
    if t > 0:  # as diffusers: no noise on a step from t = 0
        noise = draw_noise(model_output.shape, generators, model_output.device, model_output.dtype)
    return ddpm_step(x, denoised, alpha_bar, alpha_bar_prev, noise), state


SAMPLERS["ddpm"] = Sampler("DDPM", "alpha", noise_schedule.timestep_grid, denoised_at_timestep, step_ddpm,
                           schedule_types=("spaced",))


# ----------------------------------------------------------------------------------------------
# UniPC: Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
# Diffusion Models"), in its data-prediction form with B(h) = e^h - 1 ("bh2"), as diffusers'
# UniPCMultistepScheduler. On DPM++ 2M's grid and view. Every call does two things:
#   UniC  corrects the x it was given, now that the UNet's x0 estimate at this level is known (not at
#         the first call): the last step is re-taken with that estimate among the ones it extrapolates;
#   UniP  predicts the next x from the estimates so far, of order up to 2 (unipc) or 3 (unipc_3),
#         lower while there are fewer estimates, and for the last steps (diffusers' lower_order_final).
# Both share one formula,
#     x_next = (noise_next / noise) x - alpha_next (e^-h - 1) D0 - alpha_next B(h) sum_k rho_k D_k,
# with D_k the divided differences of the estimates and rho the solution of a small linear system in
# phi-functions of h; the corrector adds the new estimate's difference as its last term.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class UniPcState:
    denoised: tuple = ()  # the x0 estimates of the last calls, oldest first (at most the order) ...
    sigmas: tuple = ()  # ... the levels they were made at
    x_previous: torch.Tensor | None = None  # x before the last prediction: where the corrector starts from
    order_previous: int = 0  # that prediction's order, which the corrector keeps


def unipc_update(x, denoised_history, sigma_history, sigma_next, order, denoised_next=None):
    """From x at the history's last level to sigma_next: the predictor, or, given denoised_next (the x0 estimate
    made at sigma_next), the corrector. `order` counts the estimates used (the newest `order` of the history)."""
    m0, sigma = denoised_history[-1], sigma_history[-1]
    alpha_next, noise_next = alpha_and_noise_level(sigma_next)
    _, noise_level = alpha_and_noise_level(sigma)
    lambda_0 = half_log_snr(sigma)
    h = half_log_snr(sigma_next) - lambda_0
    earlier = [(denoised_history[-k - 1], sigma_history[-k - 1]) for k in range(1, order)]  # newest first
    r = [(half_log_snr(sigma_k) - lambda_0) / h for _, sigma_k in earlier] + [torch.ones(())]
    differences = [(m_k - m0) / r_k for (m_k, _), r_k in zip(earlier, r)]
    # b_i = i! phi_(i+1)(-h) / B(h), i = 1 .. order, by the phi-functions' recursion phi_(k+1) = (phi_k - 1/k!) / (-h)
    minus_h = -h
    h_phi_1 = torch.expm1(minus_h)
    b_h = torch.expm1(minus_h)
    h_phi_k, factorial, b = h_phi_1 / minus_h - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / minus_h - 1 / factorial
    powers = torch.stack([torch.stack(r) ** (i - 1) for i in range(1, order + 1)])  # R[i, k] = r_k^(i-1)
    x_next = noise_next / noise_level * x - alpha_next * h_phi_1 * m0
    if denoised_next is None:  # UniP: the earlier estimates only
        if not differences:
            return x_next
        rho = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(powers[:-1, :-1], torch.stack(b[:-1]))
        return x_next - alpha_next * b_h * sum(rho_k * d for rho_k, d in zip(rho.to(x.dtype), differences))
    # UniC: the same, with the new estimate's difference as the last term
    rho = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(powers, torch.stack(b))
    rho = rho.to(x.dtype)
    correction = sum(rho_k * d for rho_k, d in zip(rho[:-1], differences)) + rho[-1] * (denoised_next - m0)
    return x_next - alpha_next * b_h * correction


def _step_unipc(plan, i, x, model_output, state, generators, max_order):
    denoised = denoised_dpm(plan, i, x, model_output)
    if state.x_previous is not None:  # UniC: re-take the last step with this estimate too
        x = unipc_update(state.x_previous, state.denoised, state.sigmas, plan.sigmas[i], state.order_previous,
                         denoised_next=denoised)
    denoised_history = (*state.denoised, denoised)[-max_order:]
    sigma_history = (*state.sigmas, plan.sigmas[i])[-max_order:]
    order = min(max_order, len(denoised_history), len(plan.timesteps) - i)
    x_next = unipc_update(x, denoised_history, sigma_history, plan.sigmas[i + 1], order)
    return x_next, UniPcState(denoised_history, sigma_history, x, order)


def step_unipc(plan, i, x, model_output, state, generators):
    return _step_unipc(plan, i, x, model_output, state, generators, max_order=2)


def step_unipc_3(plan, i, x, model_output, state, generators):
    return _step_unipc(plan, i, x, model_output, state, generators, max_order=3)


SAMPLERS["unipc"] = Sampler("UniPC", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm, step_unipc, UniPcState())
SAMPLERS["unipc_3"] = Sampler("UniPC (order 3)", "alpha", noise_schedule.dpm_solver_grid, denoised_dpm, step_unipc_3,
                              UniPcState())


# ----------------------------------------------------------------------------------------------
# Euler CFG++: Chung et al. 2024 ("CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
# Models"), with Euler's step. Classifier-free guidance extrapolates the noise estimate past the
# prompt's own, eps_w = eps_u + w (eps_c - eps_u), and the step then re-noises with it:
#     Euler:  x_next = x0_w + sigma_next eps_w.
# CFG++ interpolates, eps_lambda = eps_u + lambda (eps_c - eps_u) with lambda in [0, 1], and re-noises
# with the unconditional estimate:
#     x_next = x0_lambda + sigma_next eps_u.
# Written as an Euler step with guidance, x + (sigma_next - sigma) eps_w, that is a scale
# w = lambda sigma / (sigma - sigma_next) which changes along the walk: at 25 "leading" steps
# sigma / (sigma - sigma_next) runs from 3 to 8 (median 6.8) on all but the last two steps (1.3, then
# 1), so lambda 0.6 acts like CFG at 2 to 5 (median 4).
# ----------------------------------------------------------------------------------------------


def euler_cfgpp_step(x, denoised, denoised_unconditional, sigma, sigma_next):
    """x_next = x0_lambda + sigma_next eps_u, with eps_u = (x - x0_u) / sigma in the sigma view."""
    return denoised + sigma_next * (x - denoised_unconditional) / sigma


def step_euler_cfgpp(plan, i, x, model_output, state, generators, unconditional_output):
    x = x.to(torch.float32)
    denoised = denoised_at_sigma(plan, i, x, model_output)
    denoised_unconditional = denoised_at_sigma(plan, i, x, unconditional_output)
    x_next = euler_cfgpp_step(x, denoised, denoised_unconditional, plan.sigmas[i], plan.sigmas[i + 1])
    return x_next.to(model_output.dtype), state


SAMPLERS["euler_cfgpp"] = Sampler("Euler CFG++", "sigma", noise_schedule.sigma_grid, denoised_at_sigma,
                                  step_euler_cfgpp, uses_unconditional=True)


# ----------------------------------------------------------------------------------------------
# LCM: Luo et al. 2023 ("Latent Consistency Models: Synthesizing High-Resolution Images with
# Few-Step Inference"), its Algorithm 1 (multistep latent consistency sampling), as diffusers'
# LCMScheduler. A consistency model maps any x on the way down straight to the clean latent,
#     f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t),
# with x0_pred read off the UNet's eps (or v) in the alpha view, and the boundary-condition scalings
# of Song et al. 2023 (consistency models) on the timestep scaled by 10, with sigma_data = 0.5:
#     c_skip(t) = sigma_data^2 / ((10 t)^2 + sigma_data^2),   c_out(t) = 10 t / sqrt((10 t)^2 + sigma_data^2),
# so f(x, 0) = x, and from t = 19 on, f is x0_pred to within 1e-5. Each step denoises to f, then, except at
# the last step, noises it again to the next timestep's level with fresh noise from each image's own
# generator (the forward process q(x_next | x0)); the last step hands back f itself.
# The timesteps are those LCM was distilled on: the 50 training-schedule steps 999, 979, ..., 19 (every
# T / 50th), of which num_steps are picked at evenly spaced positions (skipping steps). The spacing and
# steps_offset of the model's schedule play no part, as in diffusers. Image-to-image cuts these timesteps
# as for every sampler (img2img_plan), which is what diffusers' StableDiffusionImg2ImgPipeline does with
# LCMScheduler (its LatentConsistencyModelImg2ImgPipeline instead spreads all the steps below the strength).
# ----------------------------------------------------------------------------------------------

LCM_ORIGINAL_STEPS = 50  # the steps of the schedule LCM was distilled on (diffusers' original_inference_steps)
LCM_SIGMA_DATA = 0.5
LCM_TIMESTEP_SCALING = 10.0


def lcm_grid(num_steps, spacing, schedule_type, schedule):
    """num_steps of the distillation schedule's timesteps, noisiest first (int64); no sigmas: LCM walks timesteps.

    With T training steps and k = T // 50 the schedule is t = 50 k - 1, 49 k - 1, ..., k - 1; num_steps of them
    are taken at positions floor(j * 50 / num_steps), j = 0 .. num_steps - 1 (4 steps: 999, 759, 499, 259).
    """
    original_steps = LCM_ORIGINAL_STEPS
    if schedule.num_train_timesteps < original_steps:
        raise ValueError(f"LCM's {original_steps}-step schedule needs at least {original_steps} training timesteps, "
                         f"this model has {schedule.num_train_timesteps}")
    if num_steps > original_steps:
        raise ValueError(f"LCM picks its steps from the {original_steps} of its distillation schedule: "
                         f"num_steps must be at most {original_steps}, got {num_steps}")
    k = schedule.num_train_timesteps // original_steps
    distilled = np.arange(original_steps, 0, -1) * k - 1  # descending: 50 k - 1, ..., k - 1
    positions = np.floor(np.linspace(0, original_steps, num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(distilled[positions].astype(np.int64)), None


def consistency_scalings(t, sigma_data=LCM_SIGMA_DATA, timestep_scaling=LCM_TIMESTEP_SCALING):
    """(c_skip, c_out) at timestep t: the boundary condition f(x, 0) = x, with t scaled by timestep_scaling."""
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def consistency_function(x, predicted_x0, t):
    """f(x, t) = c_skip(t) x + c_out(t) x0_pred: the consistency model's clean latent."""
    c_skip, c_out = consistency_scalings(t)
    return c_out * predicted_x0 + c_skip * x


def lcm_step(denoised, alpha_bar_next, noise):
    """Algorithm 1's re-noising: x_next = sqrt(a_next) f + sqrt(1 - a_next) z, or f itself after the last step
    (noise None)."""
    if noise is None:
        return denoised
    return alpha_bar_next**0.5 * denoised + (1 - alpha_bar_next) ** 0.5 * noise


def denoised_lcm(plan, i, x, model_output):
    """f(x, t) at call i: the consistency model's clean-latent estimate, what its step lands on."""
    t = plan.timesteps[i]
    _, predicted_x0 = eps_and_denoised_alpha_view(x, model_output, plan.alpha_bar(t), plan.prediction_type)
    return consistency_function(x, predicted_x0, t)


def step_lcm(plan, i, x, model_output, state, generators):
    denoised = denoised_lcm(plan, i, x, model_output)
    if i == len(plan.timesteps) - 1:
        return lcm_step(denoised, None, None), state
    noise = draw_noise(model_output.shape, generators, model_output.device, denoised.dtype)
    return lcm_step(denoised, plan.alpha_bar(plan.timesteps[i + 1]), noise), state


SAMPLERS["lcm"] = Sampler("LCM", "alpha", lcm_grid, denoised_lcm, step_lcm, schedule_types=("spaced",))


SAMPLER_NAMES = tuple(SAMPLERS)
