"""Latents <-> pixels: the KL autoencoder ("VAE") of Stable Diffusion.

The denoising loop never sees pixels. It works on latents, 4 channels at 1/8 of the image size
(a 512x512 RGB image is a 4x64x64 latent), and this network translates between the two:

    encode:  image (3, H, W) in [-1, 1] -> a Gaussian posterior over z: mean and log-variance (4, H/8, W/8)
    decode:  z (4, H/8, W/8) -> image (3, H, W) in about [-1, 1]

This is `AutoencoderKL` of CompVis' `ldm/models/autoencoder.py` with the `Encoder` and `Decoder` of
`ldm/modules/diffusionmodules/model.py`, written so that its module tree *is* the checkpoint:
`VAE().state_dict()` has exactly the keys found under `first_stage_model.` in an original
single-file checkpoint (`encoder.down.1.block.0.nin_shortcut.weight`, `decoder.up.3.upsample.conv.bias`).

The shape of the network, for SD 1.x and 2.x (base channels 128, multipliers 1, 2, 4, 4):

    encoder   512x512: conv_in, [res] x2, downsample      128 channels
              256x256: [res] x2, downsample               256
              128x128: [res] x2, downsample               512
                64x64: [res] x2                           512
              mid: res, self-attention, res; norm, SiLU, conv_out to 8 = mean and log-variance
    quant_conv, post_quant_conv: 1x1 convolutions on either side of the latent
    decoder   the mirror image with three res blocks per level and an upsample closing each level
              but the last; norm, SiLU, conv_out to 3 channels

Where 0.18215 enters. The UNet was trained on latents multiplied by 0.18215, one over the standard
deviation of the encoder's latents on training images, so that the diffusion works at unit variance.
The encoder and decoder here know nothing of it: `encode` and `decode` work on *unscaled* z. The
factor enters in exactly two places, `VAE.latents_from_images` (latents = 0.18215 * z) and
`VAE.images_from_latents` (z = latents / 0.18215), the `1 / 0.18215 * latents` of the walkthroughs.

After the network, at the end of the file: the channels-last layout `decode` uses on the CPU, and
`decode_tiled` for images too large to decode at once, each with what it buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # RGB in ...
    out_channels: int = 3  # ... and out (`out_ch` in the original yaml)
    latent_channels: int = 4  # `z_channels` and `embed_dim` in the yaml; equal in every SD model
    base_channels: int = 128  # `ch`: width of the first level; level i has base_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per level; each level but the last halves H and W
    num_res_blocks: int = 2  # residual blocks per level in the encoder (the decoder has one more)
    norm_groups: int = 32
    norm_eps: float = 1e-6
    # Not a tensor of the checkpoint: 0.18215 for SD 1.x and 2.x, 0.13025 for SDXL.
    scaling_factor: float = 0.18215

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent along each side: every level but the last halves it (8 for SD)."""
        return 2 ** (len(self.channel_mult) - 1)


def group_norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    """shortcut(x) + f(x), f = norm, SiLU, 3x3 conv, norm, SiLU, 3x3 conv. Unlike the UNet's, no timestep."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        self.norm1 = group_norm(in_channels, config)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, config)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # (the original's dropout is 0 here)
        # A 1x1 convolution matches the channel count of the shortcut when the block changes width.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU in place, over the norm's fresh output: one image-sized tensor fewer (128 MB at 512x512).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        # Added into h, not into a new tensor: a tensor this large is fresh pages from the OS, each one faulted in
        # and zeroed (a 512x512 decode faults in 1.23 million pages without this, 1.05 million with it, and its two
        # threads spend 3 to 4 s in the kernel). The same sum: a + b == b + a.
        return h.add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention in which every pixel is a token: x + proj_out(softmax(q k^T / sqrt(C)) v).

    q, k, v and proj_out are 1x1 convolutions, as in the original file, so the CompVis checkpoints
    load as they are. Some files store the same four matrices as linear weights [C, C] instead of
    [C, C, 1, 1]; the loader (`loading/strict.py`) reshapes those, the network keeps one layout.
    """

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.norm = group_norm(channels, config)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C). Channels made contiguous (already so with channels-last
        # activations, see VAE.decode), so that SDPA can take its fused kernel instead of writing out the
        # (H*W) x (H*W) attention matrix (4096^2 for a 512 image).
        q, k, v = (t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)  # the softmax is over all H*W positions
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return self.proj_out(h).add_(x)  # in place, as in ResnetBlock


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    The original pads only the right and bottom edge by one pixel (then convolves with no padding),
    not one pixel on every side: with stride 2 the two choices sample different pixels, and the
    checkpoints were trained with this one.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour copy of every pixel to a 2x2 square, then a 3x3 convolution.

    Computed without making the enlarged image. After the copy, the 3x3 window of output pixel
    (2i + a, 2j + b) covers only input rows i-1, i (a = 0: its top row of taps sees row i-1, its middle
    and bottom rows both see row i) or i, i+1 (a = 1), and likewise columns. So each of the four kinds
    of output pixel, (a, b) in {0, 1}^2, is a 2x2 convolution of the small image whose taps are the
    3x3 kernel's taps summed in those pairs, and the four interleave into the output:

        conv3x3(upsample(x))[2i + a, 2j + b] = conv2x2(x, kernel_ab)[i + a, j + b]   (x padded by 1)

    The same sum, grouped differently: per input channel, a 2x2 block of output pixels takes 4 x 4
    products, where the 3x3 convolution of the enlarged image takes 4 x 9. For SD's decoder at 512x512
    this saves 0.38 of the 2.48 TFLOP, and the enlarged image (268 MB at the last upsample) is never
    held. Rounding is no worse for it: fewer terms are summed (float32 against a float64 computation,
    256 channels 256 -> 512: rms error 2.4e-7 against 5.0e-7 the other way; benchmarks/speed_pieces.py).
    That holds where the convolution multiplies in float32 or wider, as on the CPU. In 16-bit formats,
    and in the TF32 that CUDA's convolutions use for float32, each summed tap would first be rounded to
    11 (or 8) bits, an error of its own (float16: rms 2.5e-4 against 2.0e-4): there the enlarged image
    is made.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype.itemsize < 4:
            return self.convolve_enlarged(x)
        batch, _, height, width = x.shape
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(batch, self.conv.out_channels, 2 * height, 2 * width, dtype=x.dtype, device=x.device,
                          memory_format=layout)
        for a in (0, 1):
            taps_of_row_a = taps_seen_by(self.conv.weight, a, dim=2)  # 3 rows of taps -> the 2 that row a sees
            for b in (0, 1):
                # Laid out as the activations are, as store_channels_last lays out the decoder's weights.
                kernel = taps_seen_by(taps_of_row_a, b, dim=3).contiguous(memory_format=layout)
                # padding=1 gives (height + 1) x (width + 1) outputs; this kind of pixel starts at (a, b).
                out[:, :, a::2, b::2] = F.conv2d(x, kernel, self.conv.bias, padding=1)[:, :, a:a + height, b:b + width]
        return out

    def convolve_enlarged(self, x: torch.Tensor) -> torch.Tensor:
        """The upsample as the original writes it: the enlarged image, then its 3x3 convolution."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def taps_seen_by(kernel: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """A 3-tap kernel axis as an output pixel at `phase` (0: even, 1: odd) of a 2x upsample sees the small
    image: 2 taps, on pixels (i-1, i) for phase 0, where the last two taps fall on i; (i, i+1) for phase 1."""
    first, middle, last = kernel.unbind(dim)
    return torch.stack((first, middle + last) if phase == 0 else (first + middle, last), dim)


def res_blocks(in_channels: int, out_channels: int, num_blocks: int, config: VAEConfig) -> nn.ModuleList:
    """`num_blocks` res blocks; the first changes the width from in_channels to out_channels."""
    widths = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], config) for j in range(num_blocks))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: res blocks `block.{j}`, then a `downsample` on every level but the last.

    (The original also has an empty `attn` list here: no attention in these levels, no tensors.)
    """

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, downsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, config.num_res_blocks, config)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class DecoderLevel(nn.Module):
    """One resolution of the decoder: one res block more than the encoder, then an `upsample` except at full size."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig, upsample: bool):
        super().__init__()
        self.block = res_blocks(in_channels, out_channels, config.num_res_blocks + 1, config)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    """At the lowest resolution: res block, self-attention over all positions, res block."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, 2 * latent_channels, H / 2^(levels-1), W / 2^(levels-1)): mean and log-variance."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        # Level i widens from the previous level's width to its own, then (but the last) halves H and W.
        self.down = nn.ModuleList(
            EncoderLevel(widths[max(i - 1, 0)], widths[i], config, downsample=i != last)
            for i in range(len(widths))
        )
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = group_norm(widths[-1], config)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """z (B, latent_channels, h, w) -> image (B, 3, h * 2^(levels-1), w * 2^(levels-1))."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], config)
        # `up.{i}` is stored by resolution, as in the encoder: up.0 is the full-resolution level. The
        # decoder runs them from the lowest resolution up, so up.3 comes first (see `forward`), and
        # level i narrows from the width of the level below it (i + 1) to its own.
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(i + 1, last)], widths[i], config, upsample=i != 0)
            for i in range(len(widths))
        )
        self.norm_out = group_norm(widths[0], config)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        x = self.mid(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    """The KL autoencoder: `encode` to a Gaussian posterior over unscaled latents z, `decode` z back to pixels."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convolutions between the encoder/decoder and the latent; they keep the widths.
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (mean, logvar) of the diagonal Gaussian posterior q(z | image)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        # The original clamps the log-variance, so that exp(logvar) neither underflows nor overflows.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z -> images in about [-1, 1] (clamp before turning them into pixels)."""
        store_channels_last(self)  # channels-last weights and activations: faster convolutions on the CPU
        return self.decoder(self.post_quant_conv(z.to(memory_format=torch.channels_last))).contiguous()

    def latents_from_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> latents as the UNet sees them: latents = 0.18215 * z, z ~ N(mean, exp(logvar)).

        This is where image-to-image starts. z is a sample of the posterior (mean + std * noise), as in
        both the original scripts and diffusers; the noise is drawn with `generator`, on its device.
        """
        mean, logvar = self.encode(images)
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scaling_factor * z

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the UNet produces them -> images in about [-1, 1]: decode(latents / 0.18215)."""
        return self.decode(latents / self.config.scaling_factor)


# --------------------------------------------------------------------------------------------------
# Speed and memory: channels-last weights for the CPU, and decoding large images in tiles


def store_channels_last(module: nn.Module) -> None:
    """Lay every convolution weight out channels-last in memory: (out, kh, kw, in) instead of (out, in, kh, kw).

    torch's CPU convolutions (oneDNN) are faster on the decoder's large feature maps when activations
    and weights are both channels-last (NHWC), see `VAE.decode`: a 512x512 decode with SD 1.5's VAE
    takes 0.89 and 0.95 of the contiguous layout's time in two runs (float32, 2 threads, AMD EPYC;
    benchmarks/speed_pieces.py). Shapes and values stay what they
    were, only the order in memory changes, so the state_dict is the same. Called at the start of
    every decode, it does its work on the first call only. Each weight is copied, not permuted in
    place: a weight loaded from a file is a view of its memory-mapped pages, and writing to those
    costs a copy-on-write page fault per 4 KB page (over a second for SD's VAE on our VM).
    """
    for weight in module.parameters():
        if weight.ndim == 4 and not weight.is_contiguous(memory_format=torch.channels_last):
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)


def decode_tiled(vae: VAE, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """vae.decode(z) one tile at a time: for images larger than memory allows to decode at once.

    The latents are cut into tile x tile squares that overlap their neighbours by at least
    `overlap` latents. Each is decoded on its own, and where decoded tiles overlap they are
    cross-faded, each tile's weight ramping linearly down towards its edge, so that no seam shows.
    Peak memory then follows the tile, not the image: with tile=64 it is that of a 512x512 decode
    (SD 1.5's VAE, fp32, CPU: a 2048x2048 decode peaks at 1.64 GB resident, where an untiled
    1024x1024 one takes 3.94 GB; benchmarks/results/tiled_decode.md).
    The result is close to decode(z) but not equal: near its edges a tile's convolutions see zero
    padding instead of the neighbouring latents, and the middle block's attention sees one tile only.
    """
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"overlap must be between 0 and tile / 2 = {tile // 2} latents, got {overlap}")
    f = vae.config.downsampling_factor
    batch, _, height, width = z.shape
    image = torch.zeros(batch, vae.config.out_channels, height * f, width * f, device=z.device, dtype=z.dtype)
    total_weight = torch.zeros(height * f, width * f, device=z.device, dtype=z.dtype)
    for top in tile_starts(height, tile, overlap):
        for left in tile_starts(width, tile, overlap):
            part = vae.decode(z[:, :, top:top + tile, left:left + tile])
            # Fade only towards edges that another tile covers too; the picture's own border keeps weight 1.
            weight = (ramp(part.shape[-2], top > 0, top + tile < height, overlap * f)[:, None]
                      * ramp(part.shape[-1], left > 0, left + tile < width, overlap * f)[None, :]).to(z)
            where = (..., slice(top * f, top * f + part.shape[-2]), slice(left * f, left * f + part.shape[-1]))
            image[where] += part * weight
            total_weight[where] += weight
    return image / total_weight


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where the tiles along one side begin: as few as cover `size` with overlaps of at least `overlap`, evenly spread."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def ramp(length: int, fade_in: bool, fade_out: bool, width: int) -> torch.Tensor:
    """A tile's blending weight along one side: 1, rising linearly over the first `width` pixels if
    fade_in, falling over the last `width` if fade_out; never 0, so every pixel has some weight."""
    weight = torch.ones(length)
    rise = torch.arange(1, width + 1) / (width + 1)
    if fade_in:
        weight[:width] = rise
    if fade_out:
        weight[length - width:] = rise.flip(0)
    return weight
