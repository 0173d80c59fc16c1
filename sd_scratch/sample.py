"""Prompt -> picture: the whole Stable Diffusion loop on one screen, and its Python API.

    python -m sd_scratch.sample --prompt "a red circle on a blue background"   (the command line: cli.py)

`generate` below is the loop of the walkthroughs, in their order: tokenize and encode the prompt
and the negative prompt, make the initial noise from the seed, then for every timestep scale the
input, run the UNet once on the [uncond, cond] batch, apply classifier-free guidance, take the
sampler's step; finally undo the latent scaling, decode with the VAE and make PIL images.

Seeds mean the same everywhere: image i of a run starts from
`torch.randn((1, C, H/f, W/f), generator=torch.Generator("cpu").manual_seed(seed + i))`, drawn on
the CPU and moved to the device afterwards (C is the VAE's latent channels, f its downsampling
factor: 4 and 8 in SD). So a seed gives the same picture on CPU, CUDA and MPS, image i of a batch
equals a single run with seed + i, and diffusers given the same list of CPU generators makes the
same picture. Samplers that draw noise during the loop (euler_a, ddim with eta > 0) draw it from
that image's generator too.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m sd_scratch.sample: the command line (cli.py), before torch is imported,
    import sys  # so that --help and mistakes are answered at once

    from sd_scratch.cli import main

    sys.exit(main())

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sd_scratch import samplers
from sd_scratch.checks import check_seeds, check_size, finite
from sd_scratch.conditioning import SizeConditioning, schedule_conditioning
from sd_scratch.images import binarise, parameters_text, save_png, to_pil
from sd_scratch.images import paste_back as paste_images_back
from sd_scratch.loading import StableDiffusion, release_weights
from sd_scratch.loading.embeddings import Embedding
from sd_scratch.loading.tensor_file import free_weights, weights_freed
from sd_scratch.memory import freed_tensors_kept
from sd_scratch.preview import latent_to_rgb_for
from sd_scratch.prompts import lora_tags
from sd_scratch.quantize import is_quantized
from sd_scratch.safety_checker import SafetyChecker, black_out, blacked_out_message
from sd_scratch.vae import decode_tiled


@dataclass(frozen=True)
class SpeedAndMemory:
    """Options that change how fast the loop runs or how much memory it takes, never the loop itself.

    attention_slices: > 1 computes attention a slice of queries at a time (`UNet.set_attention_slices`).
    tiled_decode: decode in overlapping tiles (`vae.py`'s `decode_tiled`), for images too large to decode at once.
    compile_unet: run the UNet through torch.compile (a slow first step, then faster ones).
    free_when_done: the last run of this model in the process: each network's weights are freed for good once
        the run is done with it (the text encoders after the prompts, the UNet after the loop), copies included,
        which the usual release (file pages only) cannot hand back. Weights cast from an fp16 file are copies:
        this keeps a full-size SDXL run from holding 14 GB through its decode. The model cannot run again.
    keep_freed_tensors: on the CPU with glibc, the loop's freed tensors stay in malloc's heap for the next step
        instead of going back to the OS and being faulted in again (memory.freed_tensors_kept).
    """

    attention_slices: int = 1
    tiled_decode: bool = False
    compile_unet: bool = False
    free_when_done: bool = False
    keep_freed_tensors: bool = True


@dataclass
class Generation:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    pil_images: list[Image.Image]  # the same, 8 bits per channel, ready to show or save
    parameters: list[str]  # each image's prompt and settings, as image browsers read them (images.parameters_text)
    previews: list[torch.Tensor] = field(default_factory=list)  # (B, 3, H, W) predicted clean images along the way
    flagged: list[int] = field(default_factory=list)  # the images the safety checker blacked out (by index)

    def save(self, i: int, path: str | Path) -> Path:
        """Image i as a PNG carrying its parameters; an existing file is never overwritten."""
        return save_png(self.pil_images[i], Path(path), self.parameters[i])


def latent_shape(model: StableDiffusion, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of one image's latents: the VAE's latent channels at 1/f of the size. Not the UNet's
    input channels, which an inpainting UNet widens to 9 with the mask and the masked image's latents."""
    factor = model.vae.config.downsampling_factor  # pixels per latent, 8 for SD
    return model.vae.config.latent_channels, height // factor, width // factor


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """One (1, C, h, w) float32 draw per image from its own CPU generator, then moved to the device."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device)


def classifier_free_guidance(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Push the prediction away from the unconditional one, towards (and past) the prompt's.
    scale = 1 is the prompt's own prediction; SD's usual 7.5 exaggerates the difference."""
    return noise_uncond + scale * (noise_cond - noise_uncond)


def latents_to_images(model: StableDiffusion, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Undo the latent scaling (SD 1.x/2.x: latents = 0.18215 * z), decode, map [-1, 1] to [0, 1].

    tiled: decode in overlapping tiles (`vae.py`'s `decode_tiled`), for images too large to decode at once.
    A half-precision VAE can overflow to NaN on some images (a known weakness of SD's VAE in fp16);
    rather than save a black picture, we move the VAE to fp32 once and decode again.
    """
    vae = model.vae
    decode = (lambda z: decode_tiled(vae, z)) if tiled else vae.decode
    images = decode((latents / vae.config.scaling_factor).to(vae.post_quant_conv.weight.dtype))
    if not torch.isfinite(images).all() and images.dtype != torch.float32:
        warnings.warn("the half-precision VAE decode gave NaN or inf: the VAE now runs in float32", stacklevel=2)
        vae.float()
        images = decode((latents / vae.config.scaling_factor).float())
    return (images.float() / 2 + 0.5).clamp(0, 1)


def decode_with(model: StableDiffusion, latents: torch.Tensor, decoder="vae", tiled: bool = False) -> torch.Tensor:
    """Latents -> (B, 3, H, W) in [0, 1] by the VAE ("vae"), the family's linear map ("approx": a preview's, too
    coarse for a final picture), or a TAESD network (taesd.py: anything with images_from_latents, which takes the
    scaled latents and gives [-1, 1] as the VAE does)."""
    if decoder == "vae":
        return latents_to_images(model, latents, tiled)
    if decoder == "approx":
        return latent_to_rgb_for(model)(latents, model.vae.config.downsampling_factor)
    weight = next(decoder.parameters())
    images = decoder.images_from_latents(latents.to(weight.device, weight.dtype))
    return (images.float() / 2 + 0.5).clamp(0, 1).to(latents.device)


def images_to_latents(model: StableDiffusion, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Image-to-image's start: encode each image, sample its posterior with that image's generator (float32)."""
    vae = model.vae
    images = images.to(vae.quant_conv.weight.device, vae.quant_conv.weight.dtype).expand(len(generators), -1, -1, -1)
    return torch.cat([vae.latents_from_images(images[i:i + 1], generator=g) for i, g in enumerate(generators)]).float()


@torch.inference_mode()
def generate(model: StableDiffusion, prompts: str | list[str], negative_prompt: str = "", *, steps: int = 25,
             guidance: float = 7.5, sampler: str = "euler", spacing: str | None = None, karras: bool = False,
             schedule_type: str | None = None, eta: float | None = None, seed: int = 0, height: int | None = None,
             width: int | None = None, skip_last_layers: int | None = None, init_image: torch.Tensor | None = None,
             strength: float | None = None, mask: torch.Tensor | None = None, paste_back: bool = False,
             embeddings: list[Embedding] = (), sizes: SizeConditioning | None = None,
             refiner: StableDiffusion | None = None, refiner_switch: float = 0.8, preview_every: int = 0,
             preview="vae", on_preview: Callable[[int, torch.Tensor], None] | None = None, decoder="vae",
             safety_checker: SafetyChecker | None = None, speed: SpeedAndMemory = SpeedAndMemory(),
             progress: bool = True) -> Generation:
    """Images for `prompts` (one image per prompt; image i uses seed + i).

    Prompts are read in AUTOMATIC1111's syntax: (emphasis:1.2), [less], BREAK, any length, prompt editing
    [from:to:when] and [a|b], and the names of `embeddings` (textual inversion, `loading.load_embedding`).

    spacing: how the steps spread over the training timesteps (None: the model's, "leading" for SD).
    schedule_type: how the noise levels are placed (schedule.SCHEDULE_TYPES); karras=True is "karras".
    eta: noise added back at each step; None means the sampler's usual value (euler_a: 1, ddim: 0).
    skip_last_layers: "CLIP skip", text encoder layers not run (None: the model's own).
    init_image: (B or 1, 3, H, W) in [-1, 1] for image-to-image, noised to `strength` (default 0.8; with a
        mask 1: start from pure noise).
    mask: inpainting, (B or 1, 1, H, W) in [0, 1], 1 = repaint, the init image kept elsewhere: `images.mask_from_pil`.
        An inpainting checkpoint (9 UNet input channels) sees it; an ordinary one has the kept region put back
        after every step. paste_back: put the original pixels back outside the mask (blended by the mask).
    sizes: SDXL's size (and the refiner's aesthetic) conditioning; None: SizeConditioning.for_size(height, width).
    refiner: an SDXL refiner that takes the latents over for the steps after `refiner_switch` of the way (0.8: the
        last 20% of the noise levels), with its own conditioning (samplers.split_plan).
    preview_every: if > 0, also make a picture of the predicted clean image every that many UNet calls, by
        `preview`: "vae" (the full decode), "approx" (a linear map of the latent channels, preview.py: under a
        millisecond) or a TAESD network (taesd.py); `on_preview(call, images)` is called with each, e.g. by a
        notebook that shows the picture forming.
    decoder: what makes the final picture: "vae", or a TAESD (faster, coarser: for drafts).
    safety_checker: if given (loading.safety_checker_file.load_safety_checker), images it flags are blacked out,
        with a warning, as diffusers' SD 1.x pipelines do; `Generation.flagged` and their parameters say which.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_lora_tags(model, prompts)
    height, width = image_size(model, init_image, height, width)
    strength = (0.8 if mask is None else 1.0) if strength is None else strength
    inpainting = check_inpainting(model, init_image, mask, height, width)
    if inpainting and not binarise(mask).any():
        warnings.warn("the mask is black everywhere: nothing to repaint, the init image is returned", stacklevel=2)
        return unchanged(model, prompts, negative_prompt, seed, init_image, steps, guidance, sampler, strength)
    check_seeds(seed, len(prompts))
    finite("guidance", guidance)
    samplers.check_guidance(sampler, guidance)
    # At guidance 1 the unconditional half would cancel out: skip it, as diffusers does (unless the sampler
    # re-noises with it: CFG++).
    guided = guidance > 1 or samplers.needs_unconditional(sampler)
    experts = check_refiner(model, refiner, inpainting)  # the model, or SDXL's base then its refiner
    unets = [prepare_unet(expert, speed, inpainting) for expert in experts]

    # 1. Text -> conditioning, for the prompt and for the negative prompt that guidance steers away from,
    #    [uncond, cond] in one batch so that one UNet call serves both halves; prompt editing gives one
    #    conditioning for each stretch of steps where the prompts stay the same. SDXL adds its size vector.
    sizes = sizes or SizeConditioning.for_size(height, width)
    schedules = [schedule_conditioning(expert, prompts, negative_prompt, steps, guided=guided, sizes=sizes,
                                       skip_last_layers=skip_last_layers, embeddings=embeddings).to(expert.dtype)
                 for expert in experts]
    for _, encoder in (pair for expert in experts for pair in expert.text_encoders):
        release(encoder, speed)  # done with it: weights still in the file need no memory now

    # 2. The sampler's walk down the noise levels (with a refiner: cut in two, the base's part first)
    plan = samplers.make_plan(sampler, steps, spacing=spacing, karras=karras, schedule_type=schedule_type, eta=eta,
                              prediction_type=model.prediction_type, schedule=model.schedule)

    # 3. The starting latents: pure noise, or the encoded image noised to the strength's level. Each image draws
    #    from its own generator in diffusers' order: the image's latent, the noise, the masked image's latent.
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    pure_noise = init_image is None or (inpainting and strength == 1)  # inpainting at strength 1 ignores the image
    if init_image is not None:
        plan = samplers.img2img_plan(plan, strength)
        if not (pure_noise and inpainting_unet(model)):  # (diffusers encodes it only where it will be used)
            clean = images_to_latents(model, init_image, generators)
    noise = initial_noise(generators, latent_shape(model, height, width), model.device)
    latents = noise * plan.init_noise_sigma if pure_noise else samplers.add_noise(plan, clean, noise)
    latents = latents.to(model.dtype)
    if inpainting:  # the mask at latent size, 1 = repaint, and the latents of the picture with the hole made grey
        repaint, hole_latents = mask_latents(model, mask, init_image, generators, latents.shape[-2:])
    release(model.vae.encoder, speed)  # done with the encoder (or never needed it), as with the text encoder above
    # Inpainting: an inpainting UNet sees the mask; an ordinary one has the kept region put back after each step
    sees_mask, puts_back = inpainting and inpainting_unet(model), inpainting and not inpainting_unet(model)
    plans = [plan] if refiner is None else samplers.split_plan(plan, refiner_switch)

    # 4. The denoising loop; with SDXL's refiner twice: the base's steps, then the refiner's (its UNet, its
    #    conditioning, the sampler's history started afresh)
    previews = []
    with freed_tensors_kept(model.device, speed.keep_freed_tensors):  # the same sizes every step: reused
        for expert, unet, conditionings, plan in zip(experts, unets, schedules, plans):
            latents, state = latents.to(expert.device, expert.dtype), samplers.initial_state(plan)
            for i, t in enumerate(tqdm(plan.timesteps, disable=not progress, desc=sampler)):
                conditioning = conditionings.at(samplers.step_of_call(plan, i))  # prompt editing: this step's prompt
                model_input = samplers.scale_model_input(plan, i, latents)
                if sees_mask:  # the inpainting UNet's input: the latents, the mask, the latents of the holed picture
                    model_input = torch.cat([model_input, repaint, hole_latents], dim=1)
                if guided:
                    model_input = torch.cat([model_input] * 2)  # (2B, C, h, w): the uncond and cond halves
                    noise_uncond, noise_cond = unet(model_input, t, conditioning.context, conditioning.vector).chunk(2)
                    noise_pred = classifier_free_guidance(noise_uncond, noise_cond, guidance)
                else:
                    noise_uncond, noise_pred = None, unet(model_input, t, conditioning.context, conditioning.vector)
                if preview_every and (i + 1) % preview_every == 0:
                    x0 = samplers.predicted_x0(plan, i, latents, noise_pred)
                    previews.append(decode_with(expert, x0, preview, speed.tiled_decode))
                    if on_preview is not None:
                        on_preview(i, previews[-1])  # e.g. a notebook's live view
                latents, state = samplers.step(plan, i, latents, noise_pred, state, generators, noise_uncond)
                if puts_back:  # what is kept, put back at the noise level of the next call (clean after the last)
                    kept = samplers.add_noise(plan, clean, noise, i + 1).to(latents.dtype)
                    latents = (1 - repaint) * kept + repaint * latents
            release(expert.unet, speed)

    # 5. Latents -> pixels -> PIL images, by the VAE of the model that took the last step (or a TAESD)
    images = decode_with(expert, latents, decoder, speed.tiled_decode)
    if paste_back:  # the original pixels outside the (soft) mask, as AUTOMATIC1111 does by default
        images = paste_images_back(init_image / 2 + 0.5, images, mask)
    flagged = []
    if safety_checker is not None:  # what the checker flags is made black, as diffusers' pipelines do
        images, flagged = black_out(images, safety_checker.check(images))
        if flagged:
            warnings.warn(blacked_out_message(flagged, len(images)), stacklevel=3)
    used = {name for schedule in schedules for name in schedule.embeddings_used}
    settings = dict(steps=steps, guidance=guidance, sampler=sampler, spacing=spacing, schedule_type=plan.schedule_type,
                    eta=eta, height=height, width=width, skip_last_layers=skip_last_layers,
                    strength=None if init_image is None else strength, paste_back=paste_back,
                    embeddings=[e for e in embeddings if e.name in used], sizes=sizes if model.is_sdxl else None,
                    refiner=refiner, refiner_switch=refiner_switch, decoder=decoder, flagged=flagged)
    parameters = describe(model, prompts, negative_prompt, seed, **settings)
    return Generation(images, to_pil(images), parameters, previews, flagged)


# The schedule types as AUTOMATIC1111's "Schedule type" field names them ("spaced", the default, is left out).
SCHEDULE_LABELS = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "sgm_uniform": "SGM Uniform",
                   "ays": "Align Your Steps"}


def describe(model: StableDiffusion, prompts: list[str], negative_prompt: str, seed: int, *, steps, guidance,
             sampler, spacing, schedule_type, eta, height, width, skip_last_layers, strength,
             paste_back=False, embeddings=(), sizes: SizeConditioning | None = None,
             refiner: StableDiffusion | None = None, refiner_switch: float = 0.8, decoder="vae",
             flagged: list[int] = ()) -> list[str]:
    """Each image's `parameters` text: its prompt and what made it, in AUTOMATIC1111's names."""
    skip = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    settings = {"Steps": steps, "Sampler": samplers.SAMPLERS[sampler].label}
    if schedule_type in SCHEDULE_LABELS:
        settings["Schedule type"] = SCHEDULE_LABELS[schedule_type]
    settings |= {"CFG scale": guidance, "Seed": None, "Size": f"{width}x{height}", "Model": Path(model.source).stem}
    if model.vae_file:  # a VAE of its own file (--vae), named as A1111 names it
        settings |= {"VAE hash": model.vae_file[1], "VAE": model.vae_file[0]}
    if skip or model.skip_last_layers:  # so that reading it back restores it, also for a model that skips by itself
        settings["Clip skip"] = skip + 1  # the web UIs count the last layer as 1
    if strength is not None:
        settings["Denoising strength"] = strength
    if paste_back:
        settings["Paste back"] = True  # not an A1111 field (it pastes back unless told otherwise)
    if eta is not None:
        settings["Eta"] = eta
    if spacing is not None:
        settings["Spacing"] = spacing  # not an A1111 field: diffusers' timestep_spacing
    if refiner is not None:  # A1111's fields for its SDXL refiner
        settings |= {"Refiner": Path(refiner.source).stem, "Refiner switch at": refiner_switch}
    if sizes is not None:  # SDXL's size conditioning where it is not the default (A1111 writes none of these)
        settings |= sdxl_size_fields(sizes, height, width, refiner is not None or model.is_refiner)
    if embeddings:  # which embedding files the prompts used, by name and short hash, as A1111 writes them
        settings["TI hashes"] = file_hashes(embeddings)
    if model.loras:  # the LoRAs merged into the weights, likewise (the prompt keeps their <lora:...> tags)
        settings["Lora hashes"] = file_hashes(lora for lora, _ in model.loras)
    if is_quantized(model.unet):  # not an A1111 field: the UNet and text encoders computed with 8-bit weights
        settings["Weights"] = "8-bit"
    if decoder != "vae":  # not an A1111 field: the final picture was decoded by a TAESD (or the linear map)
        settings["Decoder"] = getattr(decoder, "name", decoder)
    texts = []
    for i, prompt in enumerate(prompts):
        fields = {**settings, "Seed": seed + i}
        if i in flagged:  # not an A1111 field: this picture is black on purpose
            fields["Safety checker"] = "blacked out"
        texts.append(parameters_text(prompt, negative_prompt, fields))
    return texts


def sdxl_size_fields(sizes: SizeConditioning, height: int, width: int, aesthetic: bool) -> dict:
    """The PNG fields of SDXL's size conditioning that differ from the defaults (SizeConditioning.for_size), sizes
    written width x height as "Size" is; the aesthetic scores only where a refiner read them."""
    default, fields = SizeConditioning.for_size(height, width), {}
    if sizes.original_size != default.original_size:
        fields["Original size"] = f"{sizes.original_size[1]}x{sizes.original_size[0]}"
    if sizes.crop != default.crop:
        fields |= {"Crop top": sizes.crop[0], "Crop left": sizes.crop[1]}
    if sizes.target_size != default.target_size:
        fields["Target size"] = f"{sizes.target_size[1]}x{sizes.target_size[0]}"
    scores = (sizes.aesthetic_score, sizes.negative_aesthetic_score)
    if aesthetic and scores != (default.aesthetic_score, default.negative_aesthetic_score):
        fields |= {"Aesthetic score": scores[0], "Negative aesthetic score": scores[1]}
    return fields


def file_hashes(files) -> str:
    """"name: hash, name: hash" of embeddings or LoRAs, as A1111 writes them (a name loses its ':' and ',',
    which would break the list)."""
    return ", ".join(f"{file.name.replace(':', '').replace(',', '')}: {file.short_hash}" for file in files)


def check_lora_tags(model: StableDiffusion, prompts: list[str]) -> None:
    """Warn about <lora:NAME:M> tags naming LoRAs that are not applied: the text encoder never sees the tags,
    so they do nothing by themselves (the command line applies them; in Python, `lora.apply_loras`)."""
    applied = {(lora.name, multiplier) for lora, multiplier in model.loras}
    missing = {tag for prompt in prompts for tag in lora_tags(prompt)} - applied
    if missing:
        warnings.warn(f"the prompts name {', '.join(f'<lora:{n}:{m:g}>' for n, m in sorted(missing))}, which "
                      "is not applied to the model (lora.apply_loras): it has no effect", stacklevel=3)


def image_size(model: StableDiffusion, init_image, height: int | None, width: int | None) -> tuple[int, int]:
    """The (height, width) to make: as asked, else the init image's, else the model's; multiples of 8."""
    default_height, default_width = init_image.shape[-2:] if init_image is not None else (model.image_size,) * 2
    height, width = height or default_height, width or default_width
    check_size("height", height)
    check_size("width", width)
    return height, width


def inpainting_unet(model: StableDiffusion) -> bool:
    """Whether the UNet takes the mask and the masked image's latents beside the latents (9 channels, not 4)."""
    return model.unet.config.in_channels == 2 * model.vae.config.latent_channels + 1


def check_unet_input(model: StableDiffusion, inpainting: bool = False) -> None:
    """Refuse a UNet that wants channels the run has not got: an inpainting UNet needs a mask."""
    channels, latent = model.unet.config.in_channels, model.vae.config.latent_channels
    if inpainting_unet(model) and not inpainting:
        raise ValueError(f"this is an inpainting checkpoint (its UNet takes {channels} channels: latents, mask and "
                         "masked image): give it an init image and a mask (--init-image, --mask)")
    if channels not in (latent, 2 * latent + 1):
        raise ValueError(f"a UNet of {channels} input channels beside a VAE of {latent} latent channels: "
                         "neither a text-to-image nor an inpainting model")


def check_inpainting(model: StableDiffusion, init_image, mask, height: int, width: int) -> bool:
    """Whether this run inpaints; a mask needs an init image of its size."""
    if mask is None:
        return False
    if init_image is None:
        raise ValueError("a mask needs an init image: the picture whose masked part is repainted")
    if tuple(mask.shape[-2:]) != (height, width) or tuple(init_image.shape[-2:]) != (height, width):
        raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} and the image "
                         f"{init_image.shape[-1]}x{init_image.shape[-2]}: they must be the size of the output, "
                         f"{width}x{height}")
    return True


def mask_latents(model: StableDiffusion, mask: torch.Tensor, init_image: torch.Tensor,
                 generators: list[torch.Generator], size) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask at latent size (binarised, then nearest-neighbour, as diffusers' prepare_mask_latents) and the
    latents of the init image with the repainted region set to 0, grey on the [-1, 1] scale (one draw each)."""
    binary = binarise(mask.float())
    repaint = F.interpolate(binary, size=tuple(size)).to(model.device, model.dtype)
    hole_latents = images_to_latents(model, init_image * (binary < 0.5), generators)
    batch = len(generators)
    return repaint.expand(batch, -1, -1, -1), hole_latents.to(model.dtype)


def unchanged(model: StableDiffusion, prompts, negative_prompt, seed, init_image, steps, guidance, sampler,
              strength) -> Generation:
    """A run with nothing to repaint: the init image itself, for every prompt."""
    images = (init_image.float().cpu() / 2 + 0.5).clamp(0, 1).expand(len(prompts), -1, -1, -1)
    height, width = images.shape[-2:]
    settings = dict(steps=steps, guidance=guidance, sampler=sampler, spacing=None, schedule_type=None, eta=None,
                    height=height, width=width, skip_last_layers=None, strength=strength)
    return Generation(images, to_pil(images), describe(model, prompts, negative_prompt, seed, **settings))


def check_refiner(model: StableDiffusion, refiner: StableDiffusion | None, inpainting: bool) -> list[StableDiffusion]:
    """The models that take turns in the loop: [model], or [SDXL base, SDXL refiner]."""
    if refiner is None:
        return [model]
    if not refiner.is_refiner:
        raise ValueError(f"the refiner must be an SDXL refiner (its text encoder OpenCLIP bigG alone); "
                         f"{refiner.source} is {refiner.kind}")
    if not model.is_sdxl or model.is_refiner:
        raise ValueError(f"a refiner follows an SDXL base model; {model.source} is {model.kind}")
    if inpainting:
        raise ValueError("inpainting with a refiner is not supported: inpaint with the base alone, then refine "
                         "the result as an init image")
    if refiner.schedule != model.schedule or refiner.prediction_type != model.prediction_type:
        raise ValueError("the refiner was trained on another noise schedule than the base: they cannot share a plan")
    return [model, refiner]


def release(network, speed: SpeedAndMemory) -> None:
    """Hand back the memory of a network the run is done with: its file pages (they are read again if needed),
    or, on the run that is the model's last (speed.free_when_done), all of its weights."""
    release_weights(network)
    if speed.free_when_done:
        free_weights(network)


def prepare_unet(model: StableDiffusion, speed: SpeedAndMemory, inpainting: bool = False):
    """The UNet as the loop calls it: with the attention slicing asked for, compiled if asked."""
    networks = [model.unet, model.vae, *(encoder for _, encoder in model.text_encoders)]
    if any(weights_freed(network) for network in networks):
        raise ValueError(f"the weights of {Path(model.source).name} were freed by a run with "
                         "SpeedAndMemory(free_when_done=True): load the checkpoint again")
    check_unet_input(model, inpainting)
    model.unet.set_attention_slices(speed.attention_slices)
    return torch.compile(model.unet) if speed.compile_unet else model.unet
