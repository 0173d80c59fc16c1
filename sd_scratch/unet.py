"""The noise predictor: (noisy latents, timestep, text embeddings) -> predicted noise.

This is the conditional UNet of Stable Diffusion (the `UNetModel` of CompVis' `openaimodel.py`),
written so that its module tree *is* the checkpoint: `UNet(...).state_dict()` has exactly the keys
found under `model.diffusion_model.` in an original single-file checkpoint. A reader who opens the
safetensors header finds `input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight` here as
`unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight`.

The shape of the network, for SD 1.5 (model_channels 320, multipliers 1, 2, 4, 4):

    input_blocks   64x64: conv_in, [res, transformer] x2, downsample     320 channels
                   32x32: [res, transformer] x2, downsample              640
                   16x16: [res, transformer] x2, downsample              1280
                    8x8 : [res] x2                                       1280
    middle_block    8x8 : res, transformer, res
    output_blocks  the mirror image, three blocks per level, each taking one skip connection
                   from the input side, with an upsample closing every level but the last
    out            group norm, SiLU, conv to 4 channels

Every residual block also receives the timestep embedding; every transformer attends to the text.

SDXL's UNet is the same network with other numbers (`UNetConfig`): three levels of 320, 640 and 1280
channels, no transformer at the first, transformers 2 and 10 blocks deep at the others and in the middle,
heads of 64 channels, a 2048-wide context, and a `label_emb`: an MLP like the timestep's that maps the
conditioning vector (pooled text and image sizes, `conditioning.py`) onto the timestep embedding, so that
every residual block hears it too. The refiner: four levels of 384 x (1, 2, 4, 4), transformers 4 deep at
the middle two levels and in the middle block, a 1280-wide context.

`UNet.set_attention_slices` trades speed for memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # 9 for inpainting models: latents + mask + masked-image latents
    out_channels: int = 4
    model_channels: int = 320  # width of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels that carry a spatial transformer
    num_heads: int | None = 8  # SD 1.x: 8 heads at every level ...
    head_dim: int | None = None  # ... SD 2.x: heads of 64 channels, so their number grows with width
    context_dim: int = 768  # width of the text embeddings (768 for CLIP ViT-L, 1024 for OpenCLIP ViT-H, SDXL 2048)
    # Transformer blocks per spatial transformer: one number for every level (SD 1.x/2.x: 1), or one per
    # level (SDXL base: 0, 2, 10, where 0 stands at a level without attention), and in the middle block
    # (None: as at the last level).
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    use_linear_projection: bool = False  # SD 2.x projects in and out of the transformer with Linear, SD 1.x with 1x1 conv
    norm_groups: int = 32
    # SDXL: the width of the conditioning vector (pooled text + size features) that `label_emb` maps onto
    # the timestep embedding (sgm's name; 2816 for the base, 2560 for the refiner). None: no label_emb.
    adm_in_channels: int | None = None

    def heads_and_dim(self, channels: int) -> tuple[int, int]:
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        return self.num_heads, channels // self.num_heads

    def depth(self, level: int | None) -> int:
        """Transformer blocks at `level` (None: the middle block)."""
        if level is None and self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        if isinstance(self.transformer_depth, int):
            return self.transformer_depth
        return self.transformer_depth[-1 if level is None else level]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the (possibly fractional) timestep, as in "Attention is all you need".

    emb[i] = cos(t * w_i) for the first half and sin(t * w_i) for the second, w_i = max_period^(-i / half).
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """Group norm computed in float32 whatever the weights' dtype, as the original does, so fp16 stays stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """x + f(x, t): two 3x3 convolutions, with the timestep embedding added in between."""

    def __init__(self, channels: int, out_channels: int, time_embed_dim: int, groups: int):
        super().__init__()
        # SiLU in place: it overwrites the group norm's fresh output instead of allocating another tensor.
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, out_channels))  # not in place: time_emb is shared
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(inplace=True), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        # A 1x1 convolution matches the channel count of the shortcut when the block changes width.
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(time_emb)[:, :, None, None].to(h.dtype)  # one shift per channel
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention. Self-attention when no context is given; cross-attention on the text otherwise."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.slices = 1  # see UNet.set_attention_slices
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, tokens, heads * head_dim) -> (B, heads, tokens, head_dim)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.slices == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        else:  # each query's softmax row is independent of the others: a few rows of queries at a time
            out = torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.chunk(self.slices, dim=2)], dim=2)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """The gated feed-forward input of "GLU Variants Improve Transformer": a * gelu(b) from one projection."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention over the pixels, cross-attention on the text, feed-forward: each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)  # where the prompt steers the image
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treats every latent pixel as a token: (B, C, H, W) -> (B, H*W, C) -> transformer blocks -> back."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear_projection: bool, groups: int):
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, head_dim, context_dim) for _ in range(depth)
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C): one token per latent pixel
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (height, width))
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Nearest-neighbour to the size of the skip connection that comes next: twice the input,
        # except where an odd size was rounded up on the way down.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.ModuleList):
    """One numbered entry of input_blocks / middle_block / output_blocks: layers applied in order,
    each given what it needs (residual blocks the timestep, transformers the text)."""

    def forward(self, x, time_emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, time_emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        time_embed_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )

        def res(ch_in, ch_out):
            return ResBlock(ch_in, ch_out, time_embed_dim, c.norm_groups)

        if c.adm_in_channels is not None:  # SDXL: the conditioning vector, mapped as the timestep is
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(c.adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            ))

        def transformer(ch, level):
            heads, head_dim = c.heads_and_dim(ch)
            return SpatialTransformer(ch, heads, head_dim, c.depth(level), c.context_dim,
                                      c.use_linear_projection, c.norm_groups)

        # The way down: remember the width of every block's output, each becomes a skip connection.
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)])])
        skip_channels = [c.model_channels]
        ch = c.model_channels
        last_level = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, c.model_channels * mult)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = Block([res(ch, ch), transformer(ch, None), res(ch, ch)])

        # The way up: each block concatenates one skip connection, last in first out.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if level in c.attention_levels:
                    layers.append(transformer(ch, level))
                if level != 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))

        self.out = nn.Sequential(
            GroupNorm32(c.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1)
        )

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                vector: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, 4, H/8, W/8), timestep scalar or (B,), context (B, 77k, context_dim) -> noise (B, 4, H/8, W/8).

        vector: (B, adm_in_channels), the conditioning that a UNet with a `label_emb` adds to its timestep
        embedding (SDXL's pooled text and image sizes); SD 1.x and 2.x have none, and condition on the context alone.
        """
        has_label_emb = self.config.adm_in_channels is not None
        if (vector is not None) != has_label_emb:
            raise ValueError("this UNet has no label_emb to take a conditioning vector: it is conditioned on text"
                             if vector is not None else "this UNet (SDXL) needs its conditioning vector beside the text")
        timesteps = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        time_emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(latents.dtype))
        if has_label_emb:  # SDXL: "what picture this is" (pooled text, sizes) joins "how noisy it is"
            time_emb = time_emb + self.label_emb(vector.to(latents.dtype))
        context = context.to(latents.dtype)

        x = latents
        skips = []
        for block in self.input_blocks:
            x = block(x, time_emb, context)
            skips.append(x)
        x = self.middle_block(x, time_emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            next_skip_size = skips[-1].shape[-2:] if skips else None
            x = block(x, time_emb, context, upsample_size=next_skip_size)
        return self.out(x)

    def set_attention_slices(self, slices: int) -> None:
        """Compute every attention in `slices` slices of queries, one after the other: the same result,
        with 1/slices of the (queries x keys) score matrix in memory at a time. For devices whose
        attention kernel writes that matrix out (4096 x 4096 per head for a 512 image); torch's fused
        CPU and CUDA kernels never hold it whole anyway. 1 turns slicing off."""
        if slices < 1:
            raise ValueError(f"attention slices must be at least 1, got {slices}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.slices = slices
