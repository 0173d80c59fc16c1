"""Prompt -> picture: the whole Stable Diffusion loop on one screen, its Python API and command line.

    python -m sd_scratch.sample --prompt "a red circle on a blue background"

`generate` below is the loop of the walkthroughs, in their order: tokenize and encode the prompt
and the negative prompt, make the initial noise from the seed, then for every timestep scale the
input, run the UNet once on the [uncond, cond] batch, apply classifier-free guidance, take the
sampler's step; finally undo the latent scaling and decode with the VAE.

Seeds mean the same everywhere: image i of a run starts from
`torch.randn((1, C, H/f, W/f), generator=torch.Generator("cpu").manual_seed(seed + i))`, drawn on
the CPU and moved to the device afterwards (f is the VAE's downsampling factor, 8 in SD). So a seed
gives the same picture on CPU, CUDA and MPS, image i of a batch equals a single run with seed + i,
and diffusers given the same list of CPU generators makes the same picture. Samplers that draw
noise during the loop (euler_a, ddim with eta > 0) draw it from that image's generator too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd_scratch import samplers
from sd_scratch.checkpoint import StableDiffusion, release_weights


@dataclass
class Generation:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    previews: list[torch.Tensor] = field(default_factory=list)  # predicted clean images along the way


def encode_prompts(model: StableDiffusion, prompts: list[str], skip_last_layers: int) -> torch.Tensor:
    """Prompts -> (B, 77, width) text embeddings, the UNet's cross-attention context."""
    tokens = model.tokenizer(prompts)
    device = model.text_encoder.text_model.final_layer_norm.weight.device
    return model.text_encoder(tokens.input_ids.to(device), skip_last_layers=skip_last_layers)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """One (1, C, h, w) draw per image from its own CPU generator, then moved to the device."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(device)


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Push the prediction away from the unconditional one, towards (and past) the prompt's.
    scale = 1 is the prompt's own prediction; SD's usual 7.5 exaggerates the difference."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def latents_to_images(model: StableDiffusion, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Undo the latent scaling (SD 1.x/2.x: latents = 0.18215 * z), decode, map [-1, 1] to [0, 1].

    tiled: decode in overlapping tiles (`VAE.decode_tiled`), for images too large to decode at once.
    A half-precision VAE can overflow to NaN on some images (a known weakness of SD's VAE in fp16);
    rather than save a black picture, we move the VAE to fp32 once and decode again.
    """
    vae = model.vae
    decode = vae.decode_tiled if tiled else vae.decode
    images = decode((latents / vae.config.scaling_factor).to(vae.post_quant_conv.weight.dtype))
    if not torch.isfinite(images).all() and images.dtype != torch.float32:
        warnings.warn("the half-precision VAE decode gave NaN or inf: the VAE now runs in float32", stacklevel=2)
        vae.float()
        images = decode((latents / vae.config.scaling_factor).float())
    return (images.float() / 2 + 0.5).clamp(0, 1)


def images_to_latents(model: StableDiffusion, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Image-to-image's start: encode each image, sample its posterior with that image's generator."""
    vae = model.vae
    images = images.to(vae.quant_conv.weight.device, vae.quant_conv.weight.dtype)
    return torch.cat([vae.latents_from_images(images[i:i + 1], generator=g) for i, g in enumerate(generators)])


@torch.inference_mode()
def generate(model: StableDiffusion, prompts: str | list[str], negative_prompt: str = "", *, steps: int = 25,
             guidance: float = 7.5, sampler: str = "euler", spacing: str = "leading", karras: bool = False,
             eta: float | None = None, seed: int = 0,
             height: int | None = None, width: int | None = None, skip_last_layers: int | None = None,
             init_image: torch.Tensor | None = None, strength: float = 0.8, preview_every: int = 0,
             attention_slices: int = 1, tiled_decode: bool = False, compile_unet: bool = False,
             progress: bool = True) -> torch.Tensor | Generation:
    """Images for `prompts` (one image per prompt; image i uses seed + i), as (B, 3, H, W) in [0, 1].

    eta: noise added back at each step; None means the sampler's usual value (euler_a: 1, ddim: 0).
    init_image: (B or 1, 3, H, W) in [-1, 1] for image-to-image, noised to `strength` (1 = pure noise).
    preview_every: if > 0, also return the decoded predicted clean image every that many UNet calls
    (then a Generation is returned instead of the bare tensor).
    Memory and speed, all off by default and none changing the loop: attention_slices > 1 computes
    attention a slice of queries at a time (`UNet.set_attention_slices`), tiled_decode decodes in
    overlapping tiles (`VAE.decode_tiled`), compile_unet runs the UNet through torch.compile.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = len(prompts)
    default_height, default_width = init_image.shape[-2:] if init_image is not None else (model.image_size,) * 2
    height, width = height or default_height, width or default_width
    check_size("height", height)
    check_size("width", width)
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    device, dtype = model.unet.out[2].weight.device, model.unet.out[2].weight.dtype
    guided = guidance > 1  # at guidance 1 the unconditional half would cancel out: skip it, as diffusers does
    model.unet.set_attention_slices(attention_slices)
    unet = torch.compile(model.unet) if compile_unet else model.unet

    # 1. Text -> embeddings, for the prompt and for the negative prompt that guidance steers away from
    cond = encode_prompts(model, prompts, skip_last_layers).to(dtype)
    if guided:
        uncond = encode_prompts(model, [negative_prompt] * batch, skip_last_layers).to(dtype)
        context = torch.cat([uncond, cond])  # (2B, 77, width): one UNet call serves both halves
    release_weights(model.text_encoder)  # done with it: weights still in the file need no memory now

    # 2. The sampler's walk down the noise levels
    plan = samplers.make_plan(sampler, steps, spacing=spacing, karras=karras, eta=eta,
                              prediction_type=model.prediction_type)

    # 3. The starting latents: pure noise, or the encoded image noised to the strength's level
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    factor = model.vae.config.downsampling_factor  # pixels per latent, 8 for SD
    latent_shape = (model.unet.config.in_channels, height // factor, width // factor)
    if init_image is None:
        latents = initial_noise(generators, latent_shape, device, torch.float32) * plan.init_noise_sigma
    else:
        plan = samplers.img2img_plan(plan, strength)
        clean = images_to_latents(model, init_image.expand(batch, -1, -1, -1), generators).float()
        latents = samplers.add_noise(plan, clean, initial_noise(generators, latent_shape, device, torch.float32))
    latents = latents.to(dtype)

    # 4. The denoising loop
    state = samplers.initial_state(plan)
    previews = []
    for i, t in enumerate(tqdm(plan.timesteps, disable=not progress, desc=sampler)):
        model_input = samplers.scale_model_input(plan, i, latents)
        if guided:
            noise_uncond, noise_cond = unet(torch.cat([model_input] * 2), t, context).chunk(2)
            noise_pred = classifier_free_guidance(noise_uncond, noise_cond, guidance)
        else:
            noise_pred = unet(model_input, t, cond)
        if preview_every and (i + 1) % preview_every == 0:
            previews.append(latents_to_images(model, samplers.predicted_x0(plan, i, latents, noise_pred), tiled_decode))
        latents, state = samplers.step(plan, i, latents, noise_pred, state, generators)

    # 5. Latents -> pixels
    release_weights(model.unet)
    images = latents_to_images(model, latents, tiled_decode)
    return Generation(images, previews) if preview_every else images


def check_size(name: str, pixels: int) -> None:
    """The VAE halves the image three times (SD): sides must be multiples of 8."""
    if pixels < 8 or pixels % 8:
        lower, upper = max(8, pixels // 8 * 8), (pixels // 8 + 1) * 8
        raise ValueError(f"{name} must be a multiple of 8, got {pixels}: try {lower} or {upper}")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The command line, in the spirit of the original txt2img script

DEFAULT_PROMPT = "a red circle on a blue background"  # in the shipped tiny model's vocabulary
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "lms": "LMS", "ddim": "DDIM", "pndm": "PLMS",
                  "dpmpp_2m": "DPM++ 2M", "heun": "Heun"}  # as image browsers name them
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sd_scratch.sample", description="Generate images with Stable Diffusion.")
    p.add_argument("--prompt", help=f"what to draw (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: nothing)")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line, instead of --prompt")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: 25)")
    p.add_argument("--guidance", type=float, default=7.5,
                   help="classifier-free guidance scale; at or below 1 guidance is off (default: 7.5)")
    p.add_argument("--sampler", default="euler", help=f"one of {', '.join(samplers.SAMPLER_NAMES)} (default: euler)")
    p.add_argument("--spacing", default="leading", choices=["leading", "linspace", "trailing"],
                   help="how the steps are spread over the 1000 training timesteps (default: leading, as SD 1.5)")
    p.add_argument("--karras", action="store_true", help="Karras noise levels (euler, euler_a, lms, heun, dpmpp_2m)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise added back per step: euler_a default 1, ddim default 0 (deterministic)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image i uses seed + i (default: 42)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--n-samples", type=int, default=1, help="images per batch, i.e. per pass of the loop (default: 1)")
    p.add_argument("--n-iter", type=int, default=1, help="batches to run, one after another (default: 1)")
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for the images (default: outputs)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="also save a grid when more than one image is made (default: on)")
    p.add_argument("--checkpoint", help="a .safetensors/.ckpt file or a diffusers folder (default: weights/tiny_sd.safetensors)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps, or auto: cuda, then mps, then cpu (default: auto)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights' precision (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--clip-skip", type=int, help="skip the text encoder's last N layers (diffusers' clip_skip; default: the model's)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="override what the UNet predicts (SD 2.x base: epsilon)")
    p.add_argument("--init-image", type=Path, help="start from this image (image-to-image)")
    p.add_argument("--strength", type=float, help="image-to-image: how much noise to add, in (0, 1] (default: 0.8)")
    p.add_argument("--save-intermediates", type=int, default=0, metavar="K",
                   help="also save a strip of the predicted clean image every K steps")
    p.add_argument("--attention-slices", type=int, default=1, metavar="N",
                   help="compute attention N slices of queries at a time: same images, less memory (default: 1, off)")
    p.add_argument("--tiled-decode", action="store_true",
                   help="decode the latents in overlapping, cross-faded tiles: for images too large to decode at once")
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (slow first step)")
    return p


def check_arguments(args) -> list[str]:
    """Everything about the request that can be wrong, found before any weights are loaded."""
    if args.prompt is not None and args.from_file is not None:
        raise UsageError("give --prompt or --from-file, not both")
    if args.from_file is not None:
        try:
            prompts = [line.strip() for line in args.from_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read prompt file {args.from_file}: {error.strerror if isinstance(error, OSError) else error}")
        if not prompts:
            raise UsageError(f"prompt file {args.from_file} has no prompts: write one prompt per line")
    else:
        prompts = [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            try:
                check_size(name, getattr(args, name))
            except ValueError as error:
                raise UsageError(str(error))
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image: it says how much of the init image to keep")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance < 0:
        raise UsageError(f"--guidance must not be negative, got {args.guidance} (use 1 or less to turn guidance off)")
    try:  # steps, sampler name, eta, karras: the sampler's own checks, before any weights are loaded
        plan = samplers.make_plan(args.sampler, args.steps, spacing=args.spacing, karras=args.karras, eta=args.eta)
        if args.init_image is not None:
            samplers.img2img_plan(plan, args.strength or 0.8)
    except ValueError as error:
        raise UsageError(str(error))
    if args.n_samples < 1 or args.n_iter < 1:
        raise UsageError("--n-samples and --n-iter must be at least 1")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must not be negative, got {args.clip_skip}")
    if args.save_intermediates < 0:
        raise UsageError("--save-intermediates must be 0 (off) or a positive number of steps")
    if args.attention_slices < 1:
        raise UsageError(f"--attention-slices must be at least 1 (1 is off), got {args.attention_slices}")
    if args.init_image is not None:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(args.init_image) as image:
                image.load()
        except (OSError, UnidentifiedImageError) as error:
            raise UsageError(f"cannot read init image {args.init_image}: {error}")
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.outdir):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to output folder {args.outdir}: {error.strerror or error}")
    return prompts


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source
    try:
        args = build_parser().parse_args(argv)
        prompts = check_arguments(args)
        return run(args, prompts)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args, prompts: list[str]) -> int:
    from sd_scratch.checkpoint import CheckpointError, load_checkpoint
    from sd_scratch.images import from_pil, grid, next_free_number, parameters_text, save_png, to_pil

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] or (torch.float32 if device.type == "cpu" else torch.float16)
    try:
        model = load_checkpoint(args.checkpoint, device=device, dtype=dtype, prediction_type=args.prediction_type)
    except CheckpointError as error:
        raise UsageError(str(error))
    height, width = args.height or model.image_size, args.width or model.image_size
    init_image = None
    if args.init_image is not None:
        from PIL import Image
        with Image.open(args.init_image) as image:
            init_image = from_pil(image, width, height)
    skip = model.skip_last_layers if args.clip_skip is None else args.clip_skip
    if skip >= model.text_encoder.config.layers:
        raise UsageError(f"--clip-skip {skip} leaves no text encoder layer: it has {model.text_encoder.config.layers}")

    made = []
    number = next_free_number(args.outdir, "sample")
    model_name = Path(model.source).stem
    for iteration in range(args.n_iter):
        for prompt in prompts:
            first_seed = args.seed + iteration * args.n_samples
            result = generate(model, [prompt] * args.n_samples, args.negative_prompt, steps=args.steps,
                              guidance=args.guidance, sampler=args.sampler, spacing=args.spacing,
                              karras=args.karras, eta=args.eta,
                              seed=first_seed, height=height, width=width, skip_last_layers=skip,
                              init_image=init_image, strength=args.strength or 0.8,
                              preview_every=args.save_intermediates, attention_slices=args.attention_slices,
                              tiled_decode=args.tiled_decode, compile_unet=args.compile)
            images = result.images if isinstance(result, Generation) else result
            for i, image in enumerate(to_pil(images)):
                settings = {"Steps": args.steps, "Sampler": SAMPLER_LABELS[args.sampler] + (" Karras" if args.karras else ""),
                            "CFG scale": args.guidance, "Seed": first_seed + i, "Size": f"{width}x{height}",
                            "Model": model_name}
                if skip:
                    settings["Clip skip"] = skip + 1  # the web UIs count the last layer as 1
                if init_image is not None:
                    settings["Denoising strength"] = args.strength or 0.8
                if args.eta is not None:
                    settings["Eta"] = args.eta
                path = save_png(image, args.outdir / f"sample-{number:05d}.png",
                                parameters_text(prompt, args.negative_prompt, settings))
                number += 1
                made.append(image)
                print(path)
                if isinstance(result, Generation) and result.previews:
                    strip = grid([to_pil(preview[i:i + 1])[0] for preview in result.previews] + [image],
                                 columns=len(result.previews) + 1)
                    print(save_png(strip, path.with_name(path.stem + "-steps.png")))
    if args.grid and len(made) > 1:
        print(save_png(grid(made, columns=args.n_samples), args.outdir / f"grid-{next_free_number(args.outdir, 'grid'):05d}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
