"""Teach the frozen tiny model a word it does not know, with a LoRA: the shape "diamond".

    python -m sd_scratch.tiny.train_lora              # writes weights/tiny_lora_diamond.safetensors
    python -m sd_scratch.tiny.train_lora --evaluate   # scores the shipped file (weights/README.md)

The shipped model (weights/tiny_sd.safetensors) knows circles, squares and triangles. Asked for "a red
diamond on a blue background" it draws a red blob on blue: the word "diamond" is in CLIP's vocabulary,
but its embedding never moved from its random start, and the UNet never saw one. A LoRA (sd_scratch/lora.py)
leaves every weight of the model as it is and trains, beside some of its layers, two thin matrices each:
the layer computes W x + (alpha / rank) up (down x). Here the layers are the UNet's cross-attention, the
only place where the text reaches the picture: the queries (from the picture), keys and values (from the
text) and output projection (attn2.to_q, to_k, to_v, to_out.0) of its seven transformer blocks, so the LoRA
changes what "diamond" (and, as little as possible, every other word) tells the UNet. (Keys and values
alone drew fewer diamonds: weights/README.md.)

It is trained as the model was (train.py): a latent x0 of a training picture, a random step t, noise;
the UNet predicts the noise of x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, and the loss is
the Min-SNR-weighted squared error. Only down and up learn. As in kohya's trainer, down starts random
(Kaiming-uniform) and up at zero, so that the LoRA starts as no change at all.

The pictures are the dataset's own (dataset.py), half of them diamonds (`shapes=NEW_SHAPES`: "a {colour}
diamond on a {colour} background", every colour pair) and half the ordinary circles, squares and
triangles with their captions. The second half is DreamBooth's "prior preservation" (Ruiz et al. 2022):
without it the LoRA is free to change what every prompt draws. As in train.py, one caption in ten is
replaced by the empty prompt, diamonds' too, so that the unconditional prediction that guidance subtracts
knows diamonds as well: given only ordinary pictures with "", guidance pushes a diamond away from what
the empty prompt draws (a round blob) and pinches its sides in. Everything is drawn from one seed.

The file is written in kohya's layout, which AUTOMATIC1111, ComfyUI and diffusers read:
lora_unet_<the layer's diffusers path, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha,
with kohya's `ss_*` metadata (network dim and alpha, steps, learning rate, seed) and our own description.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd_scratch.loading import DEFAULT_CHECKPOINT, load_checkpoint
from sd_scratch.lora import Lora, apply_loras, load_lora, module_paths
from sd_scratch.sample import generate
from sd_scratch.schedule import alphas_cumprod
from sd_scratch.tiny.dataset import COLOURS, NEW_SHAPES, caption, make_dataset
from sd_scratch.tiny.evaluate import (
    FIRST_SEED,
    Score,
    evaluation_prompts,
    read_image_with_diamonds,
    score_readings,
)
from sd_scratch.tiny.train import Progress, encode_all, learning_rate, min_snr_weight
from sd_scratch.tokenizer import WEIGHTS_DIR

OUTPUT = WEIGHTS_DIR / "tiny_lora_diamond.safetensors"
DESCRIPTION = ('Teaches the tiny model (tiny_sd.safetensors) the shape "diamond": "a {colour} diamond on a {colour} '
               'background" draws a square turned 45 degrees. Trained by sd_scratch/tiny/train_lora.py.')
# What the evaluation asks for, and the prompts it draws at: the model's own defaults (guidance 3, 25 steps).
PROMPT = ("red", "diamond", "white")
MULTIPLIERS = (0.0, 0.5, 1.0)
GUIDANCE, STEPS, SAMPLER = 3.0, 25, "euler"


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    new_images: int = 2000  # pictures of diamonds
    base_images: int = 2000  # ordinary pictures, so that the rest of the vocabulary stays as it was
    steps: int = 800
    batch: int = 32
    lr: float = 1e-2
    warmup_steps: int = 30
    rank: int = 4
    alpha: float = 4.0
    # The layers, by the end of our module path; every UNet layer so named gets a LoRA.
    targets: tuple[str, ...] = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
    empty_prompt_fraction: float = 0.1  # as train.py
    drop_new_captions: bool = True  # the empty prompt for diamonds too (False: for the ordinary pictures only)
    min_snr_gamma: float = 5.0
    log_every: int = 50


# --------------------------------------------------------------------------------------------------
# The trainable factors, beside the frozen layers


class LoraFactors(nn.Module):
    """down (rank x in) and up (out x rank) for one nn.Linear, added to its output by a forward hook:
    layer(x) + (alpha / rank) * up(down(x)), which is what W' = W + (alpha / rank) up @ down computes."""

    def __init__(self, layer: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, layer.in_features))
        self.up = nn.Parameter(torch.zeros(layer.out_features, rank))  # zero: the LoRA starts as no change
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear, kohya and PEFT initialise it
        self.scale = alpha / rank
        self.hook = layer.register_forward_hook(self.add)

    def add(self, layer, inputs, output):
        return output + self.scale * (inputs[0] @ self.down.t() @ self.up.t())


def attach(model, settings: Settings) -> dict[str, LoraFactors]:
    """A LoraFactors beside every UNet layer whose path ends with one of settings.targets: {path: factors}."""
    layers = {name: module for name, module in model.unet.named_modules()
              if isinstance(module, nn.Linear) and name.endswith(settings.targets)}
    if not layers:
        raise ValueError(f"no UNet layer ends with {settings.targets}")
    return {name: LoraFactors(layer, settings.rank, settings.alpha) for name, layer in layers.items()}


def save_lora(path: Path, model, factors: dict[str, LoraFactors], settings: Settings, metadata: dict) -> None:
    """kohya's layout: lora_unet_<diffusers path with _>.lora_down.weight / .lora_up.weight / .alpha."""
    diffusers = module_paths(model, "unet")
    tensors = {}
    for name, layer in factors.items():
        key = "lora_unet_" + diffusers[name].replace(".", "_")
        tensors[key + ".lora_down.weight"] = layer.down.detach().clone().contiguous()
        tensors[key + ".lora_up.weight"] = layer.up.detach().clone().contiguous()
        tensors[key + ".alpha"] = torch.tensor(settings.alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={key: str(value) for key, value in metadata.items()})


# --------------------------------------------------------------------------------------------------
# Training


def training_data(model, settings: Settings) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """The latents' posterior (mean, logvar), the captions, and which pictures are ordinary ones."""
    new_images, new_captions = make_dataset(settings.new_images, seed=settings.seed, shapes=NEW_SHAPES)
    base_images, base_captions = make_dataset(settings.base_images, seed=settings.seed + 1)
    mean, logvar = encode_all(model.vae, torch.cat([new_images, base_images]))
    ordinary = torch.arange(len(mean)) >= settings.new_images
    return mean, logvar, new_captions + base_captions, ordinary


@torch.no_grad()
def encode_captions(model, captions: list[str]) -> torch.Tensor:
    """(N, 77, width): the frozen text encoder's output for each caption, computed once per distinct caption."""
    distinct = sorted(set(captions))
    encoded = model.text_encoder(model.tokenizer(distinct).input_ids.to(model.device))
    return encoded[torch.tensor([distinct.index(c) for c in captions])]


def train(settings: Settings, output: Path, checkpoint: Path | None = None) -> dict:
    """Train the LoRA on the frozen model and write it to `output`; returns the metadata written."""
    start = time.perf_counter()
    model = load_checkpoint(checkpoint)
    for network in (model.text_encoder, model.unet, model.vae):
        network.requires_grad_(False)
    torch.manual_seed(settings.seed)  # the factors' initial down weights
    generator = torch.Generator().manual_seed(settings.seed)  # batches, noise, timesteps, dropped captions
    factors = attach(model, settings)
    parameters = [p for layer in factors.values() for p in layer.parameters()]
    print(f"LoRA rank {settings.rank}, alpha {settings.alpha:g} on {len(factors)} layers "
          f"(*{', *'.join(settings.targets)}): {sum(p.numel() for p in parameters)} parameters, against the UNet's "
          f"{sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f} M")

    mean, logvar, captions, ordinary = training_data(model, settings)
    context = encode_captions(model, captions)
    empty = encode_captions(model, [""])
    scale = model.vae.config.scaling_factor
    print(f"data: {settings.new_images} diamonds, e.g. {captions[0]!r}, and {settings.base_images} ordinary pictures "
          f"[{time.perf_counter() - start:.0f} s]")

    alpha_bar = alphas_cumprod()
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    progress = Progress("lora", settings.steps, settings.log_every, start)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.steps, settings.lr, settings.warmup_steps)
        index = torch.randint(len(mean), (settings.batch,), generator=generator)
        x0 = scale * (mean[index] + (0.5 * logvar[index]).exp() * torch.randn(mean[index].shape, generator=generator))
        dropped = torch.rand(settings.batch, generator=generator) < settings.empty_prompt_fraction
        if not settings.drop_new_captions:
            dropped &= ordinary[index]
        batch_context = torch.where(dropped[:, None, None], empty, context[index])

        t = torch.randint(len(alpha_bar), (settings.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alpha_bar[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        squared_error = (model.unet(noisy, t, batch_context) - noise).square().mean(dim=(1, 2, 3))
        loss = (min_snr_weight(a.flatten(), settings.min_snr_gamma) * squared_error).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        progress.add(step, loss=loss.item())
    seconds = time.perf_counter() - start
    for layer in factors.values():
        layer.hook.remove()

    metadata = {
        "sd_scratch_description": DESCRIPTION,
        "sd_scratch_settings": json.dumps(asdict(settings)),
        "sd_scratch_training_seconds": f"{seconds:.0f}",
        "sd_scratch_final_loss": f"{progress.last['loss']:.4f}",
        # what kohya's sd-scripts write, for the tools that show them
        "ss_network_module": "networks.lora",
        "ss_network_dim": settings.rank,
        "ss_network_alpha": settings.alpha,
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": Path(model.source).name,
        "ss_resolution": "(64, 64)",
        "ss_max_train_steps": settings.steps,
        "ss_train_batch_size": settings.batch,
        "ss_learning_rate": settings.lr,
        "ss_unet_lr": settings.lr,
        "ss_text_encoder_lr": 0.0,
        "ss_lr_scheduler": "linear warm-up, cosine to a tenth",
        "ss_optimizer": "torch.optim.AdamW(weight_decay=0.0)",
        "ss_min_snr_gamma": settings.min_snr_gamma,
        "ss_seed": settings.seed,
        "ss_num_train_images": settings.new_images + settings.base_images,
        "ss_training_comment": DESCRIPTION,
    }
    save_lora(output, model, factors, settings, metadata)
    print(f"saved {output} ({output.stat().st_size / 1e3:.1f} kB) after {seconds:.0f} s ({seconds / 60:.1f} min); "
          f"final loss {progress.last['loss']:.4f}")
    return metadata


# --------------------------------------------------------------------------------------------------
# Does it work? Read from the pixels (evaluate.read_image_with_diamonds)


def draw_and_read(model, prompts: list[tuple[str, str, str]], batch_size: int = 48) -> Score:
    """Generate prompts[k] with seed FIRST_SEED + k (the model's defaults: euler, guidance 3, 25 steps), and
    score what the pixels show, diamonds included."""
    readings = []
    for first in range(0, len(prompts), batch_size):
        batch = [caption(*triple) for triple in prompts[first:first + batch_size]]
        images = generate(model, batch, steps=STEPS, guidance=GUIDANCE, sampler=SAMPLER, seed=FIRST_SEED + first,
                          progress=False).images
        readings += [read_image_with_diamonds(image) for image in images]
    return score_readings(readings, prompts)


def score_multipliers(model, lora: Lora, multipliers=MULTIPLIERS, count: int = 32,
                      prompt: tuple[str, str, str] = PROMPT) -> dict[float, Score]:
    """`prompt` at `count` seeds with the LoRA at each multiplier (0: the model alone): {multiplier: Score}."""
    scores = {}
    for multiplier in multipliers:
        with apply_loras(model, [(lora, multiplier)] if multiplier else []):
            scores[multiplier] = draw_and_read(model, [prompt] * count)
    return scores


def diamond_prompts() -> list[tuple[str, str, str]]:
    """Every (colour, "diamond", background) pair with two different colours, once: 56 prompts."""
    return [(c, "diamond", b) for c in COLOURS for b in COLOURS if b != c]


def score_base_prompts(model, lora: Lora, count: int = 48) -> tuple[Score, Score]:
    """The first `count` of evaluate's prompt x seed pairs (circles, squares, triangles), without and with the
    LoRA at multiplier 1: does it leave the rest of the vocabulary alone?"""
    prompts = evaluation_prompts()[:count]
    without = draw_and_read(model, prompts)
    with apply_loras(model, [(lora, 1.0)]):
        return without, draw_and_read(model, prompts)


def evaluate(path: Path, checkpoint: Path | None = None, count: int = 32, base_count: int = 48) -> None:
    model = load_checkpoint(checkpoint)
    lora = load_lora(path, model)
    print(f"{path.name}: {len(lora.layers)} layers, rank {lora.layers[0].rank}, alpha {lora.layers[0].alpha:g}; "
          f"{caption(*PROMPT)!r}, {count} seeds from {FIRST_SEED}, {SAMPLER}, guidance {GUIDANCE:g}, {STEPS} steps")
    print(f"{'multiplier':>10} {'diamond':>8} {'colour':>7} {'bg':>7}")
    for multiplier, result in score_multipliers(model, lora, count=count).items():
        print(f"{multiplier:>10g} {result.shape:>8.1%} {result.colour:>7.1%} {result.background:>7.1%}", flush=True)
    prompts = diamond_prompts()
    with apply_loras(model, [(lora, 1.0)]):
        result = draw_and_read(model, prompts)
    print(f"every colour pair as a diamond ({len(prompts)} prompts, one seed each), multiplier 1: diamond "
          f"{result.shape:.1%}, colour {result.colour:.1%}, background {result.background:.1%}", flush=True)
    without, with_lora = score_base_prompts(model, lora, base_count)
    for name, result in (("without the LoRA", without), ("with it at 1", with_lora)):
        print(f"the first {base_count} evaluation prompts (circles, squares, triangles), {name}: colour "
              f"{result.colour:.1%}, background {result.background:.1%}, shape {result.shape:.1%}", flush=True)
    for multiplier in (0.0, 1.0):  # the unconditional prediction learned diamonds too (one caption in ten)
        with apply_loras(model, [(lora, multiplier)] if multiplier else []):
            images = generate(model, [""] * 16, steps=STEPS, guidance=GUIDANCE, sampler=SAMPLER, seed=FIRST_SEED,
                              progress=False).images
        shapes = Counter(read_image_with_diamonds(image).shape for image in images)
        print(f"the empty prompt, 16 seeds, multiplier {multiplier:g}: "
              + ", ".join(f"{count} {shape}" for shape, count in shapes.most_common()))


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--checkpoint", type=Path, default=None, help=f"default: {DEFAULT_CHECKPOINT.name}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--evaluate", nargs="?", type=Path, const=OUTPUT, metavar="FILE",
                        help="score a LoRA file (default: the shipped one) instead of training")
    parser.add_argument("--count", type=int, default=32, help="seeds per multiplier for --evaluate")
    for field in ("seed", "new_images", "base_images", "steps", "batch", "lr", "rank", "alpha", "log_every"):
        value = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--targets", nargs="+", default=list(defaults.targets),
                        help="UNet layers by the end of their path (default: attn2.to_q to_k to_v to_out.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate is not None:
        evaluate(args.evaluate, args.checkpoint, count=args.count)
        return
    args.targets = tuple(args.targets)
    settings = replace(defaults, **{k: getattr(args, k) for k in vars(args) if hasattr(defaults, k)})
    train(settings, args.output, args.checkpoint)


if __name__ == "__main__":
    main()
