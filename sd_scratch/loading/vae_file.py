"""A VAE from a file of its own, in place of the checkpoint's: `--vae vae-ft-mse-840000-ema-pruned.safetensors`.

    model = load_checkpoint("weights/v1-5-pruned-emaonly.safetensors", vae="weights/sd-vae-ft-mse")
    replace_vae(model, "weights/vae-ft-mse-840000-ema-pruned.safetensors")   # or on a loaded model

Fine-tuned VAEs are published on their own, in either layout:

    original   the VAE's keys of a single file (`encoder.down.0.block.0.conv1.weight`), with or without the
               single file's `first_stage_model.` prefix; .safetensors, or a .ckpt pickle (read weights-only)
    diffusers  a folder like stabilityai/sd-vae-ft-mse or a model's vae/ (config.json beside
               diffusion_pytorch_model[.fp16].safetensors), or that weights file alone

The config is read off the tensors' shapes as for a whole checkpoint (configs.py). The scaling factor is
in no tensor: a folder's config.json names it; otherwise the model keeps its own (0.18215 for SD 1.x/2.x).
Loading is strict as everywhere: every tensor is used and every parameter filled, the gaps named. Skipped
on purpose, and only these, as AUTOMATIC1111 skips them: what the VAE's training leaves in the .ckpt
releases and inference never reads, `loss.*` (the LPIPS network and discriminator of its training loss)
and the EMA's two counters `model_ema.decay` and `model_ema.num_updates`. Any other `model_ema.*` tensor
(a copy of the weights) is refused by name rather than quietly left out.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from sd_scratch.loading.configs import infer_vae_config, meta_tensors
from sd_scratch.loading.diffusers_folder import (
    _read_json,
    _weights_file,
    diffusers_vae_names,
)
from sd_scratch.loading.embeddings import short_hash
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.single_file import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from sd_scratch.loading.strict import build_empty, fill_strictly, list_keys
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.vae import VAE, VAEConfig

VAE_HASH_LENGTH = 10  # A1111's "VAE hash": the first 10 hex digits of the file's sha256
IGNORED_VAE_KEYS = re.compile(r"^(loss\.|model_ema\.(decay|num_updates)$)")  # (after `first_stage_model.`)
WHAT_TO_GIVE = ("give a VAE file (original or diffusers layout, e.g. vae-ft-mse-840000-ema-pruned.safetensors) "
                "or a diffusers VAE folder")


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             scaling_factor: float | None = None) -> VAE:
    """The VAE of `path` (a file in either layout, or a diffusers VAE folder), filled strictly.

    scaling_factor: the factor to use when the file names none (only a folder's config.json does);
    default SD 1.x/2.x's 0.18215.
    """
    weights = vae_weights_file(path, dtype)
    file = TensorFile(weights)
    layout, names = vae_key_names(file.keys, weights)
    try:
        config = infer_vae_config(meta_tensors({ours: file.shape(theirs) for ours, theirs in names.items()}))
    except KeyError as error:
        raise CheckpointError(f"{weights} holds no {layout}-layout VAE tensor {error.args[0]} (under the original "
                              f"layout's name): the file is incomplete or not a Stable Diffusion VAE") from None
    said = _read_json(Path(path) / "config.json").get("scaling_factor") if Path(path).is_dir() else None
    config = dataclasses.replace(config, scaling_factor=said or scaling_factor or VAEConfig.scaling_factor)
    loaders = {ours: (lambda theirs=theirs: file.get(theirs, device, dtype)) for ours, theirs in names.items()}
    return fill_strictly(build_empty(VAE, config), "VAE", loaders, device, dtype, str(weights), f"{layout} VAE",
                         question="is this a Stable Diffusion 1.x/2.x or SDXL VAE?")


def replace_vae(model: StableDiffusion, path: str | Path) -> None:
    """Decode and encode with the VAE of `path` in place of `model`'s own, on its device and in its dtype.

    The VAE must work on the UNet's latents: as many channels, the same downsampling. The model keeps its
    scaling factor unless the file names one. The replaced VAE is no longer referenced by the model, so
    its memory is freed unless the caller holds it. The model records the file for the PNG's parameters.
    """
    old = model.vae
    vae = load_vae(path, old.post_quant_conv.weight.device, old.post_quant_conv.weight.dtype,
                   old.config.scaling_factor)
    channels, factor = model.unet.config.out_channels, old.config.downsampling_factor
    if vae.config.latent_channels != channels or vae.config.downsampling_factor != factor:
        raise CheckpointError(
            f"{path} is a VAE of {vae.config.latent_channels}-channel latents at 1/{vae.config.downsampling_factor} "
            f"of the image size, and this model's UNet works on {channels} channels at 1/{factor}: a VAE of "
            "another family of models (SD 1.x and 2.x: 4 channels at 1/8)"
        )
    model.vae = vae
    model.vae_file = (Path(path).name, short_hash(vae_weights_file(path, vae.post_quant_conv.weight.dtype),
                                                  VAE_HASH_LENGTH))


def vae_weights_file(path: str | Path, dtype: torch.dtype) -> Path:
    """The file holding the VAE's tensors: `path` itself, or a diffusers VAE folder's weights (fp16 first for fp16)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    if not path.is_dir():
        return path
    if (path / "vae").is_dir() or (path / "unet").is_dir():
        raise CheckpointError(f"{path} is a whole diffusers model folder, not a VAE: give its vae/ folder")
    return _weights_file(path, "diffusion_pytorch_model", fp16_first=dtype == torch.float16)


def vae_key_names(keys: list[str], path: Path) -> tuple[str, dict[str, str]]:
    """The file's layout ("original" or "diffusers") and, for each tensor used, our key -> the file's key.
    A file holding something else than a VAE is a one-line error saying what it seems to hold."""
    prefixed = any(key.startswith(VAE_PREFIX) for key in keys)
    ours = {(key.removeprefix(VAE_PREFIX) if prefixed else key): key for key in keys}
    has = lambda start: any(key.startswith(start) for key in ours)
    if has(UNET_PREFIX) or has(CLIP_PREFIX) or has(OPENCLIP_PREFIX) or has("conditioner."):
        what = "a whole checkpoint"  # its VAE is the checkpoint's own: load that checkpoint instead
    elif has("encoder.down_blocks.") or has("decoder.up_blocks."):
        return "diffusers", diffusers_vae_names(keys)
    elif has("encoder.down.") or has("decoder.up."):
        return "original", {name: key for name, key in ours.items() if not IGNORED_VAE_KEYS.match(name)}
    elif has("input_blocks.") or has("down_blocks.") or has("time_embed"):
        what = "a UNet"
    elif has("text_model.") or has("encoder.layers.") or has("transformer.resblocks."):
        what = "a CLIP text encoder"
    elif any("lora" in key.lower() for key in keys):
        what = "a LoRA"
    else:
        what = f"an unknown model (keys like {list_keys(sorted(keys), 3)})"
    raise CheckpointError(f"{path} is not a VAE: it looks like {what}; {WHAT_TO_GIVE}")
