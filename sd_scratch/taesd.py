"""The tiny preview autoencoder: TAESD, latents <-> pixels in a few hundredths of the VAE's time.

TAESD ("Tiny AutoEncoder for Stable Diffusion", Ollin Boer Bohan, github.com/madebyollin/taesd) is a
distilled stand-in for the VAE of vae.py: about 1.2 M parameters per half where SD's VAE decoder has 49 M,
no group norms, no attention, only 3x3 convolutions, ReLUs and nearest-neighbour upsampling. It fudges
fine detail, so its use is the picture forming along the way (a preview every few steps), or a fast
final decode when detail does not matter.

    decoder   latents (4, 64, 64): soft clamp to (-3, 3), conv to 64 channels, ReLU
              [block] x3, upsample, conv       128x128
              [block] x3, upsample, conv       256x256
              [block] x3, upsample, conv       512x512
              [block], conv to 3 channels: RGB in about [0, 1]
    encoder   image in [0, 1]: conv to 64, [block]; then three times: a stride-2 conv, [block] x3;
              conv to 4 channels
    block     relu(x + conv(relu(conv(relu(conv(x))))))

The module tree is the published files': `TAESD().decoder.state_dict()` has exactly the keys of
`taesd_decoder.safetensors` (`1.weight`, `3.conv.0.weight`, `3.conv.2.bias`, ..., `19.weight`), because
the decoder and encoder are plain sequences, numbered as in madebyollin's taesd.py, parameterless
layers (the clamp, the ReLUs, the upsamples) included.

The scales: where TAESD differs from the VAE.
    latents   TAESD works on the latents as the UNet sees them, the ones already multiplied by 0.18215 (SD
              1.x/2.x) or 0.13025 (SDXL): it was distilled on `scaling_factor * z`, so its own scaling
              factor is 1 (madebyollin's README; diffusers' AutoencoderTiny configs say scaling_factor 1.0).
              So no `/ 0.18215` before `decode`, and `encode` gives latents ready for the UNet.
    pixels    the published networks map latents to RGB in [0, 1] and take [0, 1] in. `TAESD.decode` and
              `TAESD.encode` speak the VAE's [-1, 1] instead (x * 2 - 1 after the decoder, x / 2 + 0.5
              before the encoder), as diffusers' AutoencoderTiny does, so that either network can decode
              in the same place of the loop.

After the network, at the end of the file: reading TAESD files of every published layout, strictly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_scratch.loading.diffusers_folder import _read_json, _weights_file
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.strict import build_empty, fill_strictly, list_keys
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.vae import store_channels_last


@dataclass(frozen=True)
class TAESDConfig:
    latent_channels: int = 4  # SD 1.x/2.x and SDXL: 4 (taesd, taesdxl); SD3 and Flux: 16 (taesd3, taef1)
    image_channels: int = 3
    width: int = 64  # channels of every layer inside; 64 in all the published files
    # Blocks at each resolution of the decoder, lowest first; between two levels an upsample doubles H and W,
    # so the decoder's output is 2^(levels - 1) times the latents' size: 8 for SD, 4 for the tiny model.
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    # Blocks at each resolution of the encoder, highest first, each level after the first entered by a
    # stride-2 convolution. None: no encoder, a decoder alone (all a preview needs).
    encoder_blocks: tuple[int, ...] | None = (1, 3, 3, 3)

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent along each side: every level but the last doubles it."""
        return 2 ** (len(self.decoder_blocks) - 1)


def conv(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """TAESD's one kind of convolution: 3x3, padded by one pixel on every side."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Squash the latents softly into (-3, 3): tanh(x / 3) * 3, about x for |x| < 1.

    SD's latents (scaled) lie in about [-3, 3], and a network of ReLUs and no norms would pass anything
    further out straight through to wild colours. With the tanh a latent far out of range, as a preview
    early in the loop or a badly guided step can give, decodes like the nearest one in range.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(x + f(x)), f = conv, ReLU, conv, ReLU, conv: a residual block with neither norm nor timestep.

    The published code also allows a 1x1 convolution `skip` for blocks that change width; every published
    file keeps one width throughout, so the skip is the identity and holds no tensor.
    """

    def __init__(self, channels: int):
        super().__init__()
        # Numbered as the files are: conv.0, conv.2 and conv.4 hold the weights, 1 and 3 are the ReLUs.
        # The ReLUs work in place on the conv's fresh output: one image-sized tensor fewer to write.
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(inplace=True), conv(channels, channels),
                                  nn.ReLU(inplace=True), conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.conv(x) + x)


class Decoder(nn.Sequential):
    """Latents (B, C, h, w) as the UNet sees them -> RGB (B, 3, h f, w f) in about [0, 1], f = 2^(levels - 1)."""

    def __init__(self, config: TAESDConfig):
        width, last = config.width, len(config.decoder_blocks) - 1
        layers = [Clamp(), conv(config.latent_channels, width), nn.ReLU(inplace=True)]
        for level, blocks in enumerate(config.decoder_blocks):
            layers += [Block(width) for _ in range(blocks)]
            if level != last:
                # The conv after each upsample has no bias in the published files (nor in diffusers').
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), conv(width, width, bias=False)]
        layers.append(conv(width, config.image_channels))
        super().__init__(*layers)


class Encoder(nn.Sequential):
    """RGB (B, 3, H, W) in [0, 1] -> latents (B, C, H / f, W / f) as the UNet sees them (already scaled)."""

    def __init__(self, config: TAESDConfig):
        width = config.width
        layers = [conv(config.image_channels, width)]
        for level, blocks in enumerate(config.encoder_blocks):
            if level > 0:
                # Halve H and W. Padded on every side, unlike the VAE's Downsample (right and bottom only):
                # a distilled network learns with whichever padding it is given.
                layers.append(conv(width, width, stride=2, bias=False))
            layers += [Block(width) for _ in range(blocks)]
        layers.append(conv(width, config.latent_channels))
        super().__init__(*layers)


class TAESD(nn.Module):
    """The decoder and, when the config has one, the encoder; `decode` and `encode` on the VAE's [-1, 1] pixels.

    name: what the PNG's parameters call this decoder (load_taesd sets the file's name).
    """

    def __init__(self, config: TAESDConfig = TAESDConfig()):
        super().__init__()
        self.config = config
        self.name = "TAESD"
        self.decoder = Decoder(config)
        self.encoder = Encoder(config) if config.encoder_blocks is not None else None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the UNet produces them (scaled: no / 0.18215) -> images in about [-1, 1].

        Unlike VAE.decode, which takes the unscaled z = latents / 0.18215; this is VAE.images_from_latents's
        counterpart, and goes by that name too (below), so that sample.py can decode with either network.
        """
        store_channels_last(self)  # channels-last weights and activations, as VAE.decode: see there
        images = self.decoder(latents.to(memory_format=torch.channels_last)).contiguous()
        return images * 2 - 1  # the published decoder's [0, 1] -> the VAE's [-1, 1]

    images_from_latents = decode

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents as the UNet sees them (scaled). Deterministic: no posterior to sample."""
        if self.encoder is None:
            raise ValueError(f"{self.name} is a TAESD decoder alone: it has no encoder to encode images with")
        store_channels_last(self)
        return self.encoder((images / 2 + 0.5).to(memory_format=torch.channels_last)).contiguous()


# --------------------------------------------------------------------------------------------------
# Reading TAESD files, strictly, in the layouts it is published in
#
#   madebyollin   taesd_decoder.safetensors (or .pth), keys of the decoder's sequence (`1.weight`,
#                 `3.conv.0.weight`), and taesd_encoder.safetensors beside it, found by its name;
#                 taesdxl_* (SDXL) the same shapes with other weights, taesd3_* and taef1_* (SD3, Flux) 16 channels
#   diffusers     an AutoencoderTiny folder (madebyollin/taesd on the hub): config.json beside
#                 diffusion_pytorch_model.safetensors, keys `decoder.layers.{i}...` and `encoder.layers.{i}...`;
#                 or that weights file alone
#   ours          save_taesd's file (weights/tiny_taesd.safetensors): `decoder.{i}...`, `encoder.{i}...`, and the
#                 config in the metadata
#
# Nothing in the tensors tells taesd_ from taesdxl_ (or a decoder distilled for another 4-channel VAE): the
# file's name must. The config is read off the tensors' shapes, as configs.py does for checkpoints.

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
