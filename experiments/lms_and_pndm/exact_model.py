"""Would a perfect model pass? Guided sampling with the exact denoiser of the tiny model's kind of data.

    python -m experiments.lms_and_pndm.exact_model                    # every sampler, guidance 1, 3 and 7.5
    python -m experiments.lms_and_pndm.exact_model --shades 0.12 --sides 7 --places 1 --guidance 7.5

A network trained to convergence on a finite set of clean latents x_1 .. x_N, all equally likely,
computes the least-squares estimate of x_0 from x = x_0 + sigma * noise, which is the posterior mean

    D(x) = sum_k w_k x_k,    w = softmax_k(-|x - x_k|^2 / (2 sigma^2))

(the "ideal denoiser" of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", appendix B), and, given a caption, the same sum over that caption's images
alone. Sampling these two with the samplers and the classifier-free guidance of sample.py leaves
no network and no training in the loop: whatever still goes wrong belongs to the data and the
sampler.

The data mirror the tiny dataset in the shipped VAE's latent space (4 x 16 x 16): a square of one of
the eight colours on a background of another (8 x 7 ordered pairs, the caption's colours), at several
sizes (`--sides`, in latent cells) and places (`--places` per axis, spread over the free room). Each
colour is the VAE's latent of a flat picture of it (evaluate.rgb_latents), scaled as the UNet sees
it. `--shades A` adds shades: every RGB channel of a colour moved by -A, 0 or +A (27 shades of each,
all under the same name), so that a caption no longer pins the latent exactly. A sample counts as
right when the image of the set nearest to it has the asked pair of colours.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from sd_scratch import samplers
from sd_scratch.loading import CheckpointError, load_checkpoint
from sd_scratch.sample import classifier_free_guidance, initial_noise
from sd_scratch.schedule import SPACINGS, alpha_and_noise_level
from sd_scratch.tiny.dataset import COLOURS, palette_tensor
from sd_scratch.tiny.evaluate import FIRST_SEED, rgb_latents

LATENT_SIZE = 16  # the tiny model's latents: 64 x 64 pixels, shrunk 4 times


def square_layouts(sides: list[int], places: int, size: int = LATENT_SIZE) -> torch.Tensor:
    """(L, size, size) masks: a square of each side at places x places positions spread over the room left."""
    masks = []
    for side in sides:
        room = size - side
        offsets = sorted({round(room * k / (places - 1)) for k in range(places)}) if places > 1 else [room // 2]
        for top, left in itertools.product(offsets, offsets):
            mask = torch.zeros(size, size, dtype=torch.bool)
            mask[top: top + side, left: left + side] = True
            masks.append(mask)
    return torch.stack(masks)


def finite_dataset(colours: torch.Tensor, layouts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (square colour, background colour) pair of different colours, in every shade pair and layout.

    colours: (K, S, C), S shades of K colours. Returns the latents (N, C, H, W) and each one's caption,
    numbered square colour * K + background colour.
    """
    latents, captions = [], []
    for square, background in itertools.permutations(range(len(colours)), 2):
        inside = colours[square][:, None, :, None, None, None]  # (S, 1, C, 1, 1, 1): the square's shade
        outside = colours[background][None, :, :, None, None, None]  # (1, S, C, 1, 1, 1): the background's
        pictures = torch.where(layouts[None, None, None], inside, outside)  # (S, S, C, L, H, W)
        pictures = pictures.permute(0, 1, 3, 2, 4, 5).flatten(0, 2)  # (S * S * L, C, H, W)
        latents.append(pictures)
        captions.append(torch.full((len(pictures),), caption_number(square, background, len(colours))))
    return torch.cat(latents), torch.cat(captions)


def caption_number(square: int, background: int, colours: int) -> int:
    """finite_dataset's number for the caption of a square of colour `square` on `background`."""
    return square * colours + background


def exact_denoiser(x: torch.Tensor, sigma: float, latents: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The posterior mean of x_0 given x = x_0 + sigma * noise, x_0 drawn evenly from the allowed latents.

    x: (B, C, H, W); latents: (N, C, H, W); allowed: (B, N), which latents each sample's prior holds.
    """
    squared_distance = torch.cdist(x.flatten(1), latents.flatten(1)).square()
    log_weights = (-squared_distance / (2 * sigma**2)).masked_fill(~allowed, float("-inf"))
    return (log_weights.softmax(dim=1) @ latents.flatten(1)).view(x.shape)


def exact_noise_prediction(model_input: torch.Tensor, alpha_bar: float, latents: torch.Tensor,
                           allowed: torch.Tensor) -> torch.Tensor:
    """What a UNet trained to convergence returns for x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise.

    In the sigma view x_t / sqrt(alpha_bar) = x_0 + sigma noise, sigma = sqrt((1 - alpha_bar) / alpha_bar),
    so the noise estimate is (x_t - sqrt(alpha_bar) D) / sqrt(1 - alpha_bar).
    """
    sigma = ((1 - alpha_bar) / alpha_bar) ** 0.5
    denoised = exact_denoiser(model_input / alpha_bar**0.5, sigma, latents, allowed)
    return (model_input - alpha_bar**0.5 * denoised) / (1 - alpha_bar) ** 0.5


def input_alpha_bar(plan: samplers.Plan, i: int) -> float:
    """alpha_bar of what the UNet sees at call i: from the plan's sigma where it has one, else from t."""
    if plan.sigmas is not None:
        alpha, _ = alpha_and_noise_level(float(plan.sigmas[i]))  # alpha = sqrt(alpha_bar)
        return alpha**2
    return float(plan.alphas_cumprod[int(plan.timesteps[i])])


@torch.no_grad()
def sample_exact(sampler: str, guidance: float, latents: torch.Tensor, captions: torch.Tensor,
                 asked: torch.Tensor, seeds: list[int], steps: int = 25, spacing: str = "leading",
                 karras: bool = False) -> torch.Tensor:
    """sample.py's loop with the exact denoisers in the UNet's place; returns the final latents (B, C, H, W)."""
    plan = samplers.make_plan(sampler, steps, spacing=spacing, karras=karras, prediction_type="epsilon")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]  # as sample.py: one per sample
    x = initial_noise(generators, latents.shape[1:], "cpu").to(latents.dtype) * plan.init_noise_sigma
    prompt_only = captions[None, :] == asked[:, None]  # the conditioned prior: the asked caption's latents
    everything = torch.ones_like(prompt_only)  # the unconditional prior: the empty prompt's
    state = samplers.initial_state(plan)
    for i in range(len(plan.timesteps)):
        model_input, alpha_bar = samplers.scale_model_input(plan, i, x), input_alpha_bar(plan, i)
        noise_uncond = exact_noise_prediction(model_input, alpha_bar, latents, everything)
        noise_cond = exact_noise_prediction(model_input, alpha_bar, latents, prompt_only)
        x, state = samplers.step(plan, i, x, classifier_free_guidance(noise_uncond, noise_cond, guidance), state,
                                 generators, unconditional_output=noise_uncond)
    return x


def right_fraction(final: torch.Tensor, latents: torch.Tensor, captions: torch.Tensor, asked: torch.Tensor) -> float:
    """The fraction of samples whose nearest latent of the set has the asked caption."""
    nearest = torch.cdist(final.flatten(1), latents.flatten(1)).argmin(dim=1)
    return float((captions[nearest] == asked).double().mean())


def shaded_colours(model, shade: float) -> torch.Tensor:
    """(8, S, C): the scaled latents of each palette colour's shades (S = 1 without shades, else 27)."""
    moves = (-shade, 0.0, shade) if shade > 0 else (0.0,)
    offsets = torch.tensor(list(itertools.product(moves, repeat=3)))  # (S, 3): every channel moved or not
    base = palette_tensor(list(COLOURS))  # (8, 3)
    rgb = (base[:, None, :] + offsets[None]).clamp(0, 1)  # (8, S, 3)
    scaled = model.vae.config.scaling_factor * rgb_latents(model, rgb.flatten(0, 1))
    return scaled.double().view(len(base), len(offsets), -1)


def asked_captions(count: int, colours: int = len(COLOURS), seed: int = 0) -> torch.Tensor:
    """`count` captions drawn evenly from finite_dataset's numbering, with a fixed seed."""
    pairs = torch.tensor([caption_number(square, background, colours)
                          for square, background in itertools.permutations(range(colours), 2)])
    return pairs[torch.randint(len(pairs), (count,), generator=torch.Generator().manual_seed(seed))]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m experiments.lms_and_pndm.exact_model",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="whose VAE gives the colours (default: the tiny model)")
    scale_samplers = [name for name in samplers.SAMPLER_NAMES  # not lcm: a sampler for models distilled for it
                      if not samplers.needs_unconditional(name) and name != "lcm"]
    parser.add_argument("--samplers", nargs="+", default=scale_samplers, choices=samplers.SAMPLER_NAMES,
                        help="default: all but euler_cfgpp, whose guidance is a lambda in [0, 1]")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0, 7.5])
    parser.add_argument("--count", type=int, default=96, help="samples per sampler and guidance")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--spacing", default="leading", choices=list(SPACINGS))
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (the sigma-view samplers and dpmpp_2m)")
    parser.add_argument("--sides", nargs="+", type=int, default=[5, 7, 9], help="square sides, in latent cells")
    parser.add_argument("--places", type=int, default=3, help="positions per axis")
    parser.add_argument("--shades", type=float, default=0.0, help="move each RGB channel by -A, 0, +A (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not all(0 < side < LATENT_SIZE for side in args.sides):
        parser.error(f"--sides must be between 1 and {LATENT_SIZE - 1} latent cells, got {args.sides}")
    if args.places < 1 or args.count < 1 or args.steps < 1:
        parser.error("--places, --count and --steps must be at least 1")
    if not 0 <= args.shades <= 0.5:
        parser.error(f"--shades must be between 0 and 0.5 (a fraction of each RGB channel), got {args.shades}")
    if args.karras and {"ddim", "pndm"} & set(args.samplers):
        parser.error("--karras needs sigma-based samplers: leave ddim and pndm out of --samplers")
    for sampler, guidance in itertools.product(args.samplers, args.guidance):
        try:
            samplers.check_guidance(sampler, guidance)
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    try:
        model = load_checkpoint(args.checkpoint)
    except CheckpointError as error:
        parser.exit(2, f"error: {error}\n")

    colours = shaded_colours(model, args.shades)
    layouts = square_layouts(args.sides, args.places)
    latents, captions = finite_dataset(colours, layouts)
    asked = asked_captions(args.count)
    seeds = [FIRST_SEED + k for k in range(len(asked))]
    print(f"{len(latents)} clean latents ({len(layouts)} layouts, {colours.shape[1]} shade(s) of each colour), "
          f"{len(asked)} samples, {args.steps} steps ({args.spacing}{', Karras' if args.karras else ''}); "
          "right: the nearest latent has the asked colours")
    print(f"{'sampler':<17} {'guidance':>8} {'right':>7}")
    for sampler in args.samplers:
        for guidance in args.guidance:
            final = sample_exact(sampler, guidance, latents, captions, asked, seeds, args.steps, args.spacing,
                                 args.karras)
            print(f"{sampler:<17} {guidance:>8g} {right_fraction(final, latents, captions, asked):>7.1%}", flush=True)


if __name__ == "__main__":
    main()
