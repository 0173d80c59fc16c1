"""Write a full-size SDXL base single-file checkpoint with random weights (the real one is a 6.9 GB download).

    python benchmarks/make_full_size_sdxl_checkpoint.py /tmp/sdxl_random_fp16.safetensors [--fp32]

Same tensors, names and shapes as sd_xl_base_1.0.safetensors: the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.`, CLIP ViT-L under `conditioner.embedders.0.transformer.` (with the
int64 `position_ids` the released file carries) and OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`
in OpenCLIP's own names (fused q/k/v `in_proj_weight`, `text_projection` as the P of x @ P, `logit_scale`),
written from our text encoder by tests/small_models.py's `openclip_layout`. No sd_scratch metadata: the
loader must infer every config from the shapes. float16 by default, as the release.

The whole model is never in memory, not even once: each network is built on the meta device (shapes only),
the header is written from those shapes, then each tensor is drawn, written and dropped in turn. Weights are
N(0, 1/fan_in) for matrices and convolutions (activations stay of order 1 through the depth), 1 + N(0, 0.01)
for norm scales and N(0, 0.01) for biases (as tests/small_models.py's `randomize`: not exactly 1 and 0, so
that a scale or a bias read from the wrong place would show in the pictures). Drawn from one seeded
generator in the file's order: the same file every time.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # small_models.openclip_layout

from small_models import openclip_layout

from sd_scratch.loading.single_file import SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sd_scratch.loading.strict import build_empty
from sd_scratch.text_encoder import SDXL_BIGG_TEXT_ENCODER, TextEncoder, TextEncoderConfig
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig

SDXL_BASE_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_levels=(1, 2),
                            num_heads=None, head_dim=64, context_dim=2048, transformer_depth=(0, 2, 10),
                            transformer_depth_middle=10, use_linear_projection=True, adm_in_channels=2816)
SAFETENSORS_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
POSITION_IDS = SDXL_CLIP_PREFIX + "text_model.embeddings.position_ids"
LOGIT_SCALE = SDXL_OPENCLIP_PREFIX + "logit_scale"


def layout(dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the file: key -> (shape, dtype), read off the networks built on the meta device."""
    entries = {}
    unet = build_empty(UNet, SDXL_BASE_UNET)
    entries |= {UNET_PREFIX + k: (tuple(v.shape), dtype) for k, v in unet.state_dict().items()}
    entries |= {VAE_PREFIX + k: (tuple(v.shape), dtype) for k, v in build_empty(VAE, VAEConfig()).state_dict().items()}
    clip = build_empty(TextEncoder, TextEncoderConfig())
    entries |= {SDXL_CLIP_PREFIX + k: (tuple(v.shape), dtype) for k, v in clip.state_dict().items()}
    entries[POSITION_IDS] = ((1, 77), torch.int64)
    bigg = openclip_layout(build_empty(TextEncoder, SDXL_BIGG_TEXT_ENCODER))  # meta tensors under OpenCLIP's names
    entries |= {SDXL_OPENCLIP_PREFIX + k: (tuple(v.shape), dtype) for k, v in bigg.items()}
    return entries, sum(p.numel() for p in unet.parameters())


def draw(key: str, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if key == POSITION_IDS:
        return torch.arange(77, dtype=torch.int64)[None]
    if key == LOGIT_SCALE:
        return torch.tensor(math.log(100.0), dtype=dtype)  # CLIP's trained temperature, 4.6052
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return (torch.randn(shape, generator=generator) / fan_in**0.5).to(dtype)
    base = 1.0 if key.endswith("weight") else 0.0  # norms' scales near 1, biases near 0
    return (base + 0.1 * torch.randn(shape, generator=generator)).to(dtype)


def write(path: Path, entries: dict, seed: int = 0) -> None:
    """A .safetensors file written by hand, one tensor at a time: 8 bytes (the header's length), the JSON
    header (each tensor's dtype, shape and byte range), then the tensors' bytes in the header's order."""
    header, offset = {}, 0
    order = sorted(entries)  # safetensors' own writer orders tensors by name too (within one alignment)
    for key in order:
        shape, dtype = entries[key]
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data start 8-aligned, as safetensors pads
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in order:
            shape, dtype = entries[key]
            tensor = draw(key, shape, dtype, generator).contiguous()
            assert tuple(tensor.shape) == shape and tensor.dtype == dtype, key
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="fp32", action="store_false", help="float16 weights, as the release (default)")
    precision.add_argument("--fp32", action="store_true", help="float32 weights (about 13.9 GB)")
    parser.set_defaults(fp32=False)
    args = parser.parse_args()
    start = time.perf_counter()
    entries, unet_parameters = layout(torch.float32 if args.fp32 else torch.float16)
    write(args.path, entries)
    unet_tensors = sum(k.startswith(UNET_PREFIX) for k in entries)
    print(f"{args.path}: {len(entries)} tensors ({unet_tensors} of the UNet), UNet parameters {unet_parameters:,}, "
          f"{args.path.stat().st_size / 1e9:.2f} GB, written in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
