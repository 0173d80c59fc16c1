"""A TAESD (taesd.py) from a file, strictly, in every layout it is published in; and written (save_taesd).

    taesd = load_taesd("weights/taesd_decoder.safetensors", latent_channels=4, downsampling_factor=8)

The layouts:
    madebyollin   taesd_decoder.safetensors (or .pth), keys of the decoder's sequence (`1.weight`,
                  `3.conv.0.weight`), and taesd_encoder.safetensors beside it, found by its name;
                  taesdxl_* (SDXL) the same shapes with other weights, taesd3_* and taef1_* (SD3, Flux) 16 channels
    diffusers     an AutoencoderTiny folder (madebyollin/taesd on the hub): config.json beside
                  diffusion_pytorch_model.safetensors, keys `decoder.layers.{i}...` and `encoder.layers.{i}...`;
                  or that weights file alone
    ours          save_taesd's file (weights/tiny_taesd.safetensors): `decoder.{i}...`, `encoder.{i}...`, and the
                  config in the metadata

Nothing in the tensors tells taesd_ from taesdxl_ (or a decoder distilled for another 4-channel VAE): the
file's name must. The config is read off the tensors' shapes, as configs.py does for checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd_scratch.loading.diffusers_folder import _read_json, _weights_file
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.strict import build_empty, fill_strictly, list_keys
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.taesd import TAESD, TAESDConfig
from sd_scratch.tokenizer import WEIGHTS_DIR

TINY_TAESD = WEIGHTS_DIR / "tiny_taesd.safetensors"  # the shipped tiny model's own (tiny/train_taesd.py)

METADATA_KEY = "taesd"  # safetensors metadata entry holding save_taesd's config as JSON
WHAT_TO_GIVE = ("give taesd_decoder.safetensors (taesdxl_decoder for SDXL), a diffusers AutoencoderTiny folder "
                "such as madebyollin/taesd, or weights/tiny_taesd.safetensors")


def load_taesd(path: str | Path, latent_channels: int | None = None, downsampling_factor: int | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TAESD:
    """The TAESD of `path`, filled strictly; its encoder too where the files hold one.

    latent_channels, downsampling_factor: those of the model whose latents it will decode (model.vae.config's);
    a TAESD made for other latents is a one-line error naming both.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"TAESD not found: {path}")
    layout, tensors = taesd_tensors(path, dtype)
    shapes = {ours: file.shape(theirs) for ours, (file, theirs) in tensors.items()}
    saved = next((file.metadata[METADATA_KEY] for file, _ in tensors.values() if METADATA_KEY in file.metadata), None)
    config = config_from_json(saved) if saved else infer_taesd_config(shapes, path)
    if latent_channels is not None and config.latent_channels != latent_channels:
        raise CheckpointError(
            f"{path} is a TAESD for {config.latent_channels}-channel latents and this model's latents have "
            f"{latent_channels} channels: a TAESD of another family of models (SD 1.x/2.x and SDXL: 4, SD3 and Flux: 16)"
        )
    if downsampling_factor is not None and config.downsampling_factor != downsampling_factor:
        raise CheckpointError(
            f"{path} is a TAESD for latents at 1/{config.downsampling_factor} of the image size and this model's "
            f"are at 1/{downsampling_factor}: a TAESD of another family of models (SD 1.x/2.x and SDXL: 1/8)"
        )
    loaders = {ours: (lambda file=file, theirs=theirs: file.get(theirs, device, dtype))
               for ours, (file, theirs) in tensors.items()}
    taesd = fill_strictly(build_empty(TAESD, config), "TAESD", loaders, device, dtype, str(path), f"{layout} TAESD",
                          question="is this a TAESD file? " + WHAT_TO_GIVE)
    taesd.name = path.stem
    return taesd


def taesd_tensors(path: Path, dtype: torch.dtype) -> tuple[str, dict[str, tuple[TensorFile, str]]]:
    """The layout of `path` and, for every tensor it holds, our key -> (the file holding it, its key there)."""
    if path.is_dir():
        config = _read_json(path / "config.json")
        if (path / "vae").is_dir() or (path / "unet").is_dir():
            raise CheckpointError(f"{path} is a whole diffusers model folder, not a TAESD; {WHAT_TO_GIVE}")
        if config.get("_class_name") != "AutoencoderTiny":
            raise CheckpointError(f"{path} is not an AutoencoderTiny folder (its config.json names "
                                  f"{config.get('_class_name')!r}); {WHAT_TO_GIVE}")
        if (config.get("scaling_factor") or 1.0) != 1.0 or (config.get("shift_factor") or 0.0) != 0.0:
            raise CheckpointError(f"{path}: this AutoencoderTiny rescales its latents (scaling_factor "
                                  f"{config.get('scaling_factor')}, shift_factor {config.get('shift_factor')}); "
                                  "only TAESDs of the UNet's own latents (factor 1, shift 0) are read")
        file = TensorFile(_weights_file(path, "diffusion_pytorch_model", fp16_first=dtype == torch.float16))
        return "diffusers", {ours: (file, theirs) for ours, theirs in diffusers_taesd_names(file.keys).items()}
    file = TensorFile(path)
    keys = file.keys
    if any(key.startswith(("decoder.layers.", "encoder.layers.")) for key in keys):
        return "diffusers", {ours: (file, theirs) for ours, theirs in diffusers_taesd_names(keys).items()}
    if any(re.match(r"(decoder|encoder)\.\d+\.", key) for key in keys):
        return "sd_scratch", {key: (file, key) for key in keys}
    if keys and all(re.match(r"\d+\.", key) for key in keys):  # one half of madebyollin's pair
        if "0.weight" in keys:  # the encoder's first conv; the decoder's sequence starts with the clamp
            raise CheckpointError(f"{path} is a TAESD encoder; give its decoder (taesd_decoder.safetensors): "
                                  "the encoder beside it is read with it")
        tensors = {f"decoder.{key}": (file, key) for key in keys}
        encoder_path = path.with_name("encoder".join(path.name.rsplit("decoder", 1)))
        if "decoder" in path.name and encoder_path.exists():
            encoder = TensorFile(encoder_path)
            tensors |= {f"encoder.{key}": (encoder, key) for key in encoder.keys}
        return "madebyollin", tensors
    raise CheckpointError(f"{path} is not a TAESD: it looks like {what_it_holds(keys)}; {WHAT_TO_GIVE}")


def diffusers_taesd_names(keys: list[str]) -> dict[str, str]:
    """Our key -> the diffusers key, for every key of an AutoencoderTiny file.

    diffusers' DecoderTiny applies the clamp in its `forward`, outside its sequence of layers, so its
    `decoder.layers.{i}` is our `decoder.{i + 1}`; the encoders' sequences are numbered alike. Inside the
    blocks the names agree (`conv.0`, `conv.2`, `conv.4`). A key of neither half keeps its name, so that
    strict loading names it as unexpected.
    """
    names = {}
    for key in keys:
        found = re.match(r"(decoder|encoder)\.layers\.(\d+)\.(.+)", key)
        if found is None:
            names[key] = key
            continue
        half, index, rest = found.groups()
        names[f"{half}.{int(index) + (half == 'decoder')}.{rest}"] = key
    return names


def infer_taesd_config(shapes: dict[str, tuple[int, ...]], path: Path) -> TAESDConfig:
    """The config of the TAESD whose tensors (under our keys) have these shapes.

    Each half is a sequence of convs and blocks: conv_in, blocks, conv, blocks, ..., conv_out (the encoder's
    inner convs of stride 2), and the blocks between two consecutive convs make one level. A tensor that fits
    nowhere is left out of the config, for strict loading to name it.
    """
    if len(shapes.get("decoder.1.weight", ())) != 4:
        raise CheckpointError(f"{path} holds no TAESD decoder (its first conv, 1.weight, is missing); {WHAT_TO_GIVE}")
    width, latent_channels = shapes["decoder.1.weight"][:2]
    decoder_blocks, image_channels = blocks_per_level(shapes, "decoder", width, path)
    has_encoder = any(key.startswith("encoder.") for key in shapes)
    return TAESDConfig(latent_channels=latent_channels, image_channels=image_channels, width=width,
                       decoder_blocks=decoder_blocks,
                       encoder_blocks=blocks_per_level(shapes, "encoder", width, path)[0] if has_encoder else None)


def blocks_per_level(shapes: dict[str, tuple[int, ...]], half: str, width: int,
                     path: Path) -> tuple[tuple[int, ...], int]:
    """How many blocks stand between each two convs of `half`'s sequence, and conv_out's output channels.

    conv_out is the first conv after conv_in whose output is not `width` wide (RGB, or the latents)."""
    convs = sorted(int(m[1]) for key, shape in shapes.items()
                   if len(shape) == 4 and (m := re.fullmatch(rf"{half}\.(\d+)\.weight", key)))
    if not convs:
        raise CheckpointError(f"{path}: the TAESD {half} has no convolution (keys {half}.N.weight); {WHAT_TO_GIVE}")
    out = next((j for j, i in enumerate(convs) if j > 0 and shapes[f"{half}.{i}.weight"][0] != width), len(convs) - 1)
    convs = convs[:out + 1]
    blocks = {int(m[1]) for key in shapes if (m := re.fullmatch(rf"{half}\.(\d+)\.conv\.0\.weight", key))}
    levels = tuple(sum(start < i < end for i in blocks) for start, end in itertools.pairwise(convs))
    return levels, shapes[f"{half}.{convs[-1]}.weight"][0]


def what_it_holds(keys: list[str]) -> str:
    """A few words on what a file that is not a TAESD seems to hold."""
    has = lambda start: any(key.startswith(start) for key in keys)
    if has("model.diffusion_model.") or has("first_stage_model.") or has("conditioner."):
        return "a whole checkpoint"
    if has("decoder.up.") or has("decoder.up_blocks.") or has("encoder.down."):
        return "a full VAE (give it with --vae)"
    if any("lora" in key.lower() for key in keys):
        return "a LoRA"
    return f"an unknown model (keys like {list_keys(sorted(keys), 3)})"


def config_from_json(text: str) -> TAESDConfig:
    """save_taesd's metadata -> the config (JSON has lists where the config has tuples)."""
    values = json.loads(text)
    return TAESDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def save_taesd(path: str | Path, taesd: TAESD) -> None:
    """Write `taesd` with our keys (`decoder.{i}...`), its config in the metadata, for load_taesd."""
    tensors = {key: value.detach().contiguous() for key, value in taesd.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(dataclasses.asdict(taesd.config))})
