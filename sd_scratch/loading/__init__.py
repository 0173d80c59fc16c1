"""A checkpoint on disk -> the three networks, their configs and the tokenizer, loaded strictly.

    model = load_checkpoint("weights/v1-5-pruned-emaonly.safetensors")   # or a diffusers folder

The modules of this package, one job each:

    tensor_file.py      reading a .safetensors file (memory-mapped, one tensor at a time) or a
                        weights-only .ckpt pickle; handing a network's pages back to the OS
    single_file.py      the original single-file layout: read, and written (save_checkpoint)
    diffusers_folder.py the diffusers folder layout: its key tables and its scheduler config
    configs.py          each network's config read off the shapes of its tensors (no YAML needed)
    strict.py           building a network empty and filling every tensor, naming any gap
    model.py            StableDiffusion, what loading gives, and CheckpointError

Tensors are read from the file one at a time, straight into the model's parameters (cast to the
requested dtype and moved to the device as they come), so the weights are never held twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sd_scratch.loading.diffusers_folder import load_diffusers_folder
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.single_file import DEFAULT_CHECKPOINT, load_single_file, save_checkpoint
from sd_scratch.loading.tensor_file import release_weights

__all__ = ["DEFAULT_CHECKPOINT", "CheckpointError", "StableDiffusion", "load_checkpoint", "release_weights",
           "save_checkpoint"]

WHERE_WEIGHTS_GO = (
    "put a Stable Diffusion checkpoint in weights/ (e.g. v1-5-pruned-emaonly.safetensors from "
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5) and pass it with --checkpoint"
)


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, prediction_type: str | None = None) -> StableDiffusion:
    """Load a single-file checkpoint or a diffusers folder onto `device` in `dtype`.

    path: default, the tiny model this project ships (weights/tiny_sd.safetensors).
    prediction_type: "epsilon" or "v_prediction", for files that do not say (SD 2.x single files).
    """
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; {WHERE_WEIGHTS_GO}")
    if path.is_dir():
        return load_diffusers_folder(path, device, dtype, prediction_type)
    return load_single_file(path, device, dtype, prediction_type)
