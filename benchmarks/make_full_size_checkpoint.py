"""Write a full-size SD 1.5 single-file checkpoint with random weights (the real one is a 4 GB download).

    python benchmarks/make_full_size_checkpoint.py /tmp/sd15_random.safetensors [--fp16] [--inpainting]

Same tensors, names, shapes and dtypes as v1-5-pruned-emaonly.safetensors (minus the EMA and
schedule buffers), no sd_scratch metadata: the loader must infer every config from the shapes.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd_scratch.loading.single_file import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (as the 2 GB release)")
    parser.add_argument("--inpainting", action="store_true",
                        help="a UNet of 9 input channels, as sd-v1-5-inpainting.safetensors")
    args = parser.parse_args()
    torch.manual_seed(0)
    tensors = {}
    unet = UNet(UNetConfig(in_channels=9 if args.inpainting else 4))
    for prefix, module in [(UNET_PREFIX, unet), (VAE_PREFIX, VAE(VAEConfig())),
                           (CLIP_PREFIX, TextEncoder(TextEncoderConfig()))]:
        for name, tensor in module.state_dict().items():
            tensors[prefix + name] = tensor.half() if args.fp16 else tensor
        del module
    del unet
    save_file(tensors, str(args.path))
    print(f"{args.path}: {len(tensors)} tensors, {args.path.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
