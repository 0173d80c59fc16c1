"""How stiff is guided sampling? The measurement behind experiments/lms_and_pndm/README.md.

    python -m experiments.lms_and_pndm.stiffness                      # 32 prompts along Euler's path, guidance 7.5
    python -m experiments.lms_and_pndm.stiffness --guidance 3 --count 8

The sigma-view samplers integrate dx/dsigma = (x - D(x)) / sigma, where D is the guided clean-image
estimate D = D_u + w (D_c - D_u). How fast that slope changes with x is set by D's Jacobian J: along
a direction v with J v = s v the ODE decays at rate (1 - s) / sigma. A step of h in sigma is stable
for Euler while h (1 - s) / sigma < 2, but for the four-step Adams-Bashforth methods (LMS, and PNDM
in t) only while it is below about 0.3: the real-axis extent of AB4's stability region, 3/10
(Hairer & Wanner, "Solving Ordinary Differential Equations II", sec. V.1).

At a few steps along an Euler run this finds, per picture, the direction v in which the guided
estimate changes most (power iteration on finite differences, J v ~ (D(x + eps v) - D(x)) / eps),
and prints the slopes of the guided, unconditional and conditioned estimates along it, with
h (1 - s) / sigma. The medians over the pictures are shown.

`--exact` prints, for comparison, what an exact unconditional model would do, in a sketch that keeps
only a flat region's mean colour (exact_region_slope): above sigma ~4 it follows x as the trained
one does; below, it has settled on one of the eight colours and no longer follows x at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from sd_scratch import samplers
from sd_scratch.loading import load_checkpoint
from sd_scratch.conditioning import encode_prompts, guidance_batch
from sd_scratch.sample import classifier_free_guidance, initial_noise, latent_shape
from sd_scratch.tiny.dataset import COLOURS, caption
from sd_scratch.tiny.evaluate import FIRST_SEED, colour_latents, evaluation_prompts

ADAMS_BASHFORTH_4_LIMIT = 0.3  # AB4 is stable for h * rate up to 3/10 on the negative real axis
# The regions of exact_region_slope's sketch, in cells of the 16 x 16 latent: a shape of a bit under half
# the image side, and the background behind a shape of a bit over half.
SHAPE_CELLS, BACKGROUND_CELLS = 50, 150
EXACT_DRAWS = 50


def per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(dim=1)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))


@torch.no_grad()
def slopes_along_dominant_direction(estimates: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                                   x: torch.Tensor, guidance: float, epsilon: float, iterations: int,
                                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: v^T J v for the guided, unconditional and conditioned estimates, v the guided J's dominant direction.

    `estimates(x)` returns the unconditional and the conditioned clean-image estimates. Each
    iteration takes v <- J_guided v / |J_guided v|; the slopes are measured with the same unit v
    that was pushed through, so their signs are right even when the dominant slope is negative
    (then v flips each time, and v^T J v does not).
    """
    base_uncond, base_cond = estimates(x)
    v = unit(torch.randn(x.shape, generator=generator))
    for _ in range(iterations):
        uncond, cond = estimates(x + epsilon * v)
        jv_uncond, jv_cond = (uncond - base_uncond) / epsilon, (cond - base_cond) / epsilon
        jv_guided = jv_uncond + guidance * (jv_cond - jv_uncond)
        slopes = per_sample_dot(jv_guided, v), per_sample_dot(jv_uncond, v), per_sample_dot(jv_cond, v)
        v = unit(jv_guided)
    return slopes


@torch.no_grad()
def measure(model, prompts: list[str], guidance: float = 7.5, steps: int = 25, every: int = 3,
            iterations: int = 8, relative_epsilon: float = 1e-2) -> list[dict]:
    """Walk Euler's guided path from the evaluation's seeds; every `every` steps, measure the slopes."""
    plan = samplers.make_plan("euler", steps, prediction_type=model.prediction_type, schedule=model.schedule)
    prompted, unprompted = encode_prompts(model, prompts), encode_prompts(model, [""] * len(prompts))
    both = guidance_batch(unprompted, prompted)
    generators = [torch.Generator().manual_seed(FIRST_SEED + k) for k in range(len(prompts))]
    shape = latent_shape(model, model.image_size, model.image_size)
    x = initial_noise(generators, shape, model.device) * plan.init_noise_sigma
    state, rows = samplers.initial_state(plan), []
    for i, t in enumerate(plan.timesteps):
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])

        def estimates(latents, i=i, t=t):
            scaled = samplers.scale_model_input(plan, i, latents)
            eps_uncond, eps_cond = model.unet(scaled, t, unprompted.context), model.unet(scaled, t, prompted.context)
            return tuple(samplers.predicted_x0(plan, i, latents, eps) for eps in (eps_uncond, eps_cond))

        if i % every == 0 and sigma_next > 0:
            guided, uncond, cond = slopes_along_dominant_direction(
                estimates, x, guidance, relative_epsilon * sigma, iterations, torch.Generator().manual_seed(i))
            step_over_sigma = (sigma - sigma_next) / sigma
            rows.append(dict(step=i, sigma=sigma, step_over_sigma=step_over_sigma, guided=guided.median().item(),
                             uncond=uncond.median().item(), cond=cond.median().item(),
                             step_times_stiffness=(step_over_sigma * (1 - guided)).median().item()))
        eps_uncond, eps_cond = model.unet(torch.cat([samplers.scale_model_input(plan, i, x)] * 2), t,
                                          both.context).chunk(2)
        x, state = samplers.step(plan, i, x, classifier_free_guidance(eps_uncond, eps_cond, guidance), state)
    return rows


def exact_region_slope(colours: torch.Tensor, cells: int, sigma: float, region_mean: torch.Tensor) -> float:
    """The largest slope of the exact unconditional estimate of a flat region's colour, given its noisy mean.

    A region of `cells` latent cells, all one of the colours' latents mu_c (rows of `colours`, equally
    likely), is seen through noise sigma per cell, so its mean m is mu_c + noise of std sigma / sqrt(cells):
    p(c | m) is proportional to exp(-cells |m - mu_c|^2 / (2 sigma^2)). The exact estimate is the posterior
    mean, sum_c p(c | m) mu_c. Its derivative in m is the posterior covariance of mu over the noise
    variance, cells / sigma^2 * Cov(mu | m): the second-order form of Tweedie's formula (Efron 2011,
    "Tweedie's formula and selection bias"). Along a unit direction spread evenly over the region's
    cells, this is also the slope that `measure` reads off the whole latent.
    """
    posterior = (-cells * (region_mean - colours).square().sum(dim=1) / (2 * sigma**2)).softmax(dim=0)
    centred = colours - posterior @ colours
    covariance = (posterior[:, None] * centred).T @ centred
    return float(torch.linalg.eigvalsh(cells / sigma**2 * covariance).max())


def median_exact_slope(colours: torch.Tensor, cells: int, sigma: float, draws: int,
                       generator: torch.Generator) -> float:
    """The median of exact_region_slope over `draws` noisy means of each colour."""
    noisy_means = [mu + sigma / cells**0.5 * torch.randn(mu.shape, generator=generator)
                   for mu in colours for _ in range(draws)]
    slopes = [exact_region_slope(colours, cells, sigma, m) for m in noisy_means]
    return float(torch.tensor(slopes).median())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: weights/tiny_sd.safetensors")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--count", type=int, default=32, help="the first COUNT evaluation prompts")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact", action="store_true",
                        help="also print the exact unconditional slopes of exact_region_slope at the same sigmas")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint)
    prompts = [caption(*triple) for triple in evaluation_prompts()[: args.count]]
    print(f"{len(prompts)} prompts, Euler's path, {args.steps} steps, guidance {args.guidance:g}; medians")
    header = f"{'step':>4} {'sigma':>7} {'h/sigma':>8} {'guided':>7} {'uncond':>7} {'cond':>7} {'h(1-s)/sigma':>13}"
    if args.exact:
        # The eight colours' latents as the UNet sees them (scaled).
        colours = model.vae.config.scaling_factor * colour_latents(model, list(COLOURS))
        header += f" {'exact shape':>12} {'exact bg':>9}"
        print(f"exact: the exact unconditional slope for a shape of {SHAPE_CELLS} and a background of "
              f"{BACKGROUND_CELLS} latent cells (median over {EXACT_DRAWS} noisy means of each colour)")
    print(header)
    for row in measure(model, prompts, args.guidance, args.steps):
        flag = "  > AB4 limit" if row["step_times_stiffness"] > ADAMS_BASHFORTH_4_LIMIT else ""
        exact = ""
        if args.exact:
            shape, background = (median_exact_slope(colours, cells, row["sigma"], EXACT_DRAWS,
                                                    torch.Generator().manual_seed(0))
                                 for cells in (SHAPE_CELLS, BACKGROUND_CELLS))
            exact = f" {shape:>12.2f} {background:>9.2f}"
        print(f"{row['step']:>4} {row['sigma']:>7.3f} {row['step_over_sigma']:>8.2f} {row['guided']:>7.2f} "
              f"{row['uncond']:>7.2f} {row['cond']:>7.2f} {row['step_times_stiffness']:>13.2f}{exact}{flag}")


if __name__ == "__main__":
    main()
