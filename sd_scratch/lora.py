"""LoRA: a low-rank change to the weights of a network, read from the files people download and merged in.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") fine-tunes a layer of
weight W (out x in) without touching W: it trains two thin matrices, down (rank x in) and up (out x rank),
and the layer computes with

    W' = W + multiplier * (alpha / rank) * up @ down

where rank is down's number of rows (4 to 128, against SD's 320 to 1280 channels), alpha a number
stored with the layer (missing: alpha = rank, so the factor is 1) and multiplier what the user asks
for (`--lora FILE:0.7`, `<lora:NAME:0.7>`). A convolution's LoRA ("LoCon") is the same with down a
convolution of the layer's kernel (rank x in x k x k) and up a 1x1 one, flattened to matrices.

The files name layers in one of two ways, and in each way after one of two module trees:
  kohya / AUTOMATIC1111   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
                          (.lora_up.weight, .alpha); lora_te_text_model_encoder_layers_0_self_attn_q_proj...
  diffusers / PEFT        unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                          (lora_B; older files lora.down / lora.up); text_encoder.text_model.encoder...
The UNet's layers are named after diffusers' module tree (down_blocks, resnets.0.conv1) in most files
and after the original's (input_blocks.1.0.in_layers.2) in some (kohya trains SDXL on the original's
tree); the text encoders' after transformers' CLIP, which is ours. Our UNet keeps the original's tree, so
`layer_names` builds, from the diffusers folder's renaming tables, every name a file may use for each of
our layers.

Each text encoder has its prefix, and the prefixes tell the model family a file was made for:
                 UNet                  first text encoder (CLIP ViT-L / H)    SDXL's second (OpenCLIP bigG)
  SD 1.x, 2.x    lora_unet_  unet.     lora_te_   text_encoder.               -
  SDXL           lora_unet_  unet.     lora_te1_  text_encoder.               lora_te2_  text_encoder_2.
The SDXL refiner has the second text encoder alone (lora_te2_, text_encoder_2.).

Reading is strict: every key of the file must be a part of a layer this model has, with the shape that
layer's weight has, or the file is refused with the keys named. Applying merges the changes into copies
of the touched weights only (the rest stays memory-mapped from the checkpoint) and keeps the original
tensors, so that removing puts back the very same weights, bit for bit.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd_scratch.loading.diffusers_folder import UNET_RESNET_NAMES, diffusers_unet_prefixes
from sd_scratch.loading.embeddings import short_hash
from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.strict import list_keys
from sd_scratch.loading.tensor_file import TensorFile, why_refused
from sd_scratch.quantize import is_quantized

# network -> (kohya prefix, PEFT prefix), by model family; the network is the model's attribute of that name
SD_NETWORKS = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te_", "text_encoder.")}
SDXL_NETWORKS = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te1_", "text_encoder."),
                 "text_encoder_2": ("lora_te2_", "text_encoder_2.")}
SD_FAMILY, SDXL_FAMILY = "SD 1.x or 2.x", "SDXL"
# The width of the context a UNet's cross-attention reads (attn2.to_k's input) -> the family, to name the family
# of a UNet-only file that does not fit.
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
# The parts of one layer's LoRA, by the name a file gives them: down (A), up (B), alpha.
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
         "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up"}
# Parts of other kinds of adapter, refused by name: what they are, for the message.
OTHER_ADAPTERS = {"dora_scale": "DoRA (weight-decomposed LoRA)", "lora_mid.weight": "LoCon with a Tucker core (CP)",
                  "diff": "a full weight difference", "diff_b": "a full weight difference",
                  "hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "oft_": "OFT (LyCORIS)"}  # the last three: prefixes
PART_NAMES_LONGEST_FIRST = sorted([*PARTS, *OTHER_ADAPTERS], key=len, reverse=True)  # "lora.down.weight" first


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model; the message names the keys and what to do."""


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One layer's low-rank change: network ("unet", "text_encoder", "text_encoder_2"), our module path inside it."""

    network: str
    module: str
    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """(alpha / rank) * up @ down, in float32, in the shape of the layer's weight."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (product * (self.alpha / self.rank)).reshape(shape)


@dataclass(frozen=True, eq=False)  # one Lora is one file read once: compared by identity
class Lora:
    """A LoRA file read for one model. `name` is what prompts call it by (the file's name without suffix)."""

    name: str
    path: Path
    layers: tuple[LoraLayer, ...]

    @functools.cached_property
    def short_hash(self) -> str:
        """The hash AUTOMATIC1111 writes in "Lora hashes": sha256 of the file, first 12 hex digits."""
        return short_hash(self.path)


# --------------------------------------------------------------------------------------------------
# Every name a file may give each of our layers


def layer_names(model: StableDiffusion) -> dict[str, tuple[str, str]]:
    """name in a file -> (network, our module path), for every linear and convolution layer of the UNet and
    the text encoders, in the four spellings above (kohya and PEFT, each after both UNet trees)."""
    names = {}
    for network, (kohya_prefix, peft_prefix) in model_networks(model).items():
        for ours, theirs in module_paths(model, network).items():
            for path in {ours, theirs}:
                names[kohya_prefix + path.replace(".", "_")] = (network, ours)
                names[peft_prefix + path] = (network, ours)
    return names


def model_networks(model: StableDiffusion) -> dict[str, tuple[str, str]]:
    """The networks of `model` a LoRA may change, with their prefixes: {network: (kohya prefix, PEFT prefix)}."""
    networks = SDXL_NETWORKS if model.is_sdxl else SD_NETWORKS
    return {network: prefixes for network, prefixes in networks.items() if getattr(model, network) is not None}


def module_paths(model: StableDiffusion, network: str) -> dict[str, str]:
    """our module path -> diffusers' (transformers' for the text encoders: the same, text_projection included),
    for every layer with a weight matrix or kernel."""
    modules = getattr(model, network)
    ours = [name for name, module in modules.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    if network != "unet":
        return {name: name for name in ours}
    config = model.unet.config
    levels = len(config.channel_mult)
    # diffusers' table renames their prefixes to ours: turned around, it names ours in theirs
    to_diffusers = {original: diffusers for diffusers, original in diffusers_unet_prefixes(
        levels, config.num_res_blocks, set(config.attention_levels)).items()}
    resnet_names = {original: diffusers for diffusers, original in UNET_RESNET_NAMES.items()}
    paths = {}
    for name in ours:
        prefix = max((p for p in to_diffusers if (name + ".").startswith(p)), key=len, default="")
        rest = (name + ".")[len(prefix):].rstrip(".")
        theirs = to_diffusers.get(prefix, "")
        if "resnets" in theirs:
            layer = max((n for n in resnet_names if rest == n or rest.startswith(n + ".")), key=len, default=None)
            rest = resnet_names[layer] + rest[len(layer):] if layer else rest
        paths[name] = (theirs + rest).rstrip(".")
    return paths


# --------------------------------------------------------------------------------------------------
# Reading a file, strictly


def load_lora(path: str | Path, model: StableDiffusion) -> Lora:
    """The LoRA file at `path` (.safetensors, or a weights-only .pt / .ckpt pickle), read for `model`."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    refuse_8_bit(model, path.name)
    try:
        file = TensorFile(path)
    except CheckpointError as error:  # the reader's reason, without its advice about checkpoints
        raise LoraError(f"{str(error).split(';')[0]}; download the LoRA again, or give its .safetensors file") from None
    except OSError as error:
        raise LoraError(f"{path} cannot be read as a LoRA file ({why_refused(error)})") from None
    grouped, unknown = defaultdict(dict), []
    for key in file.keys:
        layer, part = split_key(key)
        if part is not None and part not in PARTS:
            kind = next(kind for name, kind in OTHER_ADAPTERS.items() if part.startswith(name))
            raise LoraError(f"{path.name} holds {kind} ({key}), which sd_scratch does not apply; only plain LoRA "
                            "and LoCon layers (lora_down / lora_up / alpha, or lora_A / lora_B) are supported")
        if part is None:
            unknown.append(key)
        else:
            grouped[layer][PARTS[part]] = key
    if unknown:
        raise LoraError(f"{path.name} has keys that are not parts of a LoRA layer: {list_keys(unknown)}")
    family, evidence = family_by_names(grouped)
    if family is not None and family != (SDXL_FAMILY if model.is_sdxl else SD_FAMILY):
        raise LoraError(f"{path.name} is a LoRA for {family} ({evidence}), and this model is {model.kind}: use "
                        f"a LoRA made for {model.kind}")
    names = layer_names(model)
    missing = [layer for layer in grouped if layer not in names]
    if model.text_encoder is None and any(layer.startswith(("lora_te1_", "text_encoder.")) for layer in missing):
        raise LoraError(f"{path.name} changes SDXL's first text encoder (lora_te1_ / text_encoder.), which "
                        f"{model.kind} does not have (it has the second alone): use a LoRA made for the refiner")
    if missing:
        raise LoraError(f"{path.name} changes layers that {model.kind} does not have "
                        f"({family_by_context(file, grouped, model)}): {list_keys(missing)}")
    layers = []
    for layer, parts in grouped.items():
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{path.name}: layer {layer} has no {'up' if 'down' in parts else 'down'} weight")
        network, module = names[layer]
        down, up = file.get(parts["down"]), file.get(parts["up"])
        alpha = float(file.get(parts["alpha"]).float()) if "alpha" in parts else float(down.shape[0])  # kohya's rule
        weight = getattr(model, network).get_submodule(module).weight
        if up.shape[1] != down.shape[0] or up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
            raise LoraError(f"{path.name}: layer {layer} is up {tuple(up.shape)} @ down {tuple(down.shape)}, but "
                            f"{model.kind}'s weight there is {tuple(weight.shape)} "
                            f"({family_by_context(file, grouped, model)})")
        layers.append(LoraLayer(network, module, down, up, alpha))
    return Lora(path.stem, path, tuple(layers))


def refuse_8_bit(model: StableDiffusion, name: str) -> None:
    """A LoRA is merged into float weights; 8-bit ones (quantize.py) would have to be quantised again, its change
    rounded to their grid (often coarser than the change itself). Refused rather than done badly."""
    if any(is_quantized(getattr(model, network)) for network in model_networks(model)):
        raise LoraError(f"{name}: this model's weights are 8-bit (low-memory mode, or a file of sd_scratch.quantize), "
                        "and a LoRA is merged into float weights: load the float checkpoint to use it")


def family_by_names(layers: dict) -> tuple[str | None, str]:
    """The model family a file's layer names tell (SD_FAMILY or SDXL_FAMILY) and how they tell it; (None, "")
    when they could be either's (a UNet-only file, or PEFT's text_encoder. with nothing beside it)."""
    if any(layer.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for layer in layers):
        return SDXL_FAMILY, "it changes two text encoders"
    if any(layer.startswith("lora_te_") for layer in layers):
        return SD_FAMILY, "it changes one text encoder, lora_te_"
    if any("label_emb" in layer or "add_embedding" in layer for layer in layers):
        return SDXL_FAMILY, "it changes the label_emb that embeds SDXL's sizes and pooled text"
    return None, ""


def family_by_context(file: TensorFile, layers: dict, model: StableDiffusion) -> str:
    """For a file that does not fit `model`: the family its cross-attention's context width names, when it is a
    known one and not the model's own, as the reason to give (a UNet-only file has nothing else to tell it by)."""
    shapes = [file.shape(parts["down"]) for layer, parts in layers.items()
              if re.search(r"attn2[._]to_k$", layer) and "down" in parts]
    widths = {shape[1] for shape in shapes if len(shape) == 2}  # down: (rank, context width)
    if len(widths) != 1 or next(iter(widths)) not in set(CONTEXT_FAMILIES) - {model.unet.config.context_dim}:
        return "a LoRA for another kind of model?"
    width = widths.pop()
    return (f"a LoRA for another kind of model: its cross-attention reads a context {width} wide, as "
            f"{CONTEXT_FAMILIES[width]}'s does")


def split_key(key: str) -> tuple[str, str | None]:
    """A file's key -> (the layer's name, the part's name), e.g. ("lora_unet_..._to_q", "lora_down.weight");
    part None when the key is no part of a LoRA layer."""
    for part in PART_NAMES_LONGEST_FIRST:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    match = re.match(r"(.*)\.((?:hada|lokr|oft)_[\w.]+)$", key)  # the parts of LyCORIS' other adapters
    if match:
        return match.group(1), match.group(2)
    return key, None


# --------------------------------------------------------------------------------------------------
# Applying and removing


@dataclass
class AppliedLoras:
    """LoRAs merged into a model's weights; `remove()` (or leaving the `with` block) puts the originals back."""

    model: StableDiffusion
    originals: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (network, module) -> weight

    def remove(self) -> None:
        for (network, module), original in self.originals.items():
            getattr(self.model, network).get_submodule(module).weight.data = original
        self.originals = {}
        self.model.loras = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_loras(model: StableDiffusion, loras: list[tuple[Lora, float]]) -> AppliedLoras:
    """Merge each (LoRA, multiplier) into `model`: W' = W + sum of multiplier * (alpha / rank) * up @ down
    over the LoRAs that change W, computed in float32 and stored in W's dtype. Only the changed weights are
    copied; the originals are kept for `remove()`. One set of LoRAs at a time."""
    if model.loras:
        raise ValueError("this model already has LoRAs applied: remove them first (AppliedLoras.remove)")
    for lora, _ in loras:
        refuse_8_bit(model, lora.name)
    changes = defaultdict(list)  # (network, module) -> [(layer, multiplier), ...]
    for lora, multiplier in loras:
        for layer in lora.layers:
            changes[(layer.network, layer.module)].append((layer, multiplier))
    applied, threads = AppliedLoras(model), torch.get_num_threads()
    # One thread: W + s * up @ down is bound by memory (rank 4 to 128 against 320 to 5120 channels), and a second
    # OpenMP thread made it 5 to 10 times slower on a busy 2-core machine (benchmarks/results/lora_apply.md).
    torch.set_num_threads(1)
    try:
        for (network, module), layers in changes.items():
            weight = getattr(model, network).get_submodule(module).weight
            merged = weight.detach().flatten(1).float()
            for i, (layer, multiplier) in enumerate(layers):
                # LoraLayer.delta's sum, fused: W + s * up @ down in one pass over W (the first makes the copy)
                up, down = (t.to(weight.device, torch.float32).flatten(1) for t in (layer.up, layer.down))
                scale = multiplier * layer.alpha / layer.rank
                merged = torch.addmm(merged, up, down, alpha=scale) if i == 0 else merged.addmm_(up, down, alpha=scale)
            applied.originals[(network, module)] = weight.data
            weight.data = merged.reshape(weight.shape).to(weight.dtype)
    finally:
        torch.set_num_threads(threads)
    model.loras = list(loras)
    return applied
