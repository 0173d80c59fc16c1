"""The command line, in the spirit of the original txt2img script: `python -m sd_scratch.sample`.

Everything the user typed is checked before any weights are loaded, and a mistake is one line on
stderr and exit code 2, never a traceback; Ctrl-C is one line and exit code 130. What can be checked
without torch is checked before torch is imported, so `--help` and most mistakes answer at once.
Each image is saved under the first free number of the output folder, claimed atomically, so runs
writing into one folder at once never collide and no file is ever overwritten; every PNG carries
its settings in a `parameters` text chunk that image browsers read.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from sd_scratch.checks import SEED_RANGE, check_seeds, check_size, finite
from sd_scratch.prompts import find_lora, lora_multiplier, lora_tags, parse_emphasis, prompt_schedule

DEFAULT_PROMPT = "a red circle on a blue background"  # in the shipped tiny model's vocabulary
DEFAULT_GUIDANCE = 7.5  # SD's usual scale, for models that recommend none
CFGPP_GUIDANCE = 0.6  # euler_cfgpp's lambda, in [0, 1], when none is given (samplers.py, its section)
# The samplers and schedule types, by our names and as AUTOMATIC1111 labels them (the PNG's "Sampler" and
# "Schedule type"), and the spacings: samplers.SAMPLERS, sample.SCHEDULE_LABELS and schedule.SPACINGS,
# repeated here so that --help and the checks need no torch; tests/test_robustness.py keeps them equal.
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "lms": "LMS", "ddim": "DDIM", "pndm": "PLMS",
                  "dpmpp_2m": "DPM++ 2M", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
                  "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_sde": "DPM++ SDE", "ddpm": "DDPM", "unipc": "UniPC",
                  "unipc_3": "UniPC (order 3)", "euler_cfgpp": "Euler CFG++", "lcm": "LCM"}
SAMPLER_NAMES = tuple(SAMPLER_LABELS)
SCHEDULE_LABELS = {"spaced": "Spaced", "karras": "Karras", "exponential": "Exponential", "beta": "Beta",
                   "sgm_uniform": "SGM Uniform", "ays": "Align Your Steps"}
SCHEDULE_TYPES = tuple(SCHEDULE_LABELS)
SPACINGS = ("leading", "linspace", "trailing")
DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16")


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def by_name_or_label(text: str, labels: dict[str, str]) -> str:
    """Our name for `text`, given as ours or as AUTOMATIC1111's label, any case: "DPM++ 2M SDE" -> "dpmpp_2m_sde"."""
    for name, label in labels.items():
        if text.lower() in (name, label.lower()):
            return name
    raise argparse.ArgumentTypeError(f"unknown {'sampler' if labels is SAMPLER_LABELS else 'schedule'} {text!r}; "
                                     f"known: {', '.join(labels)}")


def finite_float(text: str) -> float:
    """argparse's float, without nan and inf."""
    try:
        return finite("the value", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number") from None


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sd_scratch.sample", description="Generate images with Stable Diffusion.")
    p.add_argument("--prompt", help=f"what to draw (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: nothing)")
    p.add_argument("--from-file", type=Path, help="a text file with one prompt per line, instead of --prompt")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default: 25)")
    p.add_argument("--guidance", type=finite_float,
                   help="classifier-free guidance scale; at or below 1 guidance is off (default: the scale the model "
                        f"recommends in its metadata, else {DEFAULT_GUIDANCE}; the shipped tiny model recommends 3). "
                        f"For euler_cfgpp: CFG++'s lambda, in [0, 1] (default {CFGPP_GUIDANCE})")
    p.add_argument("--sampler", default="euler", type=lambda text: by_name_or_label(text, SAMPLER_LABELS),
                   help=f"one of {', '.join(SAMPLER_NAMES)}, or as AUTOMATIC1111 names it ('DPM++ 2M SDE') "
                        "(default: euler)")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="how the steps are spread over the training timesteps (default: the model's; SD: leading)")
    p.add_argument("--schedule", type=lambda text: by_name_or_label(text, SCHEDULE_LABELS), default=None,
                   help="how the steps' noise levels are placed: spaced (at the spaced timesteps), karras, "
                        "exponential, "
                        "beta (Lee et al.), sgm_uniform, ays (Align Your Steps), or A1111's names ('SGM Uniform'); "
                        "not for ddim, pndm, ddpm and lcm (default: spaced)")
    p.add_argument("--karras", action="store_true", help="the same as --schedule karras")
    p.add_argument("--eta", type=finite_float, default=None,
                   help="noise added back per step: euler_a default 1, ddim default 0 (deterministic)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first image; image i of the run uses seed + i "
                   f"(default: 42; seeds are {SEED_RANGE[0]} to {SEED_RANGE[1]})")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--n-samples", type=int, default=1, help="images per batch, i.e. per pass of the loop (default: 1)")
    p.add_argument("--n-iter", type=int, default=1, help="batches to run, one after another (default: 1)")
    p.add_argument("--outdir", type=Path, default=Path("outputs"), help="folder for the images (default: outputs)")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True,
                   help="also save a grid when more than one image is made (default: on)")
    p.add_argument("--checkpoint",
                   help="a .safetensors/.ckpt file, a diffusers folder, or a Hugging Face id: OWNER/NAME (a diffusers "
                        "repository) or OWNER/NAME/FILE.safetensors, from the local cache or downloaded "
                        "(default: weights/tiny_sd.safetensors)")
    p.add_argument("--vae", type=Path, metavar="PATH",
                   help="a VAE to use instead of the checkpoint's: a VAE file of either layout (e.g. "
                        "vae-ft-mse-840000-ema-pruned.safetensors), or a diffusers VAE folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps, then cpu "
                   "(default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                   help="weights' precision (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--low-memory", action="store_true",
                   help="8-bit weights for the UNet and text encoders, quantised as the checkpoint is read, for "
                        "machines with 4 to 8 GB (a file of python -m sd_scratch.quantize loads 8-bit without it)")
    p.add_argument("--clip-skip", type=int,
                   help="skip the text encoder's last N layers (diffusers' clip_skip; default: the model's)")
    p.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (.safetensors, .pt, .bin); its file name is the word that "
                        "calls it in a prompt (repeatable)")
    p.add_argument("--embeddings-dir", type=Path, metavar="DIR", help="every embedding file in this folder")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:MULTIPLIER]",
                   help="merge a LoRA file (kohya/A1111 or diffusers/PEFT layout) into the weights, times MULTIPLIER "
                        "(default 1; repeatable)")
    p.add_argument("--lora-dir", type=Path, metavar="DIR",
                   help="where a prompt's <lora:NAME:MULTIPLIER> tags find NAME.safetensors (or .pt, .ckpt)")
    p.add_argument("--parameters-from", type=Path, metavar="IMAGE",
                   help="take prompt, negative prompt, steps, sampler, schedule type, CFG scale, seed, size and clip "
                        "skip from a PNG's parameters (ours or AUTOMATIC1111's); flags given here win")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override what the UNet predicts (SD 2.x base: epsilon)")
    p.add_argument("--init-image", type=Path, help="start from this image (image-to-image)")
    p.add_argument("--strength", type=finite_float,
                   help="image-to-image: how much noise to add, in (0, 1] (default: 0.8)")
    p.add_argument("--mask", type=Path, metavar="IMAGE",
                   help="inpainting: repaint where this picture is white, keep where it is black (with --init-image; "
                        "--strength then defaults to 1)")
    p.add_argument("--mask-blur", type=finite_float, default=0, metavar="PIXELS",
                   help="blur the mask first (Gaussian radius): moves its edge and softens --paste-back (default: 0)")
    p.add_argument("--invert-mask", action="store_true", help="repaint where the mask is black instead")
    p.add_argument("--paste-back", action="store_true",
                   help="put the init image's pixels back outside the mask (AUTOMATIC1111's default; off: the "
                        "model's picture, as diffusers gives it)")
    p.add_argument("--outpaint", metavar="LEFT,TOP,RIGHT,BOTTOM",
                   help="extend the init image by these many pixels (multiples of 8) on each side and paint the new "
                        "border")
    p.add_argument("--refiner", metavar="PATH",
                   help="SDXL: a refiner checkpoint (file, diffusers folder or Hugging Face id) that takes over the "
                        "last steps from the base (the 'ensemble of expert denoisers')")
    p.add_argument("--refiner-switch", type=finite_float, metavar="FRACTION",
                   help="SDXL: where the refiner takes over, as a fraction of the way down the noise levels "
                        "(default: 0.8, the last 20%%)")
    p.add_argument("--original-size", metavar="H,W",
                   help="SDXL: the size conditioning's 'original size' of the picture (default: the output size)")
    p.add_argument("--crop", metavar="TOP,LEFT", help="SDXL: the size conditioning's crop corner (default: 0,0)")
    p.add_argument("--target-size", metavar="H,W",
                   help="SDXL base: the size conditioning's 'target size' (default: the output size)")
    p.add_argument("--aesthetic-score", type=finite_float, nargs="+", metavar="S",
                   help="SDXL refiner: the aesthetic score of the prompt's half, and optionally of the negative "
                        "prompt's (default: 6 2.5)")
    p.add_argument("--save-intermediates", type=int, default=0, metavar="K",
                   help="also save a strip of the predicted clean image every K steps")
    p.add_argument("--preview", nargs="+", metavar=("KIND", "PATH"),
                   help="how --save-intermediates draws its pictures: vae (the full decode; default), approx (a "
                        "linear map of the latent channels: instant, blurry) or taesd PATH (a TAESD: "
                        "taesd_decoder.safetensors, taesdxl_ for SDXL, or an AutoencoderTiny folder; without PATH, "
                        "the shipped tiny model's own)")
    p.add_argument("--vae-decoder", nargs="+", metavar=("KIND", "PATH"),
                   help="what decodes the final pictures: vae (default) or taesd PATH (a TAESD, as for --preview: "
                        "much faster, less detail; for drafts)")
    p.add_argument("--safety-checker", type=Path, metavar="PATH",
                   help="check each picture with the safety checker of this diffusers SD 1.x folder (or its "
                        "safety_checker/ folder) and save what it flags black; on by default when --checkpoint is a "
                        "folder that has one")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the safety checker of the checkpoint's folder")
    p.add_argument("--attention-slices", type=int, default=1, metavar="N",
                   help="compute attention N slices of queries at a time: same images, less memory (default: 1, off)")
    p.add_argument("--tiled-decode", action="store_true",
                   help="decode the latents in overlapping, cross-faded tiles: for images too large to decode at once")
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (slow first step)")
    p.add_argument("--force", action="store_true",
                   help="run even when the size looks too large for the memory available")
    return p


# --parameters-from: what a PNG's parameters (images.settings_from_parameters) set, by command-line destination.
PARAMETER_FLAGS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler",
                   "schedule_type": "schedule", "guidance": "guidance", "seed": "seed", "width": "width",
                   "height": "height", "skip_last_layers": "clip_skip", "eta": "eta", "strength": "strength",
                   "spacing": "spacing"}


def typed_flags(parser: ArgumentParser, argv: list[str] | None) -> set[str]:
    """Which of PARAMETER_FLAGS (and --from-file) were typed: parsed again with each preset to a marker, which
    argparse leaves in place of a default."""
    unset = object()
    names = [*PARAMETER_FLAGS.values(), "from_file"]
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name in names if getattr(typed, name) is not unset}


def apply_parameters_from(args, given: set[str]) -> None:
    """Fill args from the PNG named by --parameters-from, except what was typed on the command line."""
    from sd_scratch.images import parse_parameters, read_parameters, settings_from_parameters

    try:
        text = read_parameters(args.parameters_from)
    except OSError as error:
        raise UsageError(f"cannot read {args.parameters_from}: {error.strerror or error}")
    if text is None:
        raise UsageError(f"{args.parameters_from} carries no generation parameters (no 'parameters' text chunk): "
                         "give the settings as flags instead")
    parameters = parse_parameters(text)
    try:
        settings, not_understood = settings_from_parameters(parameters)
    except ValueError as error:
        raise UsageError(f"{args.parameters_from}: {error}")
    settings |= {"prompt": parameters.prompt, "negative_prompt": parameters.negative_prompt}
    if not_understood:
        warnings.warn(f"{args.parameters_from}: these settings are not used here: {', '.join(not_understood)}")
    typed = given | ({"prompt"} if "from_file" in given else set())  # --from-file replaces the prompt too
    if args.init_image is None:
        settings.pop("strength", None)  # image-to-image's: without --init-image there is nothing to keep
    for name, value in settings.items():
        if PARAMETER_FLAGS[name] not in typed:
            setattr(args, PARAMETER_FLAGS[name], value)


def check_arguments(args) -> list[str]:
    """Everything about the request that can be wrong and needs no torch, found before it is imported."""
    if args.prompt is not None and args.from_file is not None:
        raise UsageError("give --prompt or --from-file, not both")
    if args.from_file is not None:
        try:
            text = args.from_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read prompt file {args.from_file}: "
                             f"{error.strerror if isinstance(error, OSError) else error}")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompt file {args.from_file} has no prompts: write one prompt per line")
    else:
        prompts = [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    args.lora = [lora_argument(text) for text in args.lora]
    tagged_lora_files(args, prompts)  # the LoRA tags: readable, and their files there
    try:  # a weight written as a number that is not one, e.g. (word:1.2.3), is the only unreadable prompt
        for prompt in [*prompts, args.negative_prompt]:
            for _, text in prompt_schedule(prompt, args.steps if args.steps >= 1 else 1):
                parse_emphasis(text)
    except ValueError as error:
        raise UsageError(f"{error}: write the weight as a number, e.g. (word:1.2), or \\( \\) for brackets as text")
    try:
        for name in ("height", "width"):
            if getattr(args, name) is not None:
                check_size(name, getattr(args, name))
        if args.n_samples < 1 or args.n_iter < 1:
            raise ValueError("--n-samples and --n-iter must be at least 1")
        check_seeds(args.seed, images_in_run(args, prompts), "--seed")
    except ValueError as error:
        raise UsageError(str(error))
    check_inpainting_arguments(args)
    check_sdxl_arguments(args)
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image: it says how much of the init image to keep")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise UsageError(f"--guidance must not be negative, got {args.guidance} (use 1 or less to turn guidance off)")
    if args.karras and args.schedule not in (None, "karras"):
        raise UsageError(f"--karras is --schedule karras: give one, not --karras with --schedule {args.schedule}")
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must not be negative, got {args.clip_skip}")
    if args.save_intermediates < 0:
        raise UsageError("--save-intermediates must be 0 (off) or a positive number of steps")
    check_decoder_arguments(args)
    if args.attention_slices < 1:
        raise UsageError(f"--attention-slices must be at least 1 (1 is off), got {args.attention_slices}")
    for path in args.embedding:
        if not path.is_file():
            raise UsageError(f"embedding file not found: {path}")
    if args.embeddings_dir is not None and not args.embeddings_dir.is_dir():
        raise UsageError(f"embeddings folder not found: {args.embeddings_dir}")
    if args.vae is not None and not args.vae.exists():
        raise UsageError(f"VAE not found: {args.vae}")
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


def check_inpainting_arguments(args) -> None:
    """--mask, --outpaint and their options, read before torch: sizes, alpha, multiples of 8."""
    if args.mask_blur < 0:
        raise UsageError(f"--mask-blur must not be negative, got {args.mask_blur}")
    mask_options = [flag for flag, given in [("--mask-blur", args.mask_blur > 0), ("--invert-mask", args.invert_mask),
                                             ("--paste-back", args.paste_back)] if given]
    if args.mask is None and args.outpaint is None:
        if mask_options:
            raise UsageError(f"{', '.join(mask_options)} needs --mask or --outpaint")
        return
    if args.init_image is None:
        raise UsageError(f"{'--mask' if args.mask is not None else '--outpaint'} needs --init-image: the picture "
                         "to repaint")
    if args.mask is not None and args.outpaint is not None:
        raise UsageError("give --mask or --outpaint, not both: --outpaint makes its own mask of the new border")
    if args.outpaint is not None:
        args.outpaint = outpaint_borders(args.outpaint)
        if args.invert_mask:
            raise UsageError("--invert-mask with --outpaint would repaint the picture and keep the border")
        if args.width is not None or args.height is not None:
            raise UsageError("--outpaint sets the size (the init image's plus the borders): leave out --width and "
                             "--height")
        return
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(args.mask) as mask, Image.open(args.init_image) as image:
            mask.load()
            if mask.mode in ("RGBA", "LA", "PA") or "transparency" in mask.info:
                raise UsageError(f"the mask {args.mask} has an alpha channel, which could mean either thing: save "
                                 "it without transparency, white where to repaint and black where to keep")
            if mask.size != image.size:
                raise UsageError(f"the mask {args.mask} is {mask.size[0]}x{mask.size[1]} and the init image "
                                 f"{image.size[0]}x{image.size[1]}: draw the mask on the picture's own size")
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"cannot read mask {args.mask}: {error}")


def decoder_argument(values: list[str] | None, flag: str, kinds: tuple[str, ...]) -> tuple[str, Path | None]:
    """--preview / --vae-decoder KIND [PATH] -> (KIND, PATH or None): only taesd takes a path, and it must exist."""
    if values is None:
        return "vae", None
    kind, paths = values[0].lower(), values[1:]
    if kind not in kinds:
        raise UsageError(f"{flag} takes {' or '.join(kinds)}, not {values[0]!r}")
    if kind != "taesd" and paths:
        raise UsageError(f"{flag} {kind} takes no path (only taesd does)")
    if len(paths) > 1:
        raise UsageError(f"{flag} taesd takes one path, the TAESD file or folder; got {len(paths)}")
    if paths and not Path(paths[0]).exists():
        raise UsageError(f"TAESD not found: {paths[0]}")
    return kind, Path(paths[0]) if paths else None


def check_decoder_arguments(args) -> None:
    """--preview, --vae-decoder and the safety checker's flags, read before torch."""
    if args.preview is not None and not args.save_intermediates:
        raise UsageError("--preview says how --save-intermediates K draws its pictures: give --save-intermediates too")
    args.preview = decoder_argument(args.preview, "--preview", ("vae", "approx", "taesd"))
    args.vae_decoder = decoder_argument(args.vae_decoder, "--vae-decoder", ("vae", "taesd"))
    if args.safety_checker is not None:
        if args.no_safety_checker:
            raise UsageError("give --safety-checker or --no-safety-checker, not both")
        if not args.safety_checker.is_dir():
            raise UsageError(f"safety checker not found: {args.safety_checker} is not a folder; give a diffusers "
                             "SD 1.x folder (with safety_checker/ and feature_extractor/) or its safety_checker/")


def check_sdxl_arguments(args) -> None:
    """SDXL's flags, read before torch: the pairs of numbers, the refiner's switch and score."""
    for flag in ("original_size", "crop", "target_size"):
        if getattr(args, flag) is not None:
            setattr(args, flag, number_pair(getattr(args, flag), "--" + flag.replace("_", "-"),
                                            "TOP,LEFT" if flag == "crop" else "H,W", allow_zero=flag == "crop"))
    if args.refiner_switch is not None:
        if args.refiner is None:
            raise UsageError("--refiner-switch needs --refiner: it says where the refiner takes over")
        if not 0 < args.refiner_switch < 1:
            raise UsageError(f"--refiner-switch must be a fraction in (0, 1), got {args.refiner_switch}")
    if args.aesthetic_score is not None and len(args.aesthetic_score) > 2:
        raise UsageError("--aesthetic-score takes one or two numbers: the prompt's score, and the negative "
                         "prompt's")
    if args.refiner is not None and args.mask is not None:
        raise UsageError("--refiner with --mask: inpaint with the base alone, then refine the result as an init image")


def number_pair(text: str, flag: str, form: str, allow_zero: bool = False) -> tuple[int, int]:
    """'A,B' -> (A, B), whole numbers, positive (or >= 0 where allowed)."""
    try:
        pair = tuple(int(part) for part in text.split(","))
    except ValueError:
        pair = ()
    smallest = 0 if allow_zero else 1
    if len(pair) != 2 or min(pair) < smallest:
        raise UsageError(f"{flag} takes {form}, two whole numbers {'>= 0' if allow_zero else '> 0'} in pixels, "
                         f"e.g. {'0,0' if allow_zero else '1024,1024'}; got {text!r}")
    return pair


def outpaint_borders(text: str) -> tuple[int, int, int, int]:
    """'LEFT,TOP,RIGHT,BOTTOM' -> four pixel counts, each a multiple of 8, not all 0."""
    try:
        borders = tuple(int(part) for part in text.split(","))
    except ValueError:
        borders = ()
    if len(borders) != 4:
        raise UsageError(f"--outpaint takes LEFT,TOP,RIGHT,BOTTOM in pixels, e.g. 0,0,64,0; got {text!r}")
    if any(b < 0 or b % 8 for b in borders) or not any(borders):
        raise UsageError(f"--outpaint borders must be multiples of 8, not negative and not all 0; got {text}")
    return borders


def lora_argument(text: str) -> tuple[Path, float]:
    """--lora PATH or PATH:MULTIPLIER -> (path, multiplier); a path that exists as written wins (C:\\ on Windows)."""
    path, _, multiplier = text.rpartition(":")
    if Path(text).is_file() or not path:
        path, multiplier = text, "1"
    value = lora_multiplier(multiplier)
    if value is None:
        raise UsageError(f"--lora {text}: the multiplier {multiplier!r} is not a number (write PATH:0.8)")
    if not Path(path).is_file():
        raise UsageError(f"LoRA file not found: {path}")
    return Path(path), value


def tagged_lora_files(args, prompts: list[str]) -> dict[str, Path]:
    """The file of each <lora:NAME> of the prompts, found in --lora-dir: {NAME: path}."""
    try:
        return {name: find_lora(name, args.lora_dir) for prompt in prompts for name, _ in lora_tags(prompt)}
    except ValueError as error:
        raise UsageError(str(error))


def images_in_run(args, prompts: list[str]) -> int:
    return args.n_iter * len(prompts) * args.n_samples


def main(argv: list[str] | None = None) -> int:
    format_warning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.parameters_from is not None:
            apply_parameters_from(args, typed_flags(parser, argv))
        prompts = check_arguments(args)
        return run(args, prompts)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # Let go of the interrupted run's frames now, so that its progress bar closes (and prints its last state)
        # before this line rather than at exit, after it.
        traceback.clear_frames(interrupt.__traceback__)
        print("interrupted: the images already saved are kept, nothing is half-written", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning


def run(args, prompts: list[str]) -> int:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from sd_scratch import samplers
    from sd_scratch.images import from_pil, grid, mask_from_pil, save_numbered, save_png, to_pil
    from sd_scratch.loading import CheckpointError, load_checkpoint
    from sd_scratch.lora import apply_loras
    from sd_scratch.sample import SpeedAndMemory, check_unet_input, generate

    try:  # steps, eta, karras: the sampler's own checks, before any weights are loaded
        plan = samplers.make_plan(args.sampler, args.steps, spacing=args.spacing, karras=args.karras,
                                  schedule_type=args.schedule, eta=args.eta)
        if args.init_image is not None:
            plan = samplers.img2img_plan(plan, args.strength or (0.8 if args.mask is None and args.outpaint is None
                                                                 else 1))
        if args.refiner is not None:
            samplers.split_plan(plan, args.refiner_switch or 0.8)
    except ValueError as error:
        raise UsageError(str(error))
    device = pick_device(args.device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes.get(args.dtype) or (torch.float32 if device.type == "cpu" else torch.float16)
    try:
        model = load_checkpoint(args.checkpoint, device=device, dtype=dtype, prediction_type=args.prediction_type,
                                vae=args.vae, low_memory=args.low_memory)
        check_unet_input(model, inpainting=args.mask is not None or args.outpaint is not None)
        samplers.make_plan(args.sampler, args.steps, spacing=args.spacing, karras=args.karras,
                           schedule_type=args.schedule, eta=args.eta, prediction_type=model.prediction_type,
                           schedule=model.schedule)
    except (CheckpointError, ValueError) as error:
        raise UsageError(str(error))
    init, mask = read_init_image_and_mask(args)  # PIL pictures, or None
    if mask is not None:  # inpainting keeps the picture's own size unless told otherwise
        height, width = args.height or init.size[1], args.width or init.size[0]
        try:
            check_size("height", height)
            check_size("width", width)
        except ValueError as error:
            raise UsageError(f"the init image{' with its borders' if args.outpaint else ''} is "
                             f"{init.size[0]}x{init.size[1]}: {error} (--width and --height resize it)")
    else:
        height, width = args.height or model.image_size, args.width or model.image_size
    if args.guidance is not None:
        guidance = args.guidance
    elif samplers.needs_unconditional(args.sampler):
        guidance = CFGPP_GUIDANCE
    else:
        guidance = model.defaults.get("guidance", DEFAULT_GUIDANCE)
    try:
        samplers.check_guidance(args.sampler, guidance)
    except ValueError as error:
        raise UsageError(f"--guidance: {error}")
    if not args.force:
        guided = guidance > 1 or samplers.needs_unconditional(args.sampler)
        check_memory(model, args.n_samples, height, width, guided, args.tiled_decode, device)
    refiner = read_refiner(args, model, device, dtype)
    preview, decoder = read_decoders(args, model, device, dtype)
    safety_checker = read_safety_checker(args, device, dtype)
    sizes = size_conditioning(args, model, refiner, height, width)
    skip = model.skip_last_layers if args.clip_skip is None else args.clip_skip
    layers = min(encoder.config.layers for _, encoder in model.text_encoders)
    if skip >= layers:
        raise UsageError(f"--clip-skip {skip} leaves no text encoder layer: it has {layers}")
    embeddings = read_embeddings(args, tuple(encoder.config.width for _, encoder in model.text_encoders))
    tagged = tagged_lora_files(args, prompts)
    loras = read_loras(model, [*(path for path, _ in args.lora), *tagged.values()])  # file -> its LoRA
    init_image = None if init is None else from_pil(init, width, height)
    soft_mask = None
    if mask is not None:
        if mask.size != (width, height):
            mask = mask.resize((width, height), resample=Image.LANCZOS)
        soft_mask = mask_from_pil(mask, args.mask_blur, args.invert_mask)

    jobs = [prompt for _ in range(args.n_iter) for prompt in prompts]  # one batch each; image i uses seed + i
    one_bar = len(jobs) > 1  # many batches: one bar over them, not one per batch
    made, grid_parameters, applied = [], None, None
    for job, prompt in enumerate(tqdm(jobs, desc="batches", disable=not one_bar)):
        wanted = [(loras[path], multiplier) for path, multiplier in args.lora]
        wanted += [(loras[tagged[name]], multiplier) for name, multiplier in lora_tags(prompt)]
        if applied is None or wanted != model.loras:  # the LoRAs of this batch merged in (kept for the next)
            if applied is not None:
                applied.remove()
            applied = apply_loras(model, wanted)
        # The last batch frees each network once it is done with it (nothing runs after it in this process).
        speed = SpeedAndMemory(args.attention_slices, args.tiled_decode, args.compile,
                               free_when_done=job == len(jobs) - 1)
        with warnings.catch_warnings():  # the safety checker's warning: said below, naming the file instead
            warnings.filterwarnings("ignore", message="the safety checker found")
            result = generate(model, [prompt] * args.n_samples, args.negative_prompt, steps=args.steps,
                              guidance=guidance, sampler=args.sampler, spacing=args.spacing, karras=args.karras,
                              schedule_type=args.schedule, eta=args.eta, seed=args.seed + job * args.n_samples,
                              height=height, width=width,
                              skip_last_layers=args.clip_skip, init_image=init_image, strength=args.strength,
                              mask=soft_mask, paste_back=args.paste_back, embeddings=embeddings, sizes=sizes,
                              refiner=refiner, refiner_switch=args.refiner_switch or 0.8,
                              preview_every=args.save_intermediates, preview=preview, decoder=decoder,
                              safety_checker=safety_checker, speed=speed, progress=not one_bar)
        for i, (image, parameters) in enumerate(zip(result.pil_images, result.parameters)):
            path = save_numbered(image, args.outdir, "sample", parameters)
            made.append(image)
            grid_parameters = grid_parameters or parameters  # the grid carries its first image's, as A1111's
            tqdm.write(str(path), file=sys.stdout)
            if i in result.flagged:
                tqdm.write(f"warning: the safety checker flagged {path.name} as potential NSFW content: it was saved "
                           "black; try another prompt or seed", file=sys.stderr)
            if result.previews:
                previews = [to_pil(preview[i:i + 1])[0] for preview in result.previews]
                if i in result.flagged:  # the checker saw only the final picture: the steps to it are not shown
                    previews = [Image.new("RGB", preview.size) for preview in previews]
                strip = grid(previews + [image], columns=len(result.previews) + 1)
                strip_parameters = f"{parameters}, Preview every: {args.save_intermediates} steps"
                if preview != "vae":
                    strip_parameters += f", Preview: {getattr(preview, 'name', preview)}"
                tqdm.write(str(save_png(strip, path.with_name(path.stem + "-steps.png"), strip_parameters)),
                           file=sys.stdout)
    if args.grid and len(made) > 1:
        print(save_numbered(grid(made, columns=args.n_samples), args.outdir, "grid", grid_parameters))
    applied.remove()
    return 0


def read_decoders(args, model, device, dtype):
    """What draws the previews and what decodes the final pictures: "vae", "approx" or a TAESD, loaded once if
    both name the same file, checked against the model's latents."""
    from sd_scratch.loading import CheckpointError
    from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT
    from sd_scratch.loading.taesd_file import TINY_TAESD, load_taesd

    loaded = {}

    def read(flag: str, kind: str, path: Path | None, dtype):
        if kind != "taesd":
            return kind
        if path is None:
            if Path(model.source).resolve() != DEFAULT_CHECKPOINT.resolve():
                raise UsageError(f"{flag} taesd needs the TAESD file for {Path(model.source).name}: e.g. {flag} taesd "
                                 "taesd_decoder.safetensors (taesdxl_decoder for SDXL), from github.com/madebyollin/"
                                 "taesd or the hub's madebyollin/taesd")
            path = TINY_TAESD  # the shipped tiny model's own TAESD
        if (path.resolve(), dtype) not in loaded:
            try:
                loaded[path.resolve(), dtype] = load_taesd(path, model.vae.config.latent_channels,
                                                           model.vae.config.downsampling_factor, device, dtype)
            except CheckpointError as error:
                raise UsageError(f"{flag}: {error}")
        return loaded[path.resolve(), dtype]

    return (read("--preview", *args.preview, preview_dtype(device, dtype)),
            read("--vae-decoder", *args.vae_decoder, dtype))


def preview_dtype(device, dtype):
    """The precision of TAESD previews: bfloat16 on a CPU that computes it natively (AVX-512 BF16 or AMX), where a
    512x512 preview takes 0.38 s against float32's 1.04 s, and differs from it by at most 0.0025 on the [0, 1]
    scale (benchmarks/results/taesd_preview.md); elsewhere the model's. The final picture keeps the model's."""
    import torch

    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 and native_bf16 else dtype


def read_safety_checker(args, device, dtype):
    """The safety checker of --safety-checker, or of the checkpoint's folder when it has one (unless
    --no-safety-checker), or None."""
    from sd_scratch.loading import CheckpointError
    from sd_scratch.loading.safety_checker_file import load_safety_checker

    path = args.safety_checker
    folder = Path(args.checkpoint) if args.checkpoint is not None else None
    if path is None and not args.no_safety_checker and folder is not None and (folder / "safety_checker").is_dir():
        path = folder
    if path is None:
        return None
    try:
        return load_safety_checker(path, device, dtype)
    except CheckpointError as error:
        turn_off = "" if args.safety_checker is not None else " (or run without it: --no-safety-checker)"
        raise UsageError(f"safety checker: {error}{turn_off}")


def read_refiner(args, model, device, dtype):
    """The SDXL refiner of --refiner, loaded and checked against the base, or None."""
    if args.refiner is None:
        return None
    from sd_scratch.loading import CheckpointError, load_checkpoint
    from sd_scratch.sample import check_refiner

    try:
        refiner = load_checkpoint(args.refiner, device=device, dtype=dtype, low_memory=args.low_memory)
        check_refiner(model, refiner, inpainting=False)
    except (CheckpointError, ValueError) as error:
        raise UsageError(f"--refiner: {error}")
    return refiner


def size_conditioning(args, model, refiner, height: int, width: int):
    """SDXL's SizeConditioning from --original-size, --crop, --target-size, --aesthetic-score (None: the
    defaults); each flag refused, in one line, where no model of the run reads it."""
    from sd_scratch.conditioning import SizeConditioning

    given = [flag for flag in ("original_size", "crop", "target_size", "aesthetic_score")
             if getattr(args, flag) is not None]
    if not given:
        return None
    if not model.is_sdxl:
        raise UsageError(f"--{given[0].replace('_', '-')} is SDXL's size conditioning; {Path(model.source).name} is "
                         f"{model.kind}, whose UNet takes no sizes")
    reads_score = refiner is not None or model.is_refiner  # the refiner's vector holds the score
    if args.aesthetic_score is not None and not reads_score:
        raise UsageError("--aesthetic-score is read by the SDXL refiner only: give --refiner too (the base "
                         "conditions on the target size instead)")
    if args.target_size is not None and model.is_refiner:
        raise UsageError("--target-size is read by the SDXL base only; the refiner conditions on the aesthetic "
                         "score instead (--aesthetic-score)")
    sizes = SizeConditioning.for_size(height, width)
    scores = args.aesthetic_score or [sizes.aesthetic_score]
    return SizeConditioning(original_size=args.original_size or sizes.original_size,
                            target_size=args.target_size or sizes.target_size, crop=args.crop or sizes.crop,
                            aesthetic_score=scores[0],
                            negative_aesthetic_score=scores[1] if len(scores) > 1 else sizes.negative_aesthetic_score)


def read_loras(model, paths: list[Path]) -> dict:
    """Every LoRA file of the run (--lora and the prompts' tags), read once for this model: {path: Lora}."""
    from sd_scratch.lora import LoraError, load_lora
    try:
        return {path: load_lora(path, model) for path in dict.fromkeys(paths)}
    except LoraError as error:
        raise UsageError(str(error))


def read_init_image_and_mask(args):
    """The init image and the mask as PIL pictures (None when not given); --outpaint makes both."""
    from PIL import Image

    from sd_scratch.images import extend_for_outpainting

    if args.init_image is None:
        return None, None
    with Image.open(args.init_image) as image:
        init = image.copy()
    if args.outpaint is not None:
        return extend_for_outpainting(init, *args.outpaint)
    if args.mask is None:
        return init, None
    with Image.open(args.mask) as mask:
        return init, mask.copy()


def read_embeddings(args, width: tuple[int, ...]) -> list:
    """The textual-inversion embeddings of --embedding and --embeddings-dir, checked against the text encoders'
    widths (one per encoder: SDXL's embeddings hold vectors for both)."""
    from sd_scratch.loading.embeddings import EmbeddingError, load_embedding, load_embeddings_dir

    try:
        embeddings = [load_embedding(path, width) for path in args.embedding]
        if args.embeddings_dir is not None:
            embeddings += load_embeddings_dir(args.embeddings_dir, width)
    except EmbeddingError as error:
        raise UsageError(str(error))
    names = [e.name for e in embeddings]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"two embedding files are called {', '.join(twice)}: a prompt word can call only one")
    return embeddings


def pick_device(name: str):
    """The torch device `name` asks for, if this torch can use it; "auto": cuda, then mps, then cpu."""
    import torch

    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    available = ["cpu", *(["cuda"] if cuda else []), *cuda, *mps]
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; this torch can use: {', '.join(available)}") from None
    if str(device) not in available and not (device.type == "cuda" and device.index is None and cuda):
        raise UsageError(f"--device {name} is not available here; this torch can use: {', '.join(available)}")
    return device


def check_memory(model, batch: int, height: int, width: int, guided: bool, tiled_decode: bool, device) -> None:
    """Refuse, before anything is allocated, a size whose activations alone need more memory than is free."""
    from sd_scratch.memory import available_memory, gigabytes, largest_fitting_size, memory_floor

    available = available_memory(device)
    floor = memory_floor(model, batch, height, width, guided, tiled_decode)
    if available is None or floor.largest <= available:
        return
    advice = []
    if not tiled_decode and memory_floor(model, batch, height, width, guided, True).largest <= available:
        advice.append("add --tiled-decode, which decodes in tiles")
    # The floor leaves out much (the weights, the allocator's slack): suggest sizes whose floor is half of what is free.
    fitting = largest_fitting_size(model, batch, height, width, guided, tiled_decode, available // 2)
    if fitting:
        advice.append(f"try {fitting[1]}x{fitting[0]} or smaller")
    if batch > 1:
        advice.append("make fewer images per batch (--n-samples)")
    raise UsageError(
        f"a batch of {batch} {width}x{height} image(s) needs at least {gigabytes(floor.unet)} for the UNet's "
        f"activations and {gigabytes(floor.decode)} to decode ({model.dtype}, {device}), and "
        f"{gigabytes(available)} are available: {', or '.join(advice) or 'it cannot fit'} (--force runs anyway)"
    )


if __name__ == "__main__":
    sys.exit(main())
