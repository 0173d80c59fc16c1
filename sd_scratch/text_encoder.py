"""Token ids -> text embeddings: the text tower of CLIP, which Stable Diffusion's UNet attends to.

A plain pre-norm transformer, as in GPT-2: token embedding + learned position embedding, then N
layers of (layer norm, causal self-attention, residual) and (layer norm, MLP, residual), then a
final layer norm. Its output for all 77 positions, (B, 77, width), is the UNet's cross-attention
context. (CLIP itself keeps only the end token's vector and projects it for image-text
matching; Stable Diffusion uses none of that.)

    SD 1.x   OpenAI CLIP ViT-L/14 text tower   width  768, 12 layers, 12 heads, quick_gelu
    SD 2.x   OpenCLIP ViT-H/14 text tower      width 1024, 24 layers, 16 heads, gelu,
             read at the penultimate layer (skip_last_layers=1), final layer norm still applied
    SDXL     both ViT-L (as SD 1.x) and OpenCLIP ViT-bigG/14 (width 1280, 32 layers, 20 heads, gelu),
             each read at the penultimate layer *without* the final layer norm, the two outputs
             concatenated to 2048 channels; and bigG's pooled output (below). The refiner: bigG alone.

The pooled output is CLIP's own summary of the prompt: the last layer's output at the end token, after
the final layer norm, through `text_projection` (a bias-free linear map). SD 1.x/2.x never use it;
SDXL's UNet gets it, through the conditioning vector (`conditioning.py`).

The module tree mirrors the SD 1.x single-file checkpoint: `TextEncoder(config).state_dict()` has
exactly the keys stored there under `cond_stage_model.transformer.`, e.g.
`text_model.encoder.layers.3.self_attn.q_proj.weight`. SD 2.x files store OpenCLIP's names
(`transformer.resblocks.3.attn.in_proj_weight`, q, k and v fused); the loader renames them
(`loading/single_file.py`) and reads the sizes off the tensors (`loading/configs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12  # heads of 64 channels: 12 for ViT-L, 16 for ViT-H
    mlp_width: int = 3072  # 4 * width
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # the width of the pooled output's projection (SDXL's bigG: 1280); None: none
    # Which layer SD reads (SD 2.x: the penultimate) is not a property of the network but of how
    # Stable Diffusion uses it, so it is not here: the caller passes `skip_last_layers` to forward.


SD1_TEXT_ENCODER = TextEncoderConfig()
# The original SD 2.x file holds all 24 layers; diffusers' SD 2.x folders drop the 24th, never read.
SD2_TEXT_ENCODER = TextEncoderConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu")
SDXL_BIGG_TEXT_ENCODER = TextEncoderConfig(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu",
                                           projection_dim=1280)
END_TOKEN_ID = 49407  # <|endoftext|>, where the pooled output is read


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI's cheap approximation of GELU, x * sigmoid(1.702 x). The weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """causal: each token sees only itself and the tokens before it (the text tower); False: every token sees every
    token (CLIP's vision tower, clip_vision.py, which also builds on these layers)."""

    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.heads = config.heads
        self.causal = causal
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape

        def split_heads(t):  # (B, T, C) -> (B, heads, T, C // heads)
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        # softmax(q k^T / sqrt(head_dim)) v, each token seeing only itself and the tokens before it.
        # No padding mask: SD lets the real tokens ignore the padding through causality alone, and
        # the padding positions attend to the prompt, which is what the UNet was trained with.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)
        self.activation = {"quick_gelu": quick_gelu, "gelu": F.gelu}[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        # ModuleDicts (as in nanoGPT) only to reproduce the checkpoint's names, e.g. text_model.embeddings.*
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(config.vocab_size, config.width),
                position_embedding=nn.Embedding(config.max_positions, config.width),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(EncoderLayer(config) for _ in range(config.layers)))),
            final_layer_norm=nn.LayerNorm(config.width, eps=config.layer_norm_eps),
        ))
        if config.projection_dim is not None:  # transformers' CLIPTextModelWithProjection names it so
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, skip_last_layers: int = 0,
                token_embeddings: torch.Tensor | None = None, final_layer_norm: bool = True) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width) embeddings, after the final layer norm.

        skip_last_layers=k stops k layers before the end ("CLIP skip"): 1 reads the penultimate
        layer, as SD 2.x always does and diffusers' `clip_skip=1` does. The final layer norm is
        applied to whichever layer is read, as both the original SD 2.x code and diffusers do;
        final_layer_norm=False leaves it out, as SDXL does.
        token_embeddings: (B, T, width) to use instead of looking the ids up, e.g. with a textual-inversion
        embedding's learned vectors put at its positions (conditioning.py).
        """
        return self.encode(input_ids, skip_last_layers, token_embeddings, final_layer_norm, pooled=False)[0]

    def encode(self, input_ids: torch.Tensor, skip_last_layers: int = 0, token_embeddings: torch.Tensor | None = None,
               final_layer_norm: bool = True, pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward's embeddings, and with `pooled` the pooled output (B, projection_dim): the *last* layer's output
        at each row's first end token, final-normed and projected, whichever layer the embeddings are read at."""
        model = self.text_model
        if token_embeddings is None:
            token_embeddings = model.embeddings.token_embedding(input_ids)
        # Positions are always 0..T-1, so they are computed here rather than stored: SD 1.x files
        # carry a `position_ids` tensor, which some merged checkpoints hold as damaged floats.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = token_embeddings + model.embeddings.position_embedding(positions)
        layers = model.encoder.layers
        if not 0 <= skip_last_layers < len(layers):
            raise ValueError(f"skip_last_layers must be in 0..{len(layers) - 1}, got {skip_last_layers}")
        if pooled and self.config.projection_dim is None:
            raise ValueError("this text encoder has no text_projection: it gives no pooled output")
        read_at = len(layers) - skip_last_layers
        for layer in layers[:read_at]:
            x = layer(x)
        embeddings = model.final_layer_norm(x) if final_layer_norm else x
        if not pooled:
            return embeddings, None
        for layer in layers[read_at:]:  # the layers CLIP skip left out: the pooled output reads the last
            x = layer(x)
        end_positions = (input_ids == END_TOKEN_ID).int().argmax(dim=1)  # the first end token of each row
        end = model.final_layer_norm(x[torch.arange(len(x), device=x.device), end_positions])
        return embeddings, self.text_projection(end)
