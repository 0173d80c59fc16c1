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


# SDXL-shaped: two text encoders (a ViT-L-like one and a bigG-like one with a projection that is not square, so
# that a transposed projection would show), context 64 + 128 = 192, no attention at the first level, depth 2
# and 3 at the others (3 in the middle too), heads of 64 channels; vector 96 + 6 x 256 (the base) or
# 96 + 5 x 256 (the refiner, bigG alone).
TEXT_SDXL_L = TextEncoderConfig(width=64, layers=3, heads=1, mlp_width=256)
TEXT_SDXL_G = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=256, activation="gelu", projection_dim=96)
UNET_SDXL = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                       num_heads=None, head_dim=64, context_dim=192, transformer_depth=(0, 2, 3),
                       transformer_depth_middle=3, use_linear_projection=True, adm_in_channels=96 + 6 * 256)
UNET_SDXL_REFINER = UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                               attention_levels=(1, 2), num_heads=None, head_dim=64, context_dim=128,
                               transformer_depth=2, use_linear_projection=True, adm_in_channels=96 + 5 * 256)


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


def small_sdxl(seed: int = 0, refiner: bool = False):
    """(text_encoder or None, text_encoder_2, unet, vae) of a small random SDXL base or refiner."""
    text_encoder = None if refiner else randomize(TextEncoder(TEXT_SDXL_L), seed)
    text_encoder_2 = randomize(TextEncoder(TEXT_SDXL_G), seed + 3)
    unet = randomize(UNet(UNET_SDXL_REFINER if refiner else UNET_SDXL), seed + 1)
    vae = randomize(VAE(VAE_SMALL), seed + 2)
    return text_encoder, text_encoder_2, unet, vae


def openclip_layout(text_encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """Our text encoder's tensors under OpenCLIP's names (fused q, k, v; the projection as the matrix of x @ P),
    written here independently of the loader's renaming."""
    ours = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    openclip = {"token_embedding.weight": ours["embeddings.token_embedding.weight"],
                "positional_embedding": ours["embeddings.position_embedding.weight"],
                "ln_final.weight": ours["final_layer_norm.weight"], "ln_final.bias": ours["final_layer_norm.bias"]}
    for i in range(text_encoder.config.layers):
        layer, block = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            openclip[block + f"attn.in_proj_{kind}"] = torch.cat(
                [ours[layer + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for mine, theirs in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                openclip[block + f"{theirs}.{kind}"] = ours[layer + f"{mine}.{kind}"]
    if "text_projection.weight" in ours:
        openclip["text_projection"] = ours["text_projection.weight"].t()
    openclip["logit_scale"] = torch.tensor(4.6052)
    return {k: v.contiguous() for k, v in openclip.items()}


def sdxl_single_file_tensors(text_encoder, text_encoder_2, unet, vae) -> dict[str, torch.Tensor]:
    """An SDXL base (text_encoder given) or refiner (None) in the original single-file layout."""
    tensors = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    tensors |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    if text_encoder is not None:
        tensors |= {"conditioner.embedders.0.transformer." + k: v for k, v in text_encoder.state_dict().items()}
        tensors |= {"conditioner.embedders.1.model." + k: v for k, v in openclip_layout(text_encoder_2).items()}
    else:
        tensors |= {"conditioner.embedders.0.model." + k: v for k, v in openclip_layout(text_encoder_2).items()}
    return {k: v.contiguous() for k, v in tensors.items()}
