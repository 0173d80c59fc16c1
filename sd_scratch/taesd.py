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

Reading TAESD files of every published layout, strictly, is loading/taesd_file.py's job (load_taesd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
