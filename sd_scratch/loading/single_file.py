"""The original single-file layout (`v1-5-pruned-emaonly.safetensors`): read it, and write it.

One flat dict of tensors, each network under its prefix:

    model.diffusion_model.*                             the UNet
    first_stage_model.*                                 the VAE
    cond_stage_model.transformer.text_model.*           the CLIP text encoder (SD 1.x)
    cond_stage_model.model.*                            the OpenCLIP text encoder (SD 2.x)
    conditioner.embedders.0.transformer.text_model.*    SDXL base: CLIP ViT-L ...
    conditioner.embedders.1.model.*                     ... and OpenCLIP ViT-bigG
    conditioner.embedders.0.model.*                     SDXL refiner: OpenCLIP ViT-bigG alone

Our modules are built so that their state_dict keys *are* these keys without the prefix, so a single
file loads with no renaming, except the OpenCLIP towers (fused q/k/v, other layer names), which
`openclip_to_clip_keys` maps onto the CLIP layout. The configs are read off the tensors' shapes
(`configs.py`), or taken from the file's safetensors metadata when sd_scratch wrote it
(`save_checkpoint`, which the tiny model's training uses).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd_scratch.loading.configs import (infer_text_encoder_config, infer_unet_config, infer_vae_config, meta_tensors,
                                       misfits)
from sd_scratch.loading.int8_file import INT8_METADATA_KEY, load_int8_file, quantize_while_loading
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.strict import build_empty, fill_strictly, list_keys
from sd_scratch.loading.tensor_file import TensorFile
from sd_scratch.schedule import SD15_SCHEDULE
from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.tokenizer import PAD_EOS, PAD_ZERO, WEIGHTS_DIR, Tokenizer
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
# Where each kind of file keeps its text encoders: (our slot, prefix, layout). SDXL's slots follow diffusers':
# the refiner has no `text_encoder`, only `text_encoder_2`, the bigG tower that the base has second.
TEXT_ENCODERS = {
    "SD 1.x": [("text_encoder", CLIP_PREFIX, "clip")],
    "SD 2.x": [("text_encoder", OPENCLIP_PREFIX, "openclip")],
    "SDXL": [("text_encoder", SDXL_CLIP_PREFIX, "clip"), ("text_encoder_2", SDXL_OPENCLIP_PREFIX, "openclip")],
    "SDXL refiner": [("text_encoder_2", REFINER_OPENCLIP_PREFIX, "openclip")],
}
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE has SD's layout, and its latents another scale (no tensor says so)
SDXL_GUIDANCE = 5.0  # the guidance scale SDXL is usually run at (diffusers' and ComfyUI's examples use 5 to 7)
METADATA_KEY = "sd_scratch"  # safetensors metadata entry holding our configs as JSON
DEFAULT_CHECKPOINT = WEIGHTS_DIR / "tiny_sd.safetensors"  # the tiny model this project ships

# Tensors a single file carries that inference does not use, ignored on purpose (and only these).
IGNORED_KEYS = re.compile(
    r"^(model_ema\.|first_stage_model\.loss\.|"  # EMA copies (already folded in), the VAE's training loss
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$|"  # training schedule buffers
    # position_ids is a constant arange that some files store as float or with wrong values: we never read it
    r"(cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.embeddings\.position_ids$|"
    r"(cond_stage_model|conditioner\.embedders\.[01])\.model\.logit_scale$|"  # CLIP's contrastive temperature
    r"cond_stage_model\.model\.text_projection$|"  # SD 2.x: CLIP's contrastive head, unused (SDXL uses bigG's)
    r"denoiser\.(sigmas|log_sigmas)$)"  # sgm's (SDXL's) sampling buffer: the noise levels, computed by schedule.py
)


def load_single_file(path: Path, device, dtype, prediction_type: str | None, low_memory: bool = False) -> StableDiffusion:
    """The networks of an original single file, each filled strictly. The configs come from the file's
    metadata when sd_scratch wrote it, else from the shapes; the family (SD 1.x, 2.x, SDXL, SDXL refiner)
    is told by where the text encoders are.

    low_memory: 8-bit weights for the UNet and the text encoders, each quantised as it is read (int8_file.py).
    An 8-bit file of `python -m sd_scratch.quantize` is recognised by its metadata and loaded as it is.
    """
    file = TensorFile(path)
    if INT8_METADATA_KEY in file.metadata:
        return load_int8_file(file, device, dtype, prediction_type)
    keys = file.keys
    kind = identify(keys, path)
    encoders = TEXT_ENCODERS[kind]
    prefixes = (UNET_PREFIX, VAE_PREFIX, *(prefix for _, prefix, _ in encoders))
    leftover = sorted(k for k in keys if not k.startswith(prefixes) and not IGNORED_KEYS.match(k))
    if leftover:
        raise CheckpointError(
            f"{path}: {len(leftover)} tensors belong to no part of {kind} ({list_keys(leftover)}); "
            "merge LoRAs or other add-ons into the checkpoint first"
        )

    keep_projection = kind.startswith("SDXL")  # SDXL reads bigG's pooled output
    texts = {slot: (prefix, layout) for slot, prefix, layout in encoders}
    # Our configs: from the file's metadata, or, for the shipped tiny model's tensors saved without it,
    # from the shipped file's (its group norms and heads are in no tensor's shape, and are not SD's).
    stored = json.loads(file.metadata[METADATA_KEY]) if METADATA_KEY in file.metadata else shipped_configs_for(file)
    if stored:
        unet_config = UNetConfig(**_tuples(stored["unet"]))
        vae_config = VAEConfig(**_tuples(stored["vae"]))
        text_configs = {slot: TextEncoderConfig(**_tuples(stored[slot])) for slot in texts}
    else:
        shapes = meta_tensors({k: file.shape(k) for k in keys})
        unet_config = infer_unet_config(_strip(shapes, UNET_PREFIX))
        vae_config = infer_vae_config(_strip(shapes, VAE_PREFIX))
        if kind.startswith("SDXL"):
            vae_config = dataclasses.replace(vae_config, scaling_factor=SDXL_SCALING_FACTOR)
        text_configs = {}
        for slot, (prefix, layout) in texts.items():
            found = _strip(shapes, prefix)
            if layout == "openclip":
                found = openclip_to_clip_keys(found, keep_projection)
            text_configs[slot] = infer_text_encoder_config(found, "quick_gelu" if layout == "clip" else "gelu")
        if problems := misfits(unet_config, vae_config, *text_configs.values()):
            widths = " and ".join(str(c.width) for c in text_configs.values())
            raise CheckpointError(
                f"{path} carries no sd_scratch config and its shapes fit no family sd_scratch knows: read as "
                f"{kind} with a UNet of {unet_config.model_channels} x {unet_config.channel_mult} channels, a VAE of "
                f"{vae_config.base_channels} x {vae_config.channel_mult} and text encoders {widths} wide, but "
                f"{'; '.join(problems)}; its configs must come with it: write the networks with "
                f"sd_scratch.loading.save_checkpoint, which stores them in the safetensors metadata"
            )
    if unet_config.in_channels == 9:
        kind += " inpainting"  # latents + mask + masked-image latents

    def loaders(prefix):  # our name -> a function reading the tensor, cast and moved
        return {key[len(prefix):]: (lambda key=key: file.get(key, device, dtype))
                for key in keys if key.startswith(prefix) and not IGNORED_KEYS.match(key)}

    if torch.device(device).type == "cpu" and not low_memory:
        # The weights stored in `dtype` will be the file's own pages: read them ahead for a cold start
        # (TensorFile.prefetch). The VAE first (0.3 GB; measured, the load itself then slowed less: 0.6-0.8 s
        # against 0.8-2.2 s with the VAE last), then the text encoders, then the UNet. (Weights cast are read
        # by the load itself, and a thread beside it only slowed it.)
        views = [key for key in keys if file.stored_dtype(key) == dtype]
        text_prefixes = tuple(prefix for prefix, _ in texts.values())
        file.prefetch([key for key in views if key.startswith(VAE_PREFIX)],
                      [key for key in views if key.startswith(text_prefixes)],
                      [key for key in views if not key.startswith((VAE_PREFIX, *text_prefixes))])
    unet, unet_loaders = build_empty(UNet, unet_config), loaders(UNET_PREFIX)
    if low_memory:
        unet_loaders = quantize_while_loading(unet, unet_loaders, device)
    unet = fill_strictly(unet, "UNet", unet_loaders, device, dtype, str(path), kind)
    vae = fill_strictly(build_empty(VAE, vae_config), "VAE", loaders(VAE_PREFIX), device, dtype, str(path), kind)
    text_encoders = {}
    for slot, (prefix, layout) in texts.items():
        tensor_loaders = loaders(prefix) if layout == "clip" else openclip_loaders(file, prefix, device, dtype,
                                                                                  keep_projection)
        encoder = build_empty(TextEncoder, text_configs[slot])
        if low_memory:
            tensor_loaders = quantize_while_loading(encoder, tensor_loaders, device)
        text_encoders[slot] = fill_strictly(encoder, slot.replace("_", " "), tensor_loaders, device, dtype, str(path),
                                            kind)

    sdxl = kind.startswith("SDXL")
    openclip_only = kind.startswith(("SD 2.x", "SDXL refiner"))
    if stored:
        prediction_type = prediction_type or stored.get("prediction_type", "epsilon")
        skip_last_layers = stored.get("skip_last_layers", 0)
        pad = stored.get("pad_token_id", PAD_EOS)
        image_size = stored.get("image_size", 512)
    else:
        # SD 2.x single files do not say whether they are v-prediction (768-v) or epsilon (512-base);
        # like diffusers, assume the 768-v model and let the user say otherwise. SDXL predicts the noise.
        prediction_type = prediction_type or ("v_prediction" if kind.startswith("SD 2.x") else "epsilon")
        skip_last_layers = 1 if kind.startswith(("SD 2.x", "SDXL")) else 0  # both read the penultimate layer
        pad = PAD_ZERO if openclip_only else PAD_EOS  # the first text encoder's padding
        image_size = 1024 if sdxl else 768 if prediction_type == "v_prediction" else 512
    defaults = stored.get("defaults", {}) if stored else {"guidance": SDXL_GUIDANCE} if sdxl else {}
    tokenizer = Tokenizer(WEIGHTS_DIR, pad_token_id=pad)
    # SDXL's second tokenizer is the first with OpenCLIP's padding (id 0); the refiner has only that one.
    tokenizer_2 = Tokenizer(WEIGHTS_DIR, pad_token_id=PAD_ZERO) if "text_encoder_2" in text_encoders else None
    return StableDiffusion(None if kind.startswith("SDXL refiner") else tokenizer, text_encoders.get("text_encoder"),
                           unet, vae, kind, prediction_type, skip_last_layers, image_size, str(path),
                           schedule=dataclasses.replace(SD15_SCHEDULE, ays_family="sdxl") if sdxl else SD15_SCHEDULE,
                           defaults=defaults, text_encoder_2=text_encoders.get("text_encoder_2"),
                           tokenizer_2=tokenizer_2)


def shipped_configs_for(file: TensorFile) -> dict | None:
    """The shipped tiny model's stored configs, if `file` holds tensors of exactly its names and shapes."""
    if not DEFAULT_CHECKPOINT.exists():
        return None
    with open(DEFAULT_CHECKPOINT, "rb") as f:
        entries, _ = TensorFile.read_header(DEFAULT_CHECKPOINT, f.read(8))
    metadata = entries.pop("__metadata__", None) or {}
    if METADATA_KEY not in metadata or set(entries) != set(file.keys):
        return None
    if any(tuple(entry["shape"]) != file.shape(key) for key, entry in entries.items()):
        return None
    return json.loads(metadata[METADATA_KEY])


def identify(keys: list[str], path: Path) -> str:
    """Name the kind of checkpoint from its keys, or explain what it seems to be instead."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    for kind, encoders in TEXT_ENCODERS.items():
        if has(UNET_PREFIX) and has(VAE_PREFIX) and all(has(prefix) for _, prefix, _ in encoders):
            return kind
    if has(UNET_PREFIX):
        parts = [name for name, prefix in [("VAE", VAE_PREFIX), ("text encoders", "cond_stage_model."),
                                           ("text encoders", "conditioner.")] if has(prefix)]
        missing = [name for name in ("VAE", "text encoders") if name not in parts]
        raise CheckpointError(
            f"{path} holds a UNet but no {' and no '.join(missing)}: a partial checkpoint (a UNet on its own, as "
            "some fine-tunes are shared); give the full model file, or a diffusers folder"
        )
    if has("down_blocks.") and has("conv_in."):
        what = "a diffusers UNet or VAE file on its own"
    elif has("text_model.") or has("encoder.layers."):
        what = "a CLIP text encoder on its own"
    elif has("encoder.down.") or has("decoder.up."):
        what = "a VAE on its own"
    elif any("lora" in k for k in keys):
        what = "a LoRA, not a full model (give it with --lora)"
    else:
        what = f"an unknown model (keys like {list_keys(sorted(keys), 3)})"
    raise CheckpointError(
        f"{path} does not hold a full Stable Diffusion model: it looks like {what}; give a whole SD 1.x/2.x or "
        "SDXL checkpoint file or a diffusers folder"
    )


def _strip(tensors: dict, prefix: str) -> dict:
    """The entries under `prefix`, without it, leaving out the ones ignored on purpose."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and not IGNORED_KEYS.match(k)}


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------------
# SD 2.x's OpenCLIP text tower, renamed onto our CLIP layout

# OpenCLIP name fragment -> our name fragment. Applied in order to every key.
OPENCLIP_RENAMES = [
    ("token_embedding.", "embeddings.token_embedding."),
    ("positional_embedding", "embeddings.position_embedding.weight"),  # a bare Parameter in OpenCLIP
    ("transformer.resblocks.", "encoder.layers."),
    (".ln_1.", ".layer_norm1."),
    (".ln_2.", ".layer_norm2."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
    ("ln_final.", "final_layer_norm."),
]
# CLIP's contrastive head: the softmax temperature, never used by Stable Diffusion, and the end token's
# projection into the image-text space, which SD 2.x does not use and SDXL does (its pooled output).
OPENCLIP_UNUSED = {"logit_scale"}


def openclip_to_clip_keys(state_dict: dict[str, torch.Tensor], keep_projection: bool = False) -> dict[str, torch.Tensor]:
    """Rename an OpenCLIP text tower (keys without its prefix, e.g. `cond_stage_model.model.`) to our key names.

    OpenCLIP's attention is torch's nn.MultiheadAttention, which stores q, k and v stacked in one
    `in_proj_weight` of shape (3 * width, width) (and one `in_proj_bias`): we cut it in thirds.
    `logit_scale` is dropped, and `text_projection` too unless `keep_projection` (SDXL): OpenCLIP stores it
    as the matrix P of `x @ P`, (width, projection), and ours is a Linear, whose weight is P transposed.
    Keys we do not know pass through renamed as far as the table goes, so a strict load names them.
    """
    return {ours: openclip_part(state_dict[theirs], part)
            for ours, (theirs, part) in openclip_names(list(state_dict), keep_projection).items()}


def openclip_names(keys: list[str], keep_projection: bool = False) -> dict[str, tuple[str, int | str | None]]:
    """our name -> (OpenCLIP's name, part): part 0, 1 or 2 is q, k or v's third of a fused in_proj, "t" the
    transposed projection, None the tensor as it is (openclip_to_clip_keys has the rules)."""
    ours = {}
    for key in keys:
        if key in OPENCLIP_UNUSED or (key == "text_projection" and not keep_projection):
            continue
        if key == "text_projection":
            ours["text_projection.weight"] = (key, "t")
            continue
        name = key
        for old, new in OPENCLIP_RENAMES:
            name = name.replace(old, new)
        if ".attn.in_proj_" in name:  # e.g. encoder.layers.3.attn.in_proj_weight
            layer, kind = name.split(".attn.in_proj_")  # kind: "weight" or "bias"
            for third, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                ours[f"text_model.{layer}.self_attn.{projection}.{kind}"] = (key, third)
        else:
            ours["text_model." + name] = (key, None)
    return ours


def openclip_part(tensor: torch.Tensor, part: int | str | None) -> torch.Tensor:
    """The piece `part` of an OpenCLIP tensor (openclip_names), as a view."""
    if part == "t":
        return tensor.t()
    return tensor if part is None else tensor.chunk(3, dim=0)[part]


def openclip_loaders(file: TensorFile, prefix: str, device, dtype, keep_projection: bool) -> dict:
    """our name -> a function reading its piece of the OpenCLIP tower under `prefix`: cut from a view of the file,
    then cast and moved (so a third of a fused q, k, v is copied at its own size), and the file's pages of that
    tensor handed back once a copy is made, as TensorFile.get hands them back for the other networks."""
    keys = [key[len(prefix):] for key in file.keys if key.startswith(prefix) and not IGNORED_KEYS.match(key)]

    def load(theirs, part):
        piece = openclip_part(file.get(prefix + theirs), part).to(device=device, dtype=dtype)
        if not file.holds(piece):
            file.release(prefix + theirs)  # (a later third reads them again, from the OS's cache)
        return piece

    return {ours: (lambda theirs=theirs, part=part: load(theirs, part))
            for ours, (theirs, part) in openclip_names(keys, keep_projection).items()}


# --------------------------------------------------------------------------------------------------
# Writing a single file (the tiny model's training, and the tests)


def save_checkpoint(path: str | Path, text_encoder: TextEncoder, unet: UNet, vae: VAE, *,
                    prediction_type: str = "epsilon", skip_last_layers: int = 0, pad_token_id: int = PAD_EOS,
                    image_size: int = 512, defaults: dict | None = None) -> None:
    """Write the three networks in the original single-file layout, their configs in the metadata.

    defaults: the sampling settings the model is best used with, which the command line takes when the
    user gives none (the tiny model: {"guidance": 3.0}).
    """
    tensors = {}
    for prefix, model in [(UNET_PREFIX, unet), (VAE_PREFIX, vae), (CLIP_PREFIX, text_encoder)]:
        tensors.update({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()})
    configs = {
        "unet": dataclasses.asdict(unet.config), "vae": dataclasses.asdict(vae.config),
        "text_encoder": dataclasses.asdict(text_encoder.config),
        "prediction_type": prediction_type, "skip_last_layers": skip_last_layers, "pad_token_id": pad_token_id,
        "image_size": image_size, "defaults": defaults or {},
    }
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(configs)})
