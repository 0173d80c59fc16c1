"""The command line, in the spirit of the original txt2img script: `python -m sd_scratch.sample`.

Everything the user typed is checked before any weights are loaded, and a mistake is one line on
stderr and exit code 2, never a traceback. Images are numbered after the highest number already in
the output folder, so no file is ever overwritten, and each carries its settings in a `parameters`
text chunk that image browsers read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from sd_scratch import samplers
from sd_scratch.sample import SpeedAndMemory, check_size, check_unet_input, generate
from sd_scratch.schedule import SPACINGS

DEFAULT_PROMPT = "a red circle on a blue background"  # in the shipped tiny model's vocabulary
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
    p.add_argument("--spacing", choices=list(SPACINGS),
                   help="how the steps are spread over the training timesteps (default: the model's; SD: leading)")
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
    from sd_scratch.images import from_pil, grid, next_free_number, parameters_text, save_png, to_pil
    from sd_scratch.loading import CheckpointError, load_checkpoint

    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] or (torch.float32 if device.type == "cpu" else torch.float16)
    try:
        model = load_checkpoint(args.checkpoint, device=device, dtype=dtype, prediction_type=args.prediction_type)
        check_unet_input(model)
    except (CheckpointError, ValueError) as error:
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

    speed = SpeedAndMemory(args.attention_slices, args.tiled_decode, args.compile)
    # The sampler as image browsers name it: "DPM++ 2M Karras"
    sampler_label = samplers.SAMPLERS[args.sampler].label + (" Karras" if args.karras else "")
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
                              preview_every=args.save_intermediates, speed=speed)
            for i, image in enumerate(result.pil_images):
                settings = {"Steps": args.steps, "Sampler": sampler_label,
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
                if result.previews:
                    strip = grid([to_pil(preview[i:i + 1])[0] for preview in result.previews] + [image],
                                 columns=len(result.previews) + 1)
                    print(save_png(strip, path.with_name(path.stem + "-steps.png")))
    if args.grid and len(made) > 1:
        print(save_png(grid(made, columns=args.n_samples), args.outdir / f"grid-{next_free_number(args.outdir, 'grid'):05d}.png"))
    return 0


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


if __name__ == "__main__":
    sys.exit(main())
