"""8-bit weights while loading: sd_scratch's 8-bit file (`python -m sd_scratch.quantize`), read and written, and
a float checkpoint quantised as it is read (`low_memory=True`).

The 8-bit file is a .safetensors file holding each network of the model under the name of its attribute in
StableDiffusion, with the keys of its module tree (the original single file's, for the UNet, the VAE and CLIP),
so that a tensor in the header is found in the code by its name:

    unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight         I8   [320, 320]   q
    unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight_scale   F32  [320]        one per output channel
    unet.input_blocks.1.0.in_layers.0.weight                             F32  [320]        a norm: float
    vae.decoder.conv_in.weight                                           F32  [512, 4, 3, 3]   the VAE: float
    text_encoder.text_model.encoder.layers.0.mlp.fc1.weight              I8   [3072, 768]
    text_encoder_2.*                                                     SDXL's second text encoder

An 8-bit layer is the pair `X.weight` (int8, the float weight's shape) and `X.weight_scale` (quantize.py has the
arithmetic): the file says which layers are 8-bit by holding their scales, and the loader builds those layers
8-bit and fills every tensor strictly. The float tensors are float32 (the model as the command loaded it). The
safetensors metadata entry `sd_scratch_int8` marks the file, and holds as JSON what no tensor says: the format's
version, each network's config, and the model's facts (kind, prediction type, layers skipped, image size,
training schedule, default settings, the tokenizers' padding). The tokenizers are the CLIP vocabulary this
project ships (weights/), which every SD model uses.

Reading maps the file, as for any single file: the int8 weights are not copied, and `release_weights` hands
their pages back once a network has done its part of a run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import torch
from torch import nn

from sd_scratch.loading.model import CheckpointError, StableDiffusion
from sd_scratch.loading.strict import build_empty, fill_strictly, list_keys
from sd_scratch.loading.tensor_file import TensorFile, release_view, safetensors_header
from sd_scratch.quantize import layers_to_quantize, quantize_weight, swap_to_int8
from sd_scratch.schedule import ScheduleConfig
from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.tokenizer import WEIGHTS_DIR, Tokenizer
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig

INT8_METADATA_KEY = "sd_scratch_int8"  # the safetensors metadata entry that marks the file
FORMAT_VERSION = 1
# StableDiffusion's networks: the attribute, which is also the file's prefix -> (network, config) classes
NETWORKS = {"unet": (UNet, UNetConfig), "vae": (VAE, VAEConfig), "text_encoder": (TextEncoder, TextEncoderConfig),
            "text_encoder_2": (TextEncoder, TextEncoderConfig)}
TOKENIZERS = ("tokenizer", "tokenizer_2")


def quantize_while_loading(network: nn.Module, loaders: dict[str, Callable[[], torch.Tensor]], device) -> dict:
    """A loader's low_memory: make `network`'s big layers (quantize.layers_to_quantize) 8-bit, `network` being
    built empty (on the meta device), and return its tensor loaders with each such layer's float weight read,
    quantised and dropped: its q and scale are what the loaders give. The file's pages of the float weight are
    handed back at once, so the float weights of the network are never all in memory, one at a time at most.

    The q of all the layers share one block of memory, allocated at once on `device`: when the network's weights
    are freed (free_weights) the block goes back to the OS whole. (Allocated one by one, they came from the
    allocator's heap, interleaved with other allocations, and freeing them handed nothing back.)"""
    layers = [name for name in layers_to_quantize(network) if f"{name}.weight" in loaders]  # (else a strict error)
    swap_to_int8(network, layers)
    shapes = {layer: network.get_submodule(layer).weight.shape for layer in layers}
    block = torch.empty(sum(shape.numel() for shape in shapes.values()), dtype=torch.int8, device=device)
    places, start = {}, 0
    for layer, shape in shapes.items():
        places[layer] = block[start:start + shape.numel()].view(shape)
        start += shape.numel()
    del block  # (its memory lives as long as a q in it does)
    waiting = {}  # layer -> what of {"weight": q, "weight_scale": scale} is not taken yet

    def take(layer: str, part: str) -> torch.Tensor:
        if layer not in waiting:
            weight = loaders[f"{layer}.weight"]()
            q, scale = quantize_weight(weight, out=places.pop(layer))
            release_view(weight)
            # Detached: q is a view of the block, and a view keeps its base, the whole block, alive even once
            # free_weights has emptied it; the detached tensor shares the memory without holding the base.
            waiting[layer] = {"weight": q.detach(), "weight_scale": scale}
        tensor = waiting[layer].pop(part)
        if not waiting[layer]:
            del waiting[layer]
        return tensor

    quantized = dict(loaders)
    for layer in layers:
        for part in ("weight", "weight_scale"):
            quantized[f"{layer}.{part}"] = lambda layer=layer, part=part: take(layer, part)
    return quantized


def load_int8_file(file: TensorFile, device, dtype, prediction_type: str | None) -> StableDiffusion:
    """The model of an 8-bit file, each network built with the layers the file has scales for 8-bit, and filled
    strictly; the float tensors cast to `dtype`, the scales too (the int8 q stay int8)."""
    source = str(file.path)
    facts = json.loads(file.metadata[INT8_METADATA_KEY])
    if facts.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{source} is an 8-bit file of format {facts.get('format')}; this sd_scratch reads "
                              f"format {FORMAT_VERSION}: quantize the float checkpoint again")
    configs = facts["configs"]
    prefixes = tuple(f"{name}." for name in NETWORKS if configs.get(name))
    leftover = sorted(key for key in file.keys if not key.startswith(prefixes))
    if leftover:
        raise CheckpointError(f"{source}: {len(leftover)} tensors belong to no network of the 8-bit file "
                              f"({list_keys(leftover)}); quantize the float checkpoint again")
    networks = {}
    for name, (network_class, config_class) in NETWORKS.items():
        if not configs.get(name):
            continue  # the SDXL refiner has no text_encoder, SD 1.x/2.x no text_encoder_2
        prefix = f"{name}."
        keys = [key[len(prefix):] for key in file.keys if key.startswith(prefix)]
        network = build_empty(network_class, config_class(**_tuples(configs[name])))
        # The 8-bit layers: those with a scale, or with int8 numbers (a missing scale is then named by the strict fill)
        layers = {key.rsplit(".", 1)[0] for key in keys if key.endswith(".weight_scale")
                  or (key.endswith(".weight") and file.get(prefix + key).dtype == torch.int8)}
        try:
            swap_to_int8(network, sorted(layers))
        except ValueError as error:
            raise CheckpointError(f"{source}: {error}, but the file holds it in 8 bits; quantize the float "
                                  "checkpoint again") from None
        loaders = {key: (lambda key=key, prefix=prefix: file.get(prefix + key, device, dtype)) for key in keys}
        networks[name] = fill_strictly(network, name.replace("_", " "), loaders, device, dtype, source, facts["kind"],
                                       question="is the 8-bit file complete? quantize the float checkpoint again")
    pads = facts["pad_token_ids"]
    tokenizers = {name: Tokenizer(WEIGHTS_DIR, pad_token_id=pads[name]) if name in pads else None
                  for name in TOKENIZERS}
    return StableDiffusion(tokenizers["tokenizer"], networks.get("text_encoder"), networks["unet"], networks["vae"],
                           facts["kind"], prediction_type or facts["prediction_type"], facts["skip_last_layers"],
                           facts["image_size"], source, ScheduleConfig(**facts["schedule"]), facts["defaults"],
                           text_encoder_2=networks.get("text_encoder_2"), tokenizer_2=tokenizers["tokenizer_2"])


# --------------------------------------------------------------------------------------------------
# Writing (python -m sd_scratch.quantize)


def int8_file_tensors(model: StableDiffusion) -> dict[str, torch.Tensor]:
    """The file's tensors: each network's state_dict under the network's name."""
    return {f"{name}.{key}": tensor for name in NETWORKS if getattr(model, name) is not None
            for key, tensor in getattr(model, name).state_dict().items()}


def int8_file_metadata(model: StableDiffusion, source: str) -> dict[str, str]:
    """The metadata entry that marks the file, with what no tensor says; `source`: the checkpoint it came from."""
    facts = {
        "format": FORMAT_VERSION,
        "quantized_from": source,
        "kind": model.kind,
        "configs": {name: dataclasses.asdict(getattr(model, name).config) if getattr(model, name) is not None else None
                    for name in NETWORKS},
        "prediction_type": model.prediction_type,
        "skip_last_layers": model.skip_last_layers,
        "image_size": model.image_size,
        "schedule": dataclasses.asdict(model.schedule),
        "defaults": model.defaults,
        "pad_token_ids": {name: getattr(model, name).pad_token_id for name in TOKENIZERS
                          if getattr(model, name) is not None},
    }
    return {INT8_METADATA_KEY: json.dumps(facts), "format": "pt"}


def int8_file_header(model: StableDiffusion, source: str) -> bytes:
    """The safetensors header (tensor_file.safetensors_header) of the file write_int8_file writes."""
    tensors = int8_file_tensors(model).items()
    return safetensors_header(((key, tensor.dtype, tensor.shape) for key, tensor in tensors),
                              int8_file_metadata(model, source))


def int8_file_bytes(model: StableDiffusion, source: str) -> int:
    """The size of the file `write_int8_file` writes."""
    tensors = int8_file_tensors(model).values()
    return len(int8_file_header(model, source)) + sum(t.numel() * t.element_size() for t in tensors)


def write_int8_file(f, model: StableDiffusion, source: str) -> None:
    """Write the 8-bit file of `model` (its layers quantised, on the CPU) to the binary file `f`, tensor by tensor.
    The model is for writing only: the pages of its tensors that view its checkpoint are handed back as written."""
    f.write(int8_file_header(model, source))
    for tensor in int8_file_tensors(model).values():
        f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        release_view(tensor)  # a float tensor still viewing the checkpoint: its pages are not needed again


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
