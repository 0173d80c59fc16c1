"""Builds diffusers' UNet2DConditionModel to match a sd_scratch UNetConfig (test-only helper)."""

from diffusers import UNet2DConditionModel

from sd_scratch.unet import UNetConfig


def diffusers_unet_config(c: UNetConfig, sample_size: int = 64) -> dict:
    levels = range(len(c.channel_mult))
    heads = [c.heads_and_dim(c.model_channels * m)[0] for m in c.channel_mult]
    return dict(
        sample_size=sample_size,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(c.model_channels * m for m in c.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)),
        layers_per_block=c.num_res_blocks,
        cross_attention_dim=c.context_dim,
        # diffusers calls the number of heads `attention_head_dim` (a historical misnomer)
        attention_head_dim=heads[0] if len(set(heads)) == 1 else heads,
        use_linear_projection=c.use_linear_projection,
        norm_num_groups=c.norm_groups,
        transformer_layers_per_block=c.transformer_depth,
    )


def diffusers_unet(c: UNetConfig, sample_size: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(**diffusers_unet_config(c, sample_size))
