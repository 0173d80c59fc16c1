"""8-bit weights, for machines with 4 to 8 GB: the layers, and `python -m sd_scratch.quantize`, which writes them.

    python -m sd_scratch.quantize --checkpoint v1-5-pruned-emaonly.safetensors --output sd15-int8.safetensors

Weight-only int8, per output channel, symmetric. Each output channel of a layer (a Linear's row of `in`
weights, a convolution's `in x k x k` kernel) gets one scale of its own, and its weights become integers:

    scale = max |w| over the channel / 127            q = round(w / scale), clamped to [-127, 127]

The layer keeps q (1 byte a weight, against float32's 4) and the scale, and computes with w' = q * scale,
which is within scale / 2 of w in every element: half a step of the channel's grid of 255 levels.
Symmetric (no zero point) because trained weights are centred on zero; one scale per output channel
because channels differ in size, and one scale for a whole matrix would leave its small channels only a
few levels; -128 is left out so that the grid is the same on both sides of zero.

Only the weights are 8-bit; activations and arithmetic stay in float. Each layer turns its q back into a
float weight when it is called (`Int8Layer.dequantized_weight`) and lets go of it when it returns, so one
layer's float weight exists at a time: SD 1.5's UNet holds 0.86 GB instead of 3.44 GB. The price is that
conversion on every call: about 3.4 GB of float32 written per UNet call (at memory speed, an estimated few
percent of a 512x512 step), less than the spread between runs in benchmarks/results/low_memory.md (there the
8-bit runs took 36 to 45 s, float32 47 to 54 s).

Which layers: every Linear and Conv2d of the UNet and the text encoders (the attention projections, the
feed-forwards, the residual blocks' convolutions, the samplings: all but 0.3% of SD 1.5's UNet weights)
except those KEPT_FLOAT names:

    time_embed, label_emb    the MLPs of the timestep (and SDXL's size vector): 2.1 M of the UNet's 860 M
                             weights, whose output shifts every residual block at every step; and
                             `model.dtype` / `model.device` read time_embed's weight, which stays a float
    input_blocks.0.0, out.2  the first and last convolution, between the 4 latent channels and 320: 23 k
                             weights, the two that read and write the latents themselves

Norms, biases and the embeddings stay float: they are not matrices multiplied on every call (the token
embedding, 38 M weights, is read at the prompt's 77 rows only). The VAE stays float: it is small (84 M)
and its decode writes the pixels.

`quantize_network` swaps a built network's layers for 8-bit ones; the loaders do the same while reading a
float checkpoint (`load_checkpoint(..., low_memory=True)`: each weight quantised as it is read, so the
float weights are never all in memory), and read the file this command writes (loading/int8_file.py has
its format: each network's state_dict, `<layer>.weight` int8 beside `<layer>.weight_scale`).
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m sd_scratch.quantize: run main from the module the loaders import, so that
    import sys  # there is one Int8Linear class, not this script's and the module's

    from sd_scratch.quantize import main

    sys.exit(main())

import argparse
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Q_MAX = 127  # q in [-127, 127]: symmetric about zero
# Elements quantised at a time. Small and always the same size, so that the float temporaries of one block are
# reused by the next: temporaries the size of each weight would leave holes among the int8 weights in the
# allocator's heap, kept by the process (loading SD 1.5 at low memory held 0.9 GB of them).
BLOCK_ELEMENTS = 1 << 18

# Linear and Conv2d layers left in float, by their name in the network (see the module docstring).
KEPT_FLOAT = re.compile(r"^(time_embed\.|label_emb\.|input_blocks\.0\.0$|out\.2$)")


def quantize_weight(weight: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): `weight` (out, ...) as int8 numbers of its shape and one float32 scale per output channel,
    weight ~ q * scale. Computed in float32, a block of rows at a time; on the meta device, shapes only.
    out: an int8 tensor of weight's shape to write q into (default: a new one)."""
    rows = weight.flatten(1)  # (out, everything a channel sums over)
    low, high = torch.aminmax(rows, dim=1)
    scale = torch.maximum(-low, high).float() / Q_MAX  # max |w| / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: q = 0 whatever the scale
    q = torch.empty(rows.shape, dtype=torch.int8, device=rows.device) if out is None else out.view(rows.shape)
    if not rows.is_meta:
        step = max(1, BLOCK_ELEMENTS // rows.shape[1])
        for start in range(0, len(rows), step):
            block = rows[start:start + step].float() / scale[start:start + step, None]
            q[start:start + step] = block.round_().clamp_(-Q_MAX, Q_MAX)  # whole numbers: the cast to int8 is exact
    return q.reshape(weight.shape), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w' = q * scale, in the scale's dtype: one new float tensor of q's shape."""
    return q.to(scale.dtype).mul_(scale.view(-1, *[1] * (q.ndim - 1)))


class Int8Layer(nn.Module):
    """What the 8-bit Linear and Conv2d share: `weight`, the int8 q, and `weight_scale`, one scale per output
    channel (buffers, so that they are in the state_dict under the float layer's names, and are cast by
    `.to(dtype)` as a float layer's weight would be, q excepted); `bias` stays the float layer's own."""

    def __init__(self, layer: nn.Linear | nn.Conv2d):
        super().__init__()
        q, scale = quantize_weight(layer.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale.to(layer.weight.dtype))  # the dtype the layer computes in
        self.bias = layer.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer computes with, made anew for each call and dropped after it."""
        return dequantize_weight(self.weight, self.weight_scale)


class Int8Linear(Int8Layer):
    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Conv2d(Int8Layer):
    def __init__(self, conv: nn.Conv2d):
        if conv.padding_mode != "zeros":
            raise ValueError(f"an 8-bit Conv2d pads with zeros; this one pads with {conv.padding_mode!r}")
        super().__init__(conv)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8")


def layers_to_quantize(network: nn.Module) -> list[str]:
    """The names of the Linear and Conv2d layers of `network` that become 8-bit (all but KEPT_FLOAT's)."""
    return [name for name, module in network.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not KEPT_FLOAT.match(name)]


def swap_to_int8(network: nn.Module, names: list[str]) -> nn.Module:
    """Replace each named Linear / Conv2d of `network` with its 8-bit twin, quantised from its weight (in place;
    on the meta device, shapes only, for a loader to fill). The module tree and the state_dict's names stay."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name)
        layer = getattr(parent, child, None)
        if isinstance(layer, nn.Conv2d):
            setattr(parent, child, Int8Conv2d(layer))
        elif isinstance(layer, nn.Linear):
            setattr(parent, child, Int8Linear(layer))
        else:
            raise ValueError(f"{name} is not a Linear or Conv2d layer of the {type(network).__name__}")
    return network


def quantize_network(network: nn.Module) -> nn.Module:
    """`network` with its big layers (layers_to_quantize) 8-bit, in place."""
    return swap_to_int8(network, layers_to_quantize(network))


def is_quantized(network: nn.Module | None) -> bool:
    """Whether any layer of `network` is 8-bit."""
    return network is not None and any(isinstance(module, Int8Layer) for module in network.modules())


# --------------------------------------------------------------------------------------------------
# The command: a checkpoint in, the 8-bit file out


class QuantizeError(Exception):
    """A mistake in the command line or its input: reported in one line, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise QuantizeError(message)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sd_scratch.quantize",
                       description="Write a Stable Diffusion checkpoint with 8-bit UNet and text encoder weights, "
                                   "for --low-memory runs that load it directly.")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the model: a single file (.safetensors, or a .ckpt read weights-only) or a diffusers folder")
    p.add_argument("--output", type=Path, required=True, help="the 8-bit file to write (.safetensors); never replaced")
    return p


def check_output(out: Path) -> None:
    if out.suffix != ".safetensors":
        raise QuantizeError(f"--output {out}: the 8-bit file is written as safetensors: give it a .safetensors name")
    if out.is_dir():
        raise QuantizeError(f"--output {out} is a folder: give the file's name")
    if out.exists():
        raise QuantizeError(f"{out} exists: sd_scratch never overwrites a file")
    if not out.parent.is_dir():
        raise QuantizeError(f"--output {out}: the folder {out.parent} does not exist")


def quantize_checkpoint(checkpoint: Path, out: Path) -> str:
    """Write the 8-bit file of `checkpoint` to `out`; return what was done, in words."""
    # Imported here, not at the top: the loaders import this module's layers.
    from sd_scratch.loading.diffusers_folder import load_diffusers_folder
    from sd_scratch.loading.int8_file import INT8_METADATA_KEY, int8_file_bytes, write_int8_file
    from sd_scratch.loading.model import CheckpointError
    from sd_scratch.loading.single_file import load_single_file
    from sd_scratch.loading.tensor_file import TensorFile
    from sd_scratch.new_file import write_new_file

    check_output(out)
    if not checkpoint.exists():
        raise QuantizeError(f"{checkpoint} not found")
    started = time.perf_counter()
    try:
        if checkpoint.is_file() and INT8_METADATA_KEY in TensorFile(checkpoint).metadata:
            raise QuantizeError(f"{checkpoint} is already an 8-bit file of sd_scratch.quantize")
        # Each UNet and text encoder weight is quantised as it is read: the float weights are never all held.
        load = load_diffusers_folder if checkpoint.is_dir() else load_single_file
        model = load(checkpoint, "cpu", torch.float32, None, low_memory=True)
        size = int8_file_bytes(model, checkpoint.name)
        free = shutil.disk_usage(out.parent).free
        if free < size:
            raise QuantizeError(f"the 8-bit file needs {size / 1e9:.2f} GB and {out.parent} has {free / 1e9:.2f} GB free")
        try:
            write_new_file(out, lambda f: write_int8_file(f, model, checkpoint.name))
        except FileExistsError:
            raise QuantizeError(f"{out} appeared while quantizing and was left as it is") from None
    except CheckpointError as error:
        raise QuantizeError(str(error)) from None
    except OSError as error:  # unreadable input, unwritable output, the disk full: nothing is left written
        raise QuantizeError(f"quantizing into {out} failed: {error.strerror or error}") from None
    int8 = sum(tensor.numel() for network in (model.unet, *(e for _, e in model.text_encoders))
               for tensor in network.buffers() if tensor.dtype == torch.int8)
    encoders = "text encoders" if len(model.text_encoders) > 1 else "text encoder"
    return (f"{model.kind}: {int8 / 1e6:.0f} M weights of the UNet and {encoders} in 8 bits; "
            f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        print(quantize_checkpoint(args.checkpoint, args.output))
        return 0
    except QuantizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
