"""Reading a network's config off the shapes of its tensors, so that no YAML file is needed.

Each function takes the tensors of one network under our key names (an original single file's keys
without the network's prefix; a diffusers folder's keys once renamed) and returns its config. Only
shapes are read: `meta_tensors` gives shape-only stand-ins, so nothing is loaded to infer a config.
What no shape tells is named in each docstring, with where it comes from instead.
"""

from __future__ import annotations

import re

import torch

from sd_scratch.text_encoder import TextEncoderConfig
from sd_scratch.unet import UNetConfig
from sd_scratch.vae import VAEConfig


def meta_tensors(keys_to_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """key -> a shape-only stand-in (on the meta device), whose `.shape` and `.ndim` the functions read."""
    return {key: torch.empty(shape, device="meta") for key, shape in keys_to_shapes.items()}


def infer_unet_config(state: dict[str, torch.Tensor]) -> UNetConfig:
    """The UNet's config from its tensors (keys without `model.diffusion_model.`).

    What no shape tells: the number of attention heads (below) and the group-norm groups (32 in SD).
    """
    conv_in = state["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    n_input_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))

    def depth(block):  # transformer blocks in the spatial transformer of `block` (e.g. "input_blocks.4.1")
        return len({k[len(block):].split(".")[2] for k in state if k.startswith(f"{block}.transformer_blocks.")})

    channel_mult, attention_levels, depths, res_per_level = [], [], [], 0
    level_blocks = 0
    for i in range(1, n_input_blocks):
        if f"input_blocks.{i}.0.op.weight" in state:  # a downsample closes the level
            res_per_level, level_blocks = level_blocks, 0
            continue
        if level_blocks == 0:
            channel_mult.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels)
            has_attention = f"input_blocks.{i}.1.proj_in.weight" in state
            if has_attention:
                attention_levels.append(len(channel_mult) - 1)
            depths.append(depth(f"input_blocks.{i}.1") if has_attention else 0)
        level_blocks += 1
    res_per_level = res_per_level or level_blocks
    context_dim = state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    middle_depth = depth("middle_block.1")
    label_emb = state.get("label_emb.0.0.weight")  # SDXL's conditioning vector
    # One depth everywhere (SD 1.x/2.x: 1) is written as one number; else one per level (0 where no attention)
    # and the middle block's.
    if len({depths[level] for level in attention_levels} | {middle_depth}) == 1:
        transformer_depth, transformer_depth_middle = middle_depth, None
    else:
        transformer_depth, transformer_depth_middle = tuple(depths), middle_depth
    # The number of heads is not visible in the weights. SD 1.x uses 8 heads everywhere; SD 2.x
    # (1024-wide OpenCLIP context) and SDXL (a label_emb) use heads of 64 channels.
    if context_dim == 1024 or label_emb is not None:
        heads = dict(num_heads=None, head_dim=64)
    else:
        heads = dict(num_heads=8, head_dim=None)
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=state["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level,
        attention_levels=tuple(attention_levels),
        context_dim=context_dim,
        transformer_depth=transformer_depth,
        transformer_depth_middle=transformer_depth_middle,
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
        adm_in_channels=None if label_emb is None else label_emb.shape[1],
        **heads,
    )


def infer_vae_config(state: dict[str, torch.Tensor]) -> VAEConfig:
    """The VAE's config from its tensors (keys without `first_stage_model.`).

    What no shape tells keeps its default: the group-norm groups and epsilon (32 and 1e-6 in every
    SD model) and the scaling factor (0.18215; a diffusers folder's vae/config.json may name another,
    and SDXL's VAE has the SD layout but wants 0.13025).
    """
    conv_in = state["encoder.conv_in.weight"]  # (base_channels, in_channels, 3, 3)
    base_channels = conv_in.shape[0]
    levels = {int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.(\d+)\.", key))}
    blocks = {int(m.group(1)) for key in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    # The first block of each level sets the level's width: conv1 is (width, previous width, 3, 3).
    channel_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base_channels
                         for i in range(len(levels)))
    return VAEConfig(
        in_channels=conv_in.shape[1],
        out_channels=state["decoder.conv_out.weight"].shape[0],
        latent_channels=state["post_quant_conv.weight"].shape[0],
        base_channels=base_channels,
        channel_mult=channel_mult,
        num_res_blocks=len(blocks),
    )


def infer_text_encoder_config(state: dict[str, torch.Tensor], activation: str) -> TextEncoderConfig:
    """The text encoder's config from its tensors (our key names, `text_model.*`).

    What no shape tells: the activation, which the layout tells (OpenAI CLIP: "quick_gelu", OpenCLIP:
    "gelu"), and the heads, which are 64 channels wide in all of them. A `text_projection` (SDXL's bigG) gives
    the pooled output's width.
    """
    vocab_size, width = state["text_model.embeddings.token_embedding.weight"].shape
    layers = {key.split(".")[3] for key in state if key.startswith("text_model.encoder.layers.")}
    return TextEncoderConfig(
        vocab_size=vocab_size,
        max_positions=state["text_model.embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=len(layers),
        heads=width // 64,  # both CLIP ViT-L and OpenCLIP ViT-H use heads of 64 channels
        mlp_width=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        activation=activation,
        projection_dim=state["text_projection.weight"].shape[0] if "text_projection.weight" in state else None,
    )


def misfits(unet: UNetConfig, vae: VAEConfig, *text_encoders: TextEncoderConfig) -> list[str]:
    """What in configs read off the shapes cannot hold, given what the shapes do not tell and SD assumes
    (32 group-norm groups, SD 1.x's 8 attention heads or SD 2.x's and SDXL's heads of 64 channels)."""
    found = []
    unet_widths = sorted({unet.model_channels * m for m in unet.channel_mult})
    if any(width % unet.norm_groups for width in unet_widths):
        found.append(f"the UNet's widths {unet_widths} do not split into SD's {unet.norm_groups} group-norm groups")
    attention_widths = sorted({unet.model_channels * unet.channel_mult[level] for level in unet.attention_levels})
    if any(width % (unet.num_heads or unet.head_dim) for width in attention_widths):
        heads = f"{unet.num_heads} heads" if unet.num_heads else f"heads of {unet.head_dim} channels"
        found.append(f"its attention widths {attention_widths} do not split into SD's {heads}")
    vae_widths = sorted({vae.base_channels * m for m in vae.channel_mult})
    if any(width % vae.norm_groups for width in vae_widths):
        found.append(f"the VAE's widths {vae_widths} do not split into SD's {vae.norm_groups} group-norm groups")
    for text_encoder in text_encoders:
        if text_encoder.width % 64:
            found.append(f"the text encoder's width {text_encoder.width} does not split into CLIP's heads of 64 "
                         "channels")
    return found
