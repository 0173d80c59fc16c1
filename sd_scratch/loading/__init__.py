"""A checkpoint on disk -> the networks, their configs and the tokenizers, loaded strictly (SD 1.x, 2.x, SDXL).

    model = load_checkpoint("weights/v1-5-pruned-emaonly.safetensors")   # or a diffusers folder, or a hub id

The modules of this package, one job each:

    tensor_file.py      reading a .safetensors file (memory-mapped, one tensor at a time) or a
                        weights-only .ckpt pickle; handing a network's pages back to the OS
    single_file.py      the original single-file layout: read, and written (save_checkpoint)
    diffusers_folder.py the diffusers folder layout: its key tables and its scheduler config
    configs.py          each network's config read off the shapes of its tensors (no YAML needed)
    strict.py           building a network empty and filling every tensor, naming any gap
    model.py            StableDiffusion, what loading gives, and CheckpointError
    vae_file.py         a VAE from a file of its own, in place of the checkpoint's (--vae)
    taesd_file.py       TAESD, the tiny preview autoencoder, in each layout it is published in
    safety_checker_file.py  the safety checker of a diffusers SD 1.x folder (safety_checker/, feature_extractor/)
    hub.py              Hugging Face ids (OWNER/NAME, OWNER/NAME/FILE.safetensors): the cache, or a download

Tensors are read from the file one at a time, straight into the model's parameters (cast to the
requested dtype and moved to the device as they come), so the weights are never held twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_scratch.loading.diffusers_folder import load_diffusers_folder
from sd_scratch.loading.hub import from_hub, is_hub_id
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT, load_single_file, save_checkpoint
from sd_scratch.loading.tensor_file import release_weights
from sd_scratch.loading.vae_file import load_vae, replace_vae

__all__ = ["DEFAULT_CHECKPOINT", "CheckpointError", "StableDiffusion", "load_checkpoint", "load_vae",
           "release_weights", "replace_vae", "save_checkpoint"]

WHERE_WEIGHTS_GO = (
    "put a Stable Diffusion checkpoint in weights/ (e.g. v1-5-pruned-emaonly.safetensors from "
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5) and pass it with --checkpoint"
)


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, prediction_type: str | None = None,
                    vae: str | Path | None = None, low_memory: bool = False) -> StableDiffusion:
    """Load a single-file checkpoint or a diffusers folder onto `device` in `dtype`.

    path: a file or folder, or, when none of that name exists, a Hugging Face id (hub.py); default, the tiny
        model this project ships (weights/tiny_sd.safetensors).
    prediction_type: "epsilon" or "v_prediction", for files that do not say (SD 2.x single files).
    vae: a VAE file or folder to use instead of the checkpoint's own (vae_file.py).
    low_memory: the UNet's and the text encoders' big layers in 8 bits, each weight quantised as it is read
        (quantize.py; 1 byte a weight instead of 4). A file written by `python -m sd_scratch.quantize` is 8-bit
        whatever this says.
    """
    if vae is not None and not Path(vae).exists():  # before the checkpoint's seconds of loading
        raise CheckpointError(f"VAE not found: {vae}")
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    hub_id = str(path) if not path.exists() and is_hub_id(str(path)) else None
    if hub_id:
        path = from_hub(hub_id, fp16=dtype == torch.float16)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; {WHERE_WEIGHTS_GO}")
    if path.is_dir():
        model = load_diffusers_folder(path, device, dtype, prediction_type, low_memory=low_memory)
    else:
        model = load_single_file(path, device, dtype, prediction_type, low_memory=low_memory)
    if hub_id:
        model.source = hub_id  # not the cache's snapshot folder: the PNG's "Model" is then the repository's name
    if vae is not None:
        replace_vae(model, vae)
    return model
