"""The diffusers and transformers twins of a checkpoint: the same weights in the reference implementations.

Our weights reach them as a real single file would: under the original layout's keys, through
diffusers' own converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`), loaded strictly. That the converters use every one of our tensors
and fill every parameter of theirs is the independent check of our reading of that layout.
(Also used by benchmarks/common.py.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.single_file import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sd_scratch.text_encoder import TextEncoderConfig
from sd_scratch.tokenizer import WEIGHTS_DIR
from sd_scratch.unet import UNetConfig
from sd_scratch.vae import VAEConfig


def diffusers_unet_config(c: UNetConfig, sample_size: int = 64) -> dict:
    levels = range(len(c.channel_mult))
    heads = [c.heads_and_dim(c.model_channels * m)[0] for m in c.channel_mult]
    assert c.depth(None) == c.depth(len(c.channel_mult) - 1), "diffusers' middle block has the last level's depth"
    sdxl = {} if c.adm_in_channels is None else dict(
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=c.adm_in_channels)
    return sdxl | dict(
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
        transformer_layers_per_block=c.transformer_depth if isinstance(c.transformer_depth, int) else
        [max(c.depth(level), 1) for level in levels],  # (1 where a level has no attention, as diffusers' SDXL config)
    )


def diffusers_vae_config(c: VAEConfig, sample_size: int = 64) -> dict:
    n = len(c.channel_mult)
    return dict(in_channels=c.in_channels, out_channels=c.out_channels, latent_channels=c.latent_channels,
                block_out_channels=tuple(c.base_channels * m for m in c.channel_mult),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=c.num_res_blocks, norm_num_groups=c.norm_groups, sample_size=sample_size,
                scaling_factor=c.scaling_factor)


def transformers_clip_config(c: TextEncoderConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_width,
                          num_hidden_layers=c.layers, num_attention_heads=c.heads,
                          max_position_embeddings=c.max_positions, hidden_act=c.activation,
                          layer_norm_eps=c.layer_norm_eps, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
                          projection_dim=c.width)


def clip_reference(c: TextEncoderConfig) -> CLIPTextModel:
    return CLIPTextModel(transformers_clip_config(c)).eval()


def vae_reference(c: VAEConfig) -> AutoencoderKL:
    return AutoencoderKL(**diffusers_vae_config(c)).eval()


def _under(original: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    return [tensor for key, tensor in original.items() if key.startswith(prefix)]


def unet_twin(original: dict[str, torch.Tensor], config: UNetConfig, sample_size: int = 64) -> UNet2DConditionModel:
    """diffusers' UNet holding the UNet of `original` (a single file's tensors, under their full keys)."""
    diffusers_config = diffusers_unet_config(config, sample_size)
    converted = convert_ldm_unet_checkpoint(original, diffusers_config)
    assert len(converted) == len(_under(original, UNET_PREFIX)), "diffusers' converter left some of our tensors unused"
    unet = UNet2DConditionModel(**diffusers_config)
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


def vae_twin(original: dict[str, torch.Tensor], config: VAEConfig) -> AutoencoderKL:
    """diffusers' AutoencoderKL holding the VAE of `original`."""
    diffusers_config = diffusers_vae_config(config)
    converted = convert_ldm_vae_checkpoint(original, diffusers_config)
    # Every one of our tensors is used exactly once (the attention weights come back as views of ours) ...
    assert {t.data_ptr() for t in converted.values()} == {t.data_ptr() for t in _under(original, VAE_PREFIX)}
    vae = AutoencoderKL(**diffusers_config)
    assert set(converted) == set(vae.state_dict())  # ... and every diffusers parameter is filled
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


def clip_twin(original: dict[str, torch.Tensor], config: TextEncoderConfig) -> CLIPTextModel:
    """transformers' CLIPTextModel holding the SD 1.x text encoder of `original`. transformers 5 keeps
    its layers without the `text_model.` level that the single file (and ours) has."""
    converted = convert_ldm_clip_checkpoint(original)
    clip = clip_reference(config)
    clip.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items() if "position_ids" not in k},
                         strict=True)
    assert len(_under(original, CLIP_PREFIX)) == len(clip.state_dict())
    return clip


@dataclass
class Twins:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def diffusers_twins(original: dict[str, torch.Tensor], unet: UNetConfig, vae: VAEConfig,
                    text_encoder: TextEncoderConfig, sample_size: int = 64) -> Twins:
    """The three networks of an SD 1.x single file (its tensors under their full keys), in diffusers and
    transformers."""
    return Twins(unet_twin(original, unet, sample_size), vae_twin(original, vae), clip_twin(original, text_encoder))


def pipeline_components(path, model, sample_size: int = 8) -> dict:
    """diffusers' pipeline components (unet, vae, text_encoder, tokenizer) holding the single file at `path`,
    which `model` is our loading of. A text encoder in OpenCLIP's layout (SD 2.x) reaches transformers' model
    as ours (the loader's reading of that layout is tested elsewhere)."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from sd_scratch.tokenizer import PAD_ZERO, WEIGHTS_DIR
    original = load_file(str(path))
    if any(key.startswith(CLIP_PREFIX) for key in original):
        clip = clip_twin(original, model.text_encoder.config)
    else:
        clip = clip_reference(model.text_encoder.config)
        clip.load_state_dict({k.removeprefix("text_model."): v for k, v in model.text_encoder.state_dict().items()})
    padding = {"pad_token": "!"} if model.tokenizer.pad_token_id == PAD_ZERO else {}  # SD 2.x pads with "!" (id 0)
    tokenizer = CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77, **padding)
    return dict(unet=unet_twin(original, model.unet.config, sample_size=sample_size),
                vae=vae_twin(original, model.vae.config), text_encoder=clip, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------
# SDXL (tests/test_sdxl.py): CLIP ViT-L under conditioner.embedders.0.transformer., OpenCLIP bigG under
# conditioner.embedders.1.model. (the refiner's under conditioner.embedders.0.model.)

def sdxl_clip_twin(original: dict[str, torch.Tensor], config: TextEncoderConfig) -> CLIPTextModel:
    """transformers' CLIPTextModel holding the SDXL base's CLIP ViT-L of `original`, through diffusers'
    convert_ldm_clip_checkpoint; every one of our tensors under the prefix used, every parameter filled."""
    from sd_scratch.loading.single_file import SDXL_CLIP_PREFIX
    converted = convert_ldm_clip_checkpoint(original)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if "position_ids" not in k}
    clip = clip_reference(config)
    assert len(converted) == len(_under(original, SDXL_CLIP_PREFIX)) == len(clip.state_dict())
    clip.load_state_dict(converted, strict=True)
    return clip


def openclip_twin(original: dict[str, torch.Tensor], config: TextEncoderConfig, prefix: str):
    """transformers' CLIPTextModelWithProjection holding the OpenCLIP tower (SDXL's bigG) under `prefix` of
    `original`, through diffusers' convert_open_clip_checkpoint. Every tensor under the prefix but CLIP's
    temperature `logit_scale` is used (each fused in_proj weight and bias cut in three), every parameter of
    theirs filled."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection
    clip_config = transformers_clip_config(config)
    clip_config.projection_dim = config.projection_dim
    clip = CLIPTextModelWithProjection(clip_config).eval()
    converted = convert_open_clip_checkpoint(clip, original, prefix=prefix)
    names = set(clip.state_dict())  # transformers 5 may keep or drop the `text_model.` level: fit either
    converted = {k if k in names else k.removeprefix("text_model."): v for k, v in converted.items()
                 if "position_ids" not in k}
    mine = _under(original, prefix)
    assert len(converted) == len(mine) - 1 + 4 * config.layers, "convert_open_clip_checkpoint left tensors unused"
    assert set(converted) == names, "convert_open_clip_checkpoint left parameters unfilled"
    clip.load_state_dict(converted, strict=True)
    return clip


def sdxl_pipeline_components(original: dict[str, torch.Tensor], model, sample_size: int = 8) -> dict:
    """diffusers' StableDiffusionXL(Img2Img)Pipeline components holding the SDXL base or refiner single file
    whose tensors are `original` (`model`: our loading of it): every network through diffusers' converters;
    the tokenizers ours as transformers' CLIPTokenizer, the second padding with "!" as OpenCLIP does."""
    from transformers import CLIPTokenizer

    from sd_scratch.loading.single_file import REFINER_OPENCLIP_PREFIX, SDXL_OPENCLIP_PREFIX
    from sd_scratch.tokenizer import WEIGHTS_DIR
    base = model.text_encoder is not None
    components = dict(
        unet=unet_twin(original, model.unet.config, sample_size=sample_size),
        vae=vae_twin(original, model.vae.config),
        text_encoder=sdxl_clip_twin(original, model.text_encoder.config) if base else None,
        tokenizer=CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77) if base else None,
        text_encoder_2=openclip_twin(original, model.text_encoder_2.config,
                                     SDXL_OPENCLIP_PREFIX if base else REFINER_OPENCLIP_PREFIX),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR), model_max_length=77, pad_token="!"),
    )
    return components


def write_diffusers_folder(single_file, folder, fp16=False, sample_size=4):
    """The model of `single_file` as a diffusers folder, written by diffusers' and transformers' save_pretrained."""
    model = load_checkpoint(single_file)
    twins = diffusers_twins(load_file(str(single_file)), model.unet.config, model.vae.config,
                            model.text_encoder.config, sample_size=sample_size)
    for part, network in [("unet", twins.unet), ("vae", twins.vae), ("text_encoder", twins.text_encoder)]:
        (network.half() if fp16 else network).save_pretrained(folder / part, variant="fp16" if fp16 else None)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    CLIPTokenizer.from_pretrained(str(WEIGHTS_DIR)).save_pretrained(folder / "tokenizer")
