"""Train the tiny model's TAESD (weights/tiny_taesd.safetensors): a decoder that draws what its VAE draws.

    python -m sd_scratch.tiny.train_taesd --out weights/tiny_taesd.safetensors

TAESD is distilled, not trained from pictures: the student (taesd.py's decoder, here narrow) sees the
latents the UNet works on and learns to output what the teacher, the tiny model's own VAE, decodes them
to. The loss is the squared error plus the absolute error (the L1 keeps the flat colours flat), on the
VAE's [-1, 1] scale, against the VAE's decode clamped to [-1, 1], the picture a user would see.

The latents, as the UNet sees them (scaled by the VAE's scaling factor, like TAESD's):
    pictures   the tiny model's training pictures (dataset.py, the same seed), encoded by its VAE, a sample
               of the posterior as the UNet was trained on
    previews   what a preview decodes: the UNet's prediction of the clean latents at every step of a few
               sampling runs (early ones blurred and off the pictures' manifold), caught on their way to
               the VAE. A student that saw only finished pictures draws the early steps' latents badly.
The teacher's decodes are computed once; training then draws batches from them.

The tiny VAE shrinks pictures 4 times, not SD's 8, so the student has two upsamples, not three
(`TAESDConfig.decoder_blocks` has three levels). Held out: pictures of another seed and previews of other
prompts, scored by PSNR of the student's decode against the VAE's, on the [0, 1] pixel scale.
Everything is drawn from seeds: the same command on the same machine (and thread count) writes the same file.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sd_scratch.loading import load_checkpoint
from sd_scratch.loading.taesd_file import TINY_TAESD, save_taesd
from sd_scratch.sample import generate
from sd_scratch.taesd import TAESD, TAESDConfig
from sd_scratch.tiny.dataset import make_dataset
from sd_scratch.tiny.train import Progress, learning_rate

OUTPUT = TINY_TAESD
# SD's TAESD is 64 channels wide with (3, 3, 3, 1) blocks and three upsamples for the 1/8 latents; the tiny
# VAE's latents are at 1/4 and its decoder only 8 to 32 channels wide, so 16 channels and one level fewer.
TINY_CONFIG = TAESDConfig(width=16, decoder_blocks=(3, 3, 1), encoder_blocks=None)


@dataclass(frozen=True)
class Settings:
    seed: int = 0  # the tiny model's training pictures are make_dataset(..., seed=0): the same pictures
    pictures: int = 4000
    preview_runs: int = 64  # sampling runs whose every step's predicted clean latents are kept
    preview_steps: int = 20
    held_out_pictures: int = 256
    held_out_runs: int = 16
    held_out_seed: int = 12345
    steps: int = 1500
    batch: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    l1_weight: float = 1.0
    log_every: int = 100


class KeepLatents:
    """A stand-in preview decoder for `generate`: keeps each latent it is handed, decodes it with the VAE."""

    def __init__(self, vae):
        self.vae, self.latents = vae, []

    def images_from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        self.latents.append(latents.detach().clone())
        return self.vae.images_from_latents(latents)


def picture_latents(model, count: int, seed: int) -> torch.Tensor:
    """Latents (as the UNet sees them) of `count` pictures of dataset.py, posterior samples drawn from `seed`."""
    images, _ = make_dataset(count, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.cat([model.vae.latents_from_images(images[i:i + 500], generator)
                          for i in range(0, count, 500)])


def preview_latents(model, runs: int, steps: int, seed: int) -> torch.Tensor:
    """The predicted clean latents at every step of `runs` sampling runs, captions drawn from `seed`."""
    _, captions = make_dataset(runs, seed=seed)
    keep = KeepLatents(model.vae)
    for start in range(0, runs, 16):
        generate(model, captions[start:start + 16], steps=steps, seed=seed + start, preview_every=1, preview=keep,
                 progress=False, **model.defaults)
    return torch.cat(keep.latents)


def teacher(model, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decodes of `latents`, clamped to [-1, 1] as they are shown."""
    with torch.no_grad():
        return torch.cat([model.vae.images_from_latents(latents[i:i + 500]).clamp(-1, 1)
                          for i in range(0, len(latents), 500)])


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB on the [0, 1] pixel scale (images given in [-1, 1]), over all pixels."""
    error = ((images.clamp(-1, 1) - reference) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / error))


def train(settings: Settings, output: Path, config: TAESDConfig = TINY_CONFIG) -> dict:
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # the student's initial weights
    generator = torch.Generator().manual_seed(settings.seed)  # the batches
    model = load_checkpoint()
    if config.latent_channels != model.vae.config.latent_channels or \
            config.downsampling_factor != model.vae.config.downsampling_factor:
        raise ValueError(f"the TAESD config makes {config.latent_channels}-channel latents at 1/"
                         f"{config.downsampling_factor}; the tiny model's VAE has {model.vae.config.latent_channels} "
                         f"at 1/{model.vae.config.downsampling_factor}")

    latents = torch.cat([picture_latents(model, settings.pictures, settings.seed),
                         preview_latents(model, settings.preview_runs, settings.preview_steps, settings.seed)])
    targets = teacher(model, latents)
    held_out = {
        "pictures": picture_latents(model, settings.held_out_pictures, settings.held_out_seed),
        "previews": preview_latents(model, settings.held_out_runs, settings.preview_steps, settings.held_out_seed),
    }
    print(f"{len(latents)} training latents ({settings.pictures} pictures, the rest previews), teacher decodes "
          f"done [{time.perf_counter() - start:.0f} s]", flush=True)

    taesd = TAESD(config)
    optimizer = torch.optim.AdamW(taesd.parameters(), lr=settings.lr, weight_decay=0.0)
    progress = Progress("taesd", settings.steps, settings.log_every, start)
    taesd.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.steps, settings.lr, settings.warmup_steps)
        index = torch.randint(len(latents), (settings.batch,), generator=generator)
        error = taesd.decode(latents[index]) - targets[index]
        mse, l1 = error.pow(2).mean(), error.abs().mean()
        optimizer.zero_grad(set_to_none=True)
        (mse + settings.l1_weight * l1).backward()
        optimizer.step()
        progress.add(step, mse=mse.item(), l1=l1.item())
    taesd.eval().requires_grad_(False)
    train_seconds = time.perf_counter() - start

    report = {"train_seconds": train_seconds, "parameters": sum(p.numel() for p in taesd.parameters()),
              "vae_decoder_parameters": sum(p.numel() for p in model.vae.decoder.parameters())}
    with torch.no_grad():
        for name, held in held_out.items():
            report[f"psnr_{name}"] = psnr(taesd.decode(held), teacher(model, held))
        report |= decode_times(taesd, model, held_out["pictures"][:1])
    save_taesd(output, taesd)
    print(f"wrote {output}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in report.items()), flush=True)
    return report


def decode_times(taesd: TAESD, model, latents: torch.Tensor, repeats: int = 21) -> dict:
    """Median seconds to decode one latent (one 64x64 picture) with the TAESD and with the VAE."""
    def median_seconds(decode):
        decode(latents)  # the first call lays the weights out channels-last
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            decode(latents)
            times.append(time.perf_counter() - begin)
        return sorted(times)[repeats // 2]

    return {"taesd_decode_s": median_seconds(taesd.decode), "vae_decode_s": median_seconds(model.vae.images_from_latents)}


def main():
    defaults = Settings()
    parser = argparse.ArgumentParser(description="Distil the tiny model's VAE decoder into a TAESD.")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    for field in ("seed", "pictures", "preview_runs", "steps", "batch", "lr"):
        value = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(defaults, **{k: getattr(args, k) for k in vars(args) if hasattr(defaults, k)})
    train(settings, args.out)


if __name__ == "__main__":
    main()
