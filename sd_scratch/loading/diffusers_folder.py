"""The diffusers folder layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

Its UNet and VAE name their layers differently from the original file (`down_blocks.1.resnets.0.conv1`
for `input_blocks.4.0.in_layers.2`); the tables below rename every key to the original's, built
from a few loops over the block indices. The text encoder is transformers' CLIP, whose names are
ours. The configs are read off the renamed tensors as for a single file, with what the folder's
JSON files say beside the weights: the number of attention heads, the VAE's scaling factor, the text
encoder's activation, the image size, and the training noise schedule of `scheduler/`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import torch

from sd_scratch.conditioning import FOURIER_FEATURES
from sd_scratch.loading.configs import infer_text_encoder_config, infer_unet_config, infer_vae_config, meta_tensors
from sd_scratch.loading.int8_file import quantize_while_loading
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.single_file import SDXL_GUIDANCE
from sd_scratch.loading.strict import build_empty, fill_strictly
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.schedule import SD15_SCHEDULE, SPACINGS, ScheduleConfig
from sd_scratch.text_encoder import TextEncoder
from sd_scratch.tokenizer import PAD_EOS, PAD_ZERO, WEIGHTS_DIR, Tokenizer
from sd_scratch.unet import UNet
from sd_scratch.vae import VAE


def load_diffusers_folder(folder: Path, device, dtype, prediction_type: str | None,
                          low_memory: bool = False) -> StableDiffusion:
    """The networks of a diffusers folder, renamed to the original keys and filled strictly, with the
    tokenizers and the noise schedule the folder holds. SDXL's folders have `text_encoder_2/` and
    `tokenizer_2/` (the refiner's those alone).

    low_memory: 8-bit weights for the UNet and the text encoders, each quantised as it is read (int8_file.py).
    """
    text_slots = [slot for slot in ("text_encoder", "text_encoder_2") if (folder / slot).is_dir()]
    for part in ("unet", "vae"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder} is a folder but has no {part}/: give a diffusers model folder "
                                  "(unet/, vae/, text_encoder/, tokenizer/) or a single checkpoint file")
    if not text_slots:
        raise CheckpointError(f"{folder} is a folder but has no text_encoder/: give a diffusers model folder "
                              "(unet/, vae/, text_encoder/, tokenizer/) or a single checkpoint file")
    source = str(folder)
    fp16_first = dtype == torch.float16  # a folder holding both variants: the half-size read, when fp16 is asked
    unet_file = TensorFile(_weights_file(folder / "unet", "diffusion_pytorch_model", fp16_first))
    vae_file = TensorFile(_weights_file(folder / "vae", "diffusion_pytorch_model", fp16_first))
    text_files = {slot: TensorFile(_weights_file(folder / slot, "model", fp16_first)) for slot in text_slots}
    unet_json = _read_json(folder / "unet" / "config.json")
    vae_json = _read_json(folder / "vae" / "config.json")
    schedule, folder_prediction_type = read_scheduler_config(folder / "scheduler" / "scheduler_config.json")
    if unet_json.get("addition_embed_type") not in (None, "text_time") or unet_json.get(
            "addition_time_embed_dim") not in (None, FOURIER_FEATURES):
        raise CheckpointError(f"{folder}/unet/config.json names addition_embed_type "
                              f"{unet_json.get('addition_embed_type')!r} with addition_time_embed_dim "
                              f"{unet_json.get('addition_time_embed_dim')}: sd_scratch knows SDXL's 'text_time' of "
                              f"{FOURIER_FEATURES}")

    k = unet_file.keys
    levels = _count(k, r"down_blocks\.(\d+)\.")
    unet_names = rename_keys(k, diffusers_unet_prefixes(
        levels, _count(k, r"down_blocks\.0\.resnets\.(\d+)\."),
        {i for i in range(levels) if any(key.startswith(f"down_blocks.{i}.attentions.") for key in k)},
    ), {"resnets": UNET_RESNET_NAMES})
    vae_names = diffusers_vae_names(vae_file.keys)
    # transformers 4 saves CLIP under "text_model.", transformers 5 without it; ours keeps the original's level.
    # (SDXL's second encoder also has a `text_projection` beside it, named as ours.)
    text_names = {slot: {("" if key.startswith(("text_model.", "text_projection.")) else "text_model.") + key: key
                         for key in file.keys if not key.endswith("position_ids")}
                  for slot, file in text_files.items()}

    def shapes(file, names):
        return meta_tensors({ours: file.shape(theirs) for ours, theirs in names.items()})

    def loaders(file, names):  # our name -> a function reading their tensor, cast and moved
        return {ours: (lambda theirs=theirs: file.get(theirs, device, dtype)) for ours, theirs in names.items()}

    unet_config = infer_unet_config(shapes(unet_file, unet_names))
    heads = unet_json.get("num_attention_heads") or unet_json.get("attention_head_dim")
    if isinstance(heads, list) and len(set(heads)) > 1:  # SD 2.x, SDXL: a fixed head width, so more heads per level
        unet_config = dataclasses.replace(unet_config, num_heads=None, head_dim=unet_config.model_channels // heads[0])
    elif heads:
        heads = heads[0] if isinstance(heads, list) else heads
        unet_config = dataclasses.replace(unet_config, num_heads=heads, head_dim=None)
    if unet_json.get("norm_num_groups"):  # what no shape tells: 32 in every released model, not in ours (tiny)
        unet_config = dataclasses.replace(unet_config, norm_groups=unet_json["norm_num_groups"])
    vae_config = infer_vae_config(shapes(vae_file, vae_names))
    if vae_json.get("scaling_factor"):
        vae_config = dataclasses.replace(vae_config, scaling_factor=vae_json["scaling_factor"])
    if vae_json.get("norm_num_groups"):
        vae_config = dataclasses.replace(vae_config, norm_groups=vae_json["norm_num_groups"])
    text_configs = {}
    for slot, file in text_files.items():
        text_json = _read_json(folder / slot / "config.json")
        text_config = infer_text_encoder_config(shapes(file, text_names[slot]), text_json.get("hidden_act", "quick_gelu"))
        # the heads and the norms' epsilon, where config.json says (CLIP's: heads of 64 channels, 1e-5)
        text_configs[slot] = dataclasses.replace(
            text_config, heads=text_json.get("num_attention_heads") or text_config.heads,
            layer_norm_eps=text_json.get("layer_norm_eps") or text_config.layer_norm_eps)

    sdxl = unet_config.adm_in_channels is not None
    kind = ("SDXL" if "text_encoder" in text_slots else "SDXL refiner") if sdxl else \
        "SD 2.x" if unet_config.context_dim == 1024 else "SD 1.x"
    if unet_config.in_channels == 9:
        kind += " inpainting"
    def filled(network, name, tensor_loaders, quantize):  # with low_memory, the UNet and text encoders 8-bit
        if quantize:
            tensor_loaders = quantize_while_loading(network, tensor_loaders, device)
        return fill_strictly(network, name, tensor_loaders, device, dtype, source, kind)

    unet = filled(build_empty(UNet, unet_config), "UNet", loaders(unet_file, unet_names), low_memory)
    vae = filled(build_empty(VAE, vae_config), "VAE", loaders(vae_file, vae_names), False)
    text_encoders = {slot: filled(build_empty(TextEncoder, text_configs[slot]), slot.replace("_", " "),
                                  loaders(file, text_names[slot]), low_memory)
                     for slot, file in text_files.items()}

    def tokenizer(name):  # the folder's own, else ours; its pad is the folder's own
        has_files = any((folder / name / file).exists() for file in ("vocab.json", "tokenizer.json"))
        found = Tokenizer(folder / name if has_files else WEIGHTS_DIR)
        found.pad_token_id = found.bpe.pad_token_id if has_files else PAD_ZERO if name == "tokenizer_2" else PAD_EOS
        return found  # "<|endoftext|>" for SD 1.x and SDXL's first, "!" (id 0) for SD 2.x and SDXL's second

    image_size = unet_json.get("sample_size", 64) * vae_config.downsampling_factor
    # SDXL's folders keep every layer and read the penultimate (diffusers' hidden_states[-2]); SD 2.x folders
    # drop the last layer of OpenCLIP instead, so reading their last is reading the original's penultimate.
    skip_last_layers = 1 if sdxl else 0
    if sdxl:  # the family's Align Your Steps timesteps (schedule.py)
        schedule = dataclasses.replace(schedule, ays_family="sdxl")
    return StableDiffusion(tokenizer("tokenizer") if "text_encoder" in text_slots else None,
                           text_encoders.get("text_encoder"), unet, vae, kind,
                           prediction_type or folder_prediction_type, skip_last_layers, image_size, source, schedule,
                           defaults={"guidance": SDXL_GUIDANCE} if sdxl else {},
                           text_encoder_2=text_encoders.get("text_encoder_2"),
                           tokenizer_2=tokenizer("tokenizer_2") if "text_encoder_2" in text_slots else None)


# --------------------------------------------------------------------------------------------------
# scheduler/scheduler_config.json: the noise schedule the model was trained with

# What a scheduler config can say that would change the numbers, and that sd_scratch does not do.
UNSUPPORTED_SCHEDULER_SETTINGS = {
    "trained_betas": lambda value: value is not None,  # an explicit list of betas
    "rescale_betas_zero_snr": lambda value: bool(value),  # Lin et al. 2023's zero terminal SNR
    "thresholding": lambda value: bool(value),  # dynamic thresholding of x0 (Imagen)
}


def read_scheduler_config(path: Path) -> tuple[ScheduleConfig, str]:
    """The training schedule and prediction type a folder's scheduler config names.

    Keys it leaves out keep SD 1.x/2.x's values (those of SD15_SCHEDULE, and epsilon): v1.5's own
    file names no `timestep_spacing`, and the PNDM scheduler it was written for spaces "leading".
    The scheduler class it names is not read: sd_scratch's sampler is chosen with --sampler.
    Two values diffusers' SD 1.x/2.x pipelines overrule as outdated, and so do we: a `steps_offset`
    other than 1 (1 is the offset of the original sampler's timesteps) and `clip_sample` true.
    """
    config = _read_json(path)
    if config.get("steps_offset", 1) != 1:
        warnings.warn(f"{path} sets steps_offset {config['steps_offset']}: Stable Diffusion's samplers use 1 (so do "
                      "diffusers' pipelines, which overrule it too); using 1", stacklevel=2)
        config["steps_offset"] = 1
    for key, unsupported in UNSUPPORTED_SCHEDULER_SETTINGS.items():
        if unsupported(config.get(key)):
            raise CheckpointError(f"{path} sets {key} = {config[key]!r}, which sd_scratch does not implement")
    default = SD15_SCHEDULE
    schedule = ScheduleConfig(
        num_train_timesteps=config.get("num_train_timesteps", default.num_train_timesteps),
        beta_start=config.get("beta_start", default.beta_start),
        beta_end=config.get("beta_end", default.beta_end),
        beta_schedule=config.get("beta_schedule", default.beta_schedule),
        steps_offset=config.get("steps_offset", default.steps_offset),
        set_alpha_to_one=config.get("set_alpha_to_one", default.set_alpha_to_one),
        timestep_spacing=config.get("timestep_spacing", default.timestep_spacing),
    )
    prediction_type = config.get("prediction_type", "epsilon")
    known = {"beta_schedule": ("scaled_linear", "linear"), "timestep_spacing": SPACINGS,
             "prediction_type": ("epsilon", "v_prediction")}
    for key, values in known.items():
        value = prediction_type if key == "prediction_type" else getattr(schedule, key)
        if value not in values:
            raise CheckpointError(f"{path} names {key} {value!r}; sd_scratch knows {', '.join(values)}")
    return schedule, prediction_type


# --------------------------------------------------------------------------------------------------
# Renaming diffusers' UNet and VAE keys to the original ones

# Inside a residual block the two layouts name the same layers differently.
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                       "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # old and new diffusers names


def diffusers_unet_prefixes(levels: int, per_level: int, attention_levels: set[int]) -> dict[str, str]:
    """diffusers prefix -> original prefix for every block of the UNet.

    The original numbers blocks in one running sequence: input block 0 is conv_in, then each level has
    `per_level` residual(+transformer) blocks and, but for the last level, one downsample block.
    diffusers' up_blocks[i] is the original's level (levels - 1 - i), walked in the same order.
    """
    table = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",  # SDXL
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
             "mid_block.resnets.1.": "middle_block.2."}
    for level in range(levels):
        for j in range(per_level):
            block = 1 + level * (per_level + 1) + j
            table[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            table[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
        for j in range(per_level + 1):
            block = level * (per_level + 1) + j
            table[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            table[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            table[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op."
            upsample_index = 2 if (levels - 1 - level) in attention_levels else 1  # after the transformer, if any
            last_block = level * (per_level + 1) + per_level
            table[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{last_block}.{upsample_index}.conv."
    return table


def diffusers_vae_prefixes(levels: int, per_level: int) -> dict[str, str]:
    """diffusers prefix -> original prefix for every block of the VAE (the decoder's levels are numbered in reverse)."""
    table = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for side in ("encoder", "decoder"):
        table[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        table[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        table[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    for level in range(levels):
        up = levels - 1 - level
        for j in range(per_level + 1):
            table[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
            table[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        table[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
        table[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    return table


def diffusers_vae_names(keys: list[str]) -> dict[str, str]:
    """original key -> diffusers key for the tensors of a diffusers VAE (a folder's vae/, or a VAE file alone)."""
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    per_level = _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    return rename_keys(keys, diffusers_vae_prefixes(levels, per_level),
                       {"resnets": VAE_RESNET_NAMES, "attentions": VAE_ATTENTION_NAMES})


def rename_keys(keys: list[str], prefixes: dict[str, str], inner_names: dict[str, dict[str, str]]) -> dict[str, str]:
    """original key -> diffusers key. `inner_names` renames the layer inside a block, by the kind of block."""
    renamed = {}
    for key in keys:
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default="")
        rest = key[len(prefix):]
        for block_kind, names in inner_names.items():
            if block_kind in prefix:
                layer = max((n for n in names if rest.startswith(n + ".")), key=len, default=None)
                if layer:
                    rest = names[layer] + rest[len(layer):]
        renamed[prefixes.get(prefix, "") + rest] = key
    return renamed


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _weights_file(folder: Path, stem: str, fp16_first: bool = False) -> Path:
    variants = (".fp16", "") if fp16_first else ("", ".fp16")
    for name in [f"{stem}{variant}.{suffix}" for suffix in ("safetensors", "bin") for variant in variants]:
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder} holds no {stem}.safetensors (or .fp16.safetensors); the diffusers folder is incomplete")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); download it again") from None
