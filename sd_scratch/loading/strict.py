"""Building a network empty and filling every one of its tensors from a checkpoint, or stopping.

Loading is strict: every parameter must be filled and every tensor given must be used. A gap is
reported with the names a reader needs to find it in the file's header (all of them, up to twenty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sd_scratch.loading.model import CheckpointError

KEYS_NAMED = 20  # how many names an error lists before it says how many more there are


def build_empty(module_class, config) -> nn.Module:
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


def fill_strictly(model: nn.Module, network: str, tensors: dict[str, Callable[[], torch.Tensor]], device, dtype,
                  source: str, kind: str,
                  question: str = "is this a full Stable Diffusion 1.x/2.x or SDXL checkpoint?") -> nn.Module:
    """Assign every parameter and buffer of `model` from `tensors` (name -> loader); fail on any gap.

    question: what the error asks the user to check, after naming the gaps.

    Tensors are read, cast and moved one at a time: peak memory stays near one copy of the weights.
    """
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {network} does not match the {kind} layout: {len(missing)} missing "
            f"({list_keys(missing)}), {len(unexpected)} unexpected ({list_keys(unexpected)}); {question}"
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


def list_keys(keys: list[str], limit: int = KEYS_NAMED) -> str:
    """'a, b, c', or the first `limit` names and 'and N more'; 'none' for no keys."""
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"
