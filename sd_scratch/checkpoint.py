"""A checkpoint on disk -> the three networks, their configs and the tokenizer, loaded strictly.

Two layouts are read:

* the original single file (`v1-5-pruned-emaonly.safetensors`), one flat dict of tensors:
      model.diffusion_model.*                     the UNet
      first_stage_model.*                         the VAE
      cond_stage_model.transformer.text_model.*   the CLIP text encoder (SD 1.x)
      cond_stage_model.model.*                    the OpenCLIP text encoder (SD 2.x)
  Our modules are built so that their state_dict keys *are* these keys without the prefix, so a
  single file loads with no renaming (except OpenCLIP's fused attention weights).
* the diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), whose UNet
  and VAE keys are renamed to the original ones by the two short tables below.

No YAML is needed: the configs are read off the tensors' shapes (or taken from the file's
safetensors metadata when sd_scratch wrote it). Loading is strict: every parameter must be filled
and every tensor in the file used or on an explicit ignore list, or we stop and name the keys.
Tensors are read from the file one at a time, straight into the model's parameters (cast to the
requested dtype and moved to the device as they come), so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig, infer_text_encoder_config, openclip_to_clip_keys
from sd_scratch.tokenizer import PAD_EOS, PAD_ZERO, WEIGHTS_DIR, Tokenizer
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig, infer_vae_config

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
METADATA_KEY = "sd_scratch"  # safetensors metadata entry holding our configs as JSON

DEFAULT_CHECKPOINT = WEIGHTS_DIR / "tiny_sd.safetensors"
WHERE_WEIGHTS_GO = (
    "put a Stable Diffusion checkpoint in weights/ (e.g. v1-5-pruned-emaonly.safetensors from "
    "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5) and pass it with --checkpoint"
)

# Tensors a single file carries that inference does not use, ignored on purpose (and only these).
IGNORED_KEYS = re.compile(
    r"^(model_ema\.|first_stage_model\.loss\.|"  # EMA copies (already folded in), the VAE's training loss
    r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$|"  # training schedule buffers
    # position_ids is a constant arange that some files store as float or with wrong values: we never read it
    r"cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$|"
    r"cond_stage_model\.model\.(logit_scale|text_projection)$)"  # CLIP's contrastive head, unused by SD
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what was found and what to do."""


@dataclass
class StableDiffusion:
    """Everything a checkpoint provides for sampling."""

    tokenizer: Tokenizer
    text_encoder: TextEncoder
    unet: UNet
    vae: VAE
    kind: str  # "SD 1.x", "SD 1.x inpainting", "SD 2.x", ...
    prediction_type: str  # "epsilon" or "v_prediction"
    skip_last_layers: int  # text encoder layers to skip by default (SD 2.x: 1, the penultimate layer)
    image_size: int  # the side the model was trained at: the default height and width
    source: str


# --------------------------------------------------------------------------------------------------
# Entry point


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, prediction_type: str | None = None) -> StableDiffusion:
    """Load a single-file checkpoint or a diffusers folder onto `device` in `dtype`."""
    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; {WHERE_WEIGHTS_GO}")
    if path.is_dir():
        return _load_diffusers_folder(path, device, dtype, prediction_type)
    return _load_single_file(path, device, dtype, prediction_type)


# --------------------------------------------------------------------------------------------------
# Reading tensors


# The element types a .safetensors header names, and the torch dtype of each.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class _TensorFile:
    """The tensors of one file, read one at a time so that the weights are never held twice.

    A .safetensors file is simple enough to read by hand: 8 bytes (a little-endian integer N), N bytes
    of JSON, {name: {"dtype": "F16", "shape": [320, 4, 3, 3], "data_offsets": [begin, end]}, ...,
    "__metadata__": {...}}, then the raw bytes of every tensor, offsets counted from the end of the
    JSON. The file is memory-mapped and each tensor is a view of its bytes. A pickle (.ckpt) is read safely.
    """

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, str] = {}
        with open(path, "rb") as f:
            head = f.read(8)
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin") or head[:2] == b"PK" or head[:1] == b"\x80":
            self._pickle = self._read_pickle(path)
            self.keys = list(self._pickle)
            return
        self._pickle = None
        self._entries, self._data_start = self._read_header(path, head)
        with open(path, "rb") as f:  # copy-on-write mapping: tensors viewing it are writable, the file is not
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _MAPPINGS.add(self._map)
        self.metadata = self._entries.pop("__metadata__", None) or {}
        self.keys = list(self._entries)

    @staticmethod
    def _read_header(path: Path, head: bytes) -> tuple[dict, int]:
        def unreadable(reason):
            return CheckpointError(
                f"{path} is not a readable safetensors file ({reason}); it may be truncated or of another "
                f"format: download it again, or give a .safetensors / .ckpt Stable Diffusion checkpoint"
            )

        size = path.stat().st_size
        header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_length <= size - 8:
            raise unreadable("no header")
        with open(path, "rb") as f:
            f.seek(8)
            try:
                entries = json.loads(f.read(header_length))
                tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
                data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
                unknown = {v["dtype"] for v in tensors.values()} - set(SAFETENSORS_DTYPES)
            except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
                raise unreadable("its header is not safetensors JSON") from None
        if unknown:
            raise unreadable(f"unsupported element types {sorted(unknown)}")
        if 8 + header_length + data_end > size:
            raise unreadable(f"truncated: the header describes {8 + header_length + data_end} bytes, the file has {size}")
        return entries, 8 + header_length

    @staticmethod
    def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
        # weights_only=True never runs code from the file: a pickle that needs more than tensors is refused.
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any failure here means "not a tensor pickle we can trust"
            reason = str(error).strip().splitlines()[0][:200]
            raise CheckpointError(
                f"{path} could not be read as a weights-only PyTorch pickle ({reason}); convert it to "
                f".safetensors, or use the .safetensors release of the same model"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickle is not None:
            return tuple(self._pickle[key].shape)
        return tuple(self._entries[key]["shape"])

    def get(self, key: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, cast to `dtype` (floating-point tensors only) and moved to `device`.

        A safetensors tensor starts as a view of the memory-mapped file: no copy, and the pages are
        read from disk when first touched. When the cast or move makes a copy, the view's pages are
        handed back to the kernel at once, so the file's bytes and the copy are not held together.
        """
        tensor = self._pickle[key] if self._pickle is not None else self._view(key)
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        result = tensor.to(device=device or tensor.device, dtype=target_dtype)
        if self._pickle is None and result.data_ptr() != tensor.data_ptr():
            self._release(key)
        return result

    def _view(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin).reshape(entry["shape"])

    def _release(self, key: str) -> None:
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = (self._data_start + offset for offset in self._entries[key]["data_offsets"])
        first_page = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor's bytes
        last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last_page > first_page:
            self._map.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)


_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # mapped checkpoint files, while their weights live
MADV_PAGEOUT = 21  # Linux >= 5.4; Python's mmap module does not always name it


def release_weights(module: nn.Module) -> None:
    """Let the OS reclaim the memory of `module`'s weights that are views of a checkpoint file.

    A single-file checkpoint loaded on the CPU in its own dtype is not copied: its weights are the
    file's pages, read into memory when first used. Once a network has done its part of a run (the
    text encoder after the prompts, the UNet after the loop), `generate` calls this so that those
    pages stop counting against the process while the next network works. Nothing is lost:
    MADV_PAGEOUT drops a clean page of the file, to be read again from the file (or the OS's cache)
    when the weight is next used; a page written since loading has no copy in the file and stays.
    Copied weights (a cast, the GPU) are untouched. Linux only; elsewhere it does nothing.
    """
    if sys.platform != "linux":
        return
    starts = {mapping: torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() for mapping in _MAPPINGS}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        for mapping, start in starts.items():
            offset = storage.data_ptr() - start
            if 0 <= offset < len(mapping):
                first_page = offset // mmap.PAGESIZE * mmap.PAGESIZE
                end = min(offset + storage.nbytes(), len(mapping))
                try:
                    mapping.madvise(MADV_PAGEOUT, first_page, end - first_page)
                except OSError:  # EINVAL: a kernel before 5.4, without MADV_PAGEOUT
                    return


class _ShapeView(dict):
    """key -> shape-only stand-in, so the config inference functions can read `.shape` and `.ndim`."""

    def __init__(self, keys_to_shapes: dict[str, tuple[int, ...]]):
        super().__init__({k: torch.empty(s, device="meta") for k, s in keys_to_shapes.items()})


# --------------------------------------------------------------------------------------------------
# Building the networks and filling them, strictly


def _build(module_class, config) -> nn.Module:
    """The network with parameters on the meta device: shapes only, no memory until the checkpoint's
    tensors are assigned. Random initialisation is skipped as well: it would be overwritten anyway,
    and torch's first normal_() on a meta tensor imports torch._dynamo, which costs seconds."""
    skipped = {name: getattr(nn.init, name) for name in ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_")}
    try:
        for name in skipped:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return module_class(config)
    finally:
        for name, function in skipped.items():
            setattr(nn.init, name, function)


def _fill(model: nn.Module, network: str, tensors: dict[str, callable], device, dtype, source: str, kind: str):
    """Assign every parameter and buffer of `model` from `tensors` (name -> loader); fail on any gap.

    Tensors are read, cast and moved one at a time: peak memory stays near one copy of the weights.
    """
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {network} does not match the {kind} layout: "
            f"{len(missing)} missing (e.g. {_few(missing)}), {len(unexpected)} unexpected (e.g. {_few(unexpected)}); "
            "is this a full Stable Diffusion 1.x/2.x checkpoint?"
        )
    state = {}
    for name, target in expected.items():
        tensor = tensors[name]()
        if tensor.shape != target.shape:
            if tensor.numel() == target.numel() and tensor.squeeze().shape == target.squeeze().shape:
                tensor = tensor.reshape(target.shape)  # VAE attention stored as Linear [C, C] vs 1x1 conv [C, C, 1, 1]
            else:
                raise CheckpointError(
                    f"{source}: {network} tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the inferred config needs {tuple(target.shape)}"
                )
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        state[name] = tensor.to(device=device, dtype=target_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) if keys else "none"


# --------------------------------------------------------------------------------------------------
# The original single-file layout


def _load_single_file(path: Path, device, dtype, prediction_type) -> StableDiffusion:
    file = _TensorFile(path)
    keys = file.keys
    kind = _identify(keys, path)
    shapes = _ShapeView({k: file.shape(k) for k in keys})

    is_openclip = kind == "SD 2.x"
    stored = json.loads(file.metadata[METADATA_KEY]) if METADATA_KEY in file.metadata else None
    if stored:
        unet_config = UNetConfig(**_tuples(stored["unet"]))
        vae_config = VAEConfig(**_tuples(stored["vae"]))
        text_config = TextEncoderConfig(**_tuples(stored["text_encoder"]))
    else:
        unet_config = infer_unet_config(_strip(shapes, UNET_PREFIX))
        vae_config = infer_vae_config(_strip(shapes, VAE_PREFIX))
        if is_openclip:
            text_config = infer_text_encoder_config(openclip_to_clip_keys(_strip(shapes, OPENCLIP_PREFIX)), activation="gelu")
        else:
            text_config = infer_text_encoder_config(_strip(shapes, CLIP_PREFIX), activation="quick_gelu")

    used = {k for k in keys if k.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX))}
    leftover = sorted(k for k in keys if k not in used and not IGNORED_KEYS.match(k))
    if leftover:
        raise CheckpointError(
            f"{path}: {len(leftover)} tensors belong to no part of Stable Diffusion (e.g. {_few(leftover)}); "
            "merge LoRAs or other add-ons into the checkpoint first"
        )

    def loaders(prefix):
        return {k[len(prefix):]: (lambda k=k: file.get(k, device, dtype))
                for k in keys if k.startswith(prefix) and not IGNORED_KEYS.match(k)}

    if unet_config.in_channels == 9:
        kind += " inpainting"  # latents + mask + masked-image latents
    unet = _fill(_build(UNet, unet_config), "UNet", loaders(UNET_PREFIX), device, dtype, str(path), kind)
    vae = _fill(_build(VAE, vae_config), "VAE", loaders(VAE_PREFIX), device, dtype, str(path), kind)
    if is_openclip:
        text_tensors = _openclip_loaders(file)
    else:
        text_tensors = loaders(CLIP_PREFIX)
    text_encoder = _fill(_build(TextEncoder, text_config), "text encoder", text_tensors,
                         device, dtype, str(path), kind)

    if stored:
        prediction_type = prediction_type or stored.get("prediction_type", "epsilon")
        skip_last_layers = stored.get("skip_last_layers", 0)
        pad = stored.get("pad_token_id", PAD_EOS)
        image_size = stored.get("image_size", 512)
    else:
        # SD 2.x single files do not say whether they are v-prediction (768-v) or epsilon (512-base);
        # like diffusers, assume the 768-v model and let the user say otherwise.
        prediction_type = prediction_type or ("v_prediction" if is_openclip else "epsilon")
        skip_last_layers = 1 if is_openclip else 0  # SD 2.x conditions on OpenCLIP's penultimate layer
        pad = PAD_ZERO if is_openclip else PAD_EOS
        image_size = 768 if prediction_type == "v_prediction" else 512  # SD 2.x 768-v, every other SD: 512
    return StableDiffusion(Tokenizer(WEIGHTS_DIR, pad_token_id=pad), text_encoder, unet, vae, kind,
                           prediction_type, skip_last_layers, image_size, str(path))


def _openclip_loaders(file: _TensorFile) -> dict[str, callable]:
    """OpenCLIP fuses q, k, v into one in_proj tensor; its split into thirds gives views, not copies."""
    raw = {k[len(OPENCLIP_PREFIX):]: file.get(k) for k in file.keys
           if k.startswith(OPENCLIP_PREFIX) and not IGNORED_KEYS.match(k)}
    return {name: (lambda t=t: t) for name, t in openclip_to_clip_keys(raw).items()}


def _identify(keys: list[str], path: Path) -> str:
    """Name the kind of checkpoint from its keys, or explain what it seems to be instead."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        raise CheckpointError(f"{path} is an SDXL checkpoint; sd_scratch reads Stable Diffusion 1.x and 2.x")
    if has(UNET_PREFIX) and has(VAE_PREFIX) and has(OPENCLIP_PREFIX):
        return "SD 2.x"
    if has(UNET_PREFIX) and has(VAE_PREFIX) and has(CLIP_PREFIX):
        return "SD 1.x"
    if has("down_blocks.") and has("conv_in."):
        what = "a diffusers UNet or VAE file on its own"
    elif has("text_model.") or has("encoder.layers."):
        what = "a CLIP text encoder on its own"
    elif has("encoder.down.") or has("decoder.up."):
        what = "a VAE on its own"
    elif any("lora" in k for k in keys):
        what = "a LoRA, not a full model"
    else:
        what = f"an unknown model (keys like {_few(sorted(keys))})"
    raise CheckpointError(
        f"{path} does not hold a full Stable Diffusion model: it looks like {what}; give a whole SD 1.x/2.x "
        "checkpoint file or a diffusers folder"
    )


def _strip(tensors: dict, prefix: str, skip_ignored: bool = False) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and not (skip_ignored and IGNORED_KEYS.match(k))}


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def infer_unet_config(state: dict) -> UNetConfig:
    """Read the UNet's shape off its tensors (keys without `model.diffusion_model.`)."""
    conv_in = state["input_blocks.0.0.weight"]
    model_channels = conv_in.shape[0]
    n_input_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    channel_mult, attention_levels, res_per_level = [], [], 0
    level_blocks = 0
    for i in range(1, n_input_blocks):
        if f"input_blocks.{i}.0.op.weight" in state:  # a downsample closes the level
            res_per_level, level_blocks = level_blocks, 0
            continue
        if level_blocks == 0:
            channel_mult.append(state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // model_channels)
            if f"input_blocks.{i}.1.proj_in.weight" in state:
                attention_levels.append(len(channel_mult) - 1)
        level_blocks += 1
    res_per_level = res_per_level or level_blocks
    context_dim = state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    depth = len({k.split(".")[3] for k in state if k.startswith("middle_block.1.transformer_blocks.")})
    # The number of heads is not visible in the weights. SD 1.x uses 8 heads everywhere; SD 2.x
    # (1024-wide OpenCLIP context) uses heads of 64 channels.
    heads = dict(num_heads=None, head_dim=64) if context_dim == 1024 else dict(num_heads=8, head_dim=None)
    return UNetConfig(
        in_channels=conv_in.shape[1],
        out_channels=state["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level,
        attention_levels=tuple(attention_levels),
        context_dim=context_dim,
        transformer_depth=depth,
        use_linear_projection=state["middle_block.1.proj_in.weight"].ndim == 2,
        **heads,
    )


# --------------------------------------------------------------------------------------------------
# Writing a single file (used by the tiny model's training and by the tests)


def save_checkpoint(path: str | Path, text_encoder: TextEncoder, unet: UNet, vae: VAE, *,
                    prediction_type: str = "epsilon", skip_last_layers: int = 0, pad_token_id: int = PAD_EOS,
                    image_size: int = 512) -> None:
    """Write the three networks in the original single-file layout, their configs in the metadata."""
    tensors = {}
    for prefix, model in [(UNET_PREFIX, unet), (VAE_PREFIX, vae), (CLIP_PREFIX, text_encoder)]:
        tensors.update({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()})
    configs = {
        "unet": dataclasses.asdict(unet.config), "vae": dataclasses.asdict(vae.config),
        "text_encoder": dataclasses.asdict(text_encoder.config),
        "prediction_type": prediction_type, "skip_last_layers": skip_last_layers, "pad_token_id": pad_token_id,
        "image_size": image_size,
    }
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(configs)})


# --------------------------------------------------------------------------------------------------
# The diffusers folder layout: rename its UNet and VAE keys to the original ones, then load as above

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


def _weights_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).exists():
            return folder / name
    raise CheckpointError(f"{folder} holds no {stem}.safetensors (or .fp16.safetensors); the diffusers folder is incomplete")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); download it again") from None


def _load_diffusers_folder(folder: Path, device, dtype, prediction_type) -> StableDiffusion:
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder} is a folder but has no {part}/: give a diffusers model folder "
                                  "(unet/, vae/, text_encoder/, tokenizer/) or a single checkpoint file")
    source = str(folder)
    unet_file = _TensorFile(_weights_file(folder / "unet", "diffusion_pytorch_model"))
    vae_file = _TensorFile(_weights_file(folder / "vae", "diffusion_pytorch_model"))
    text_file = _TensorFile(_weights_file(folder / "text_encoder", "model"))

    k = unet_file.keys
    levels = _count(k, r"down_blocks\.(\d+)\.")
    unet_names = rename_keys(k, diffusers_unet_prefixes(
        levels, _count(k, r"down_blocks\.0\.resnets\.(\d+)\."),
        {i for i in range(levels) if any(key.startswith(f"down_blocks.{i}.attentions.") for key in k)},
    ), {"resnets": UNET_RESNET_NAMES})
    k = vae_file.keys
    vae_names = rename_keys(k, diffusers_vae_prefixes(
        _count(k, r"encoder\.down_blocks\.(\d+)\."), _count(k, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    ), {"resnets": VAE_RESNET_NAMES, "attentions": VAE_ATTENTION_NAMES})
    # transformers 4 saves CLIP under "text_model.", transformers 5 without it; ours keeps the original's level.
    text_names = {("" if key.startswith("text_model.") else "text_model.") + key: key for key in text_file.keys
                  if not key.endswith("position_ids")}

    def shapes(file, names):
        return _ShapeView({ours: file.shape(theirs) for ours, theirs in names.items()})

    def loaders(file, names):
        return {ours: (lambda theirs=theirs: file.get(theirs, device, dtype)) for ours, theirs in names.items()}

    unet_config = infer_unet_config(shapes(unet_file, unet_names))
    unet_json = _read_json(folder / "unet" / "config.json")
    heads = unet_json.get("num_attention_heads") or unet_json.get("attention_head_dim")
    if isinstance(heads, list) and len(set(heads)) > 1:  # SD 2.x: a fixed head width, so more heads per level
        unet_config = dataclasses.replace(unet_config, num_heads=None, head_dim=unet_config.model_channels // heads[0])
    elif heads:
        heads = heads[0] if isinstance(heads, list) else heads
        unet_config = dataclasses.replace(unet_config, num_heads=heads, head_dim=None)
    vae_config = infer_vae_config(shapes(vae_file, vae_names))
    scaling = _read_json(folder / "vae" / "config.json").get("scaling_factor")
    if scaling:
        vae_config = dataclasses.replace(vae_config, scaling_factor=scaling)
    activation = _read_json(folder / "text_encoder" / "config.json").get("hidden_act", "quick_gelu")
    text_config = infer_text_encoder_config(shapes(text_file, text_names), activation=activation)

    kind = "SD 2.x" if unet_config.context_dim == 1024 else "SD 1.x"
    if unet_config.in_channels == 9:
        kind += " inpainting"
    unet = _fill(_build(UNet, unet_config), "UNet", loaders(unet_file, unet_names), device, dtype, source, kind)
    vae = _fill(_build(VAE, vae_config), "VAE", loaders(vae_file, vae_names), device, dtype, source, kind)
    text_encoder = _fill(_build(TextEncoder, text_config), "text encoder", loaders(text_file, text_names),
                         device, dtype, source, kind)

    has_tokenizer = any((folder / "tokenizer" / name).exists() for name in ("vocab.json", "tokenizer.json"))
    tokenizer_folder = folder / "tokenizer" if has_tokenizer else WEIGHTS_DIR
    tokenizer = Tokenizer(tokenizer_folder)
    tokenizer.pad_token_id = tokenizer.bpe.pad_token_id  # "<|endoftext|>" for SD 1.x, "!" (id 0) for SD 2.x
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    prediction_type = prediction_type or scheduler.get("prediction_type", "epsilon")
    latent_size = _read_json(folder / "unet" / "config.json").get("sample_size", 64)
    image_size = latent_size * vae_config.downsampling_factor
    return StableDiffusion(tokenizer, text_encoder, unet, vae, kind, prediction_type, 0, image_size, source)
