"""Small random Stable Diffusion models for the tests (their diffusers/transformers twins: twins.py)."""

import torch

from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig

TEXT_SD1 = TextEncoderConfig(width=64, layers=3, heads=1, mlp_width=256)
UNET_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      num_heads=8, context_dim=64)  # SD 1.x: 8 heads, as the loader assumes
VAE_SMALL = VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)
# Group norms keep SD's 32 groups: their number is not visible in the tensors, so a file without
# sd_scratch's metadata is read as having 32.
# SD 2.x: OpenCLIP-sized context (1024) so the loader's SD 2.x rules apply; heads of 64 channels.
TEXT_SD2 = TextEncoderConfig(width=1024, layers=2, heads=16, mlp_width=256, activation="gelu")
UNET_SD2 = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                      num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with noise of a size that keeps activations of order 1 (default init
    zero-fills nothing here, but layer norms and biases would otherwise sit at exactly 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0  # norms' scales near 1, biases near 0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return module.eval()


def small_sd(version: int = 1, seed: int = 0):
    text_config, unet_config = (TEXT_SD1, UNET_SD1) if version == 1 else (TEXT_SD2, UNET_SD2)
    text_encoder = randomize(TextEncoder(text_config), seed)
    unet = randomize(UNet(unet_config), seed + 1)
    vae = randomize(VAE(VAE_SMALL), seed + 2)
    return text_encoder, unet, vae
