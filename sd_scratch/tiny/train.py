"""Train the tiny Stable Diffusion of weights/tiny_sd.safetensors from nothing, on a 2-core CPU.

    python -m sd_scratch.tiny.train                  # writes weights/tiny_sd.safetensors

The networks are Stable Diffusion's own classes (UNet, VAE, TextEncoder), only narrower, and they
are trained the way the originals were, in the same order:

1. The autoencoder. Images -> posterior q(z | image) -> a sample z -> decoded image, with an L1 + L2
   reconstruction loss and a small KL term that keeps q(z | image) near N(0, I) (Rombach et al.
   2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3). SD adds a
   perceptual and an adversarial loss for photographs; flat shapes need neither. SD's latents are
   luminance-led (their first channel is roughly the picture's lightness); an extra L1 + L2 term on
   the luma error, weighted 4, makes ours so too. Without it the eight colours land in the latent
   space wherever the seed puts them, and a dark square on a light background may look, to the
   UNet, like a light one on a dark background in other colours, which breaks image-to-image
   (weights/README.md).
2. The scaling factor. SD's 0.18215 is 1 / (std of the latents over the training images), so that
   the UNet works on latents of unit variance; ours is measured the same way and stored in the
   VAE's config. The whole dataset is then encoded once.
3. The text encoder and the UNet, together. A latent x0, a random step t of the 1000-step training
   schedule and noise give x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; the UNet,
   given x_t, t and the caption's embeddings, predicts the noise, and the loss is the squared
   error (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", algorithm 1). One caption in
   ten is replaced by the empty prompt "", so the same network also learns the unconditional
   prediction that classifier-free guidance subtracts (Ho & Salimans 2022). As SD's CLIP was,
   the text encoder reads the real 49408-token vocabulary through the real tokenizer; unlike it,
   it is trained here, from scratch, with the UNet.

The weights saved are an exponential moving average of the trained ones, as SD's "ema" files are.
Everything is drawn from one seed, so the same command on the same machine writes the same file.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sd_scratch.loading import save_checkpoint
from sd_scratch.schedule import alphas_cumprod
from sd_scratch.text_encoder import TextEncoder, TextEncoderConfig
from sd_scratch.tiny.dataset import IMAGE_SIZE, make_dataset
from sd_scratch.tokenizer import WEIGHTS_DIR, Tokenizer
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import VAE, VAEConfig

# SD 1.5 for comparison: text width 768, 12 layers; UNet 320 channels x (1, 2, 4, 4), 2 res blocks per
# level, attention at three levels; VAE 128 channels x (1, 2, 4, 4), 64x64x4 latents for 512x512.
# Here the VAE has three levels, so it shrinks the image 4 times, not 8: 64x64x3 -> 16x16x4. (An 8x8x4
# latent has too few numbers for a small shape: its edge cells would have to carry both colours and
# the edge's place, and such a VAE learns slowly and blurs the shapes.)
TEXT_ENCODER = TextEncoderConfig(width=64, layers=2, heads=2, mlp_width=256)  # the real vocabulary and 77 positions
# Few channels per level, so each group norm spans many of them (VAE: all, norm_groups=1): a group
# norm over one or two channels would normalise a flat colour away, and these pictures are flat colours.
VAE_CONFIG = VAEConfig(base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, norm_groups=1)
UNET_CONFIG = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(1, 2),
                         num_heads=4, context_dim=TEXT_ENCODER.width, norm_groups=2)
OUTPUT = WEIGHTS_DIR / "tiny_sd.safetensors"
# What the command line uses when the user gives no value: at guidance 3 every sampler draws this model's
# pictures right, where at SD's usual 7.5 LMS and PNDM do not (weights/README.md).
SAMPLING_DEFAULTS = {"guidance": 3.0}


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    dataset_size: int = 20000
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # per latent element, against the per-pixel reconstruction loss
    luma_weight: float = 4.0  # the reconstruction loss on luminance, on top of the per-channel one
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    warmup_steps: int = 100
    empty_prompt_fraction: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    log_every: int = 100


# --------------------------------------------------------------------------------------------------
# Shared pieces


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then a cosine down to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model, parameter by parameter."""
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)


class Progress:
    """Prints the running mean of each loss every `every` steps, with the time since the start."""

    def __init__(self, name: str, total: int, every: int, start: float):
        self.name, self.total, self.every, self.start = name, total, every, start
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def add(self, step: int, **losses: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            count = (step % self.every) + 1
            self.last = {key: total / count for key, total in self.sums.items()}
            shown = "  ".join(f"{key} {value:.4f}" for key, value in self.last.items())
            print(f"{self.name} step {step + 1:5d}/{self.total}  {shown}  [{time.perf_counter() - self.start:6.0f} s]",
                  flush=True)
            self.sums = {}


# --------------------------------------------------------------------------------------------------
# 1. The autoencoder


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB -> (N, H, W) luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
    return torch.einsum("nchw,c->nhw", images, weights)


def train_vae(vae: VAE, images: torch.Tensor, settings: Settings, generator: torch.Generator, start: float) -> dict:
    # Start from a nearly deterministic posterior (std e^-4 = 0.02 instead of about 1): from unit
    # noise the decoder would spend most of a short training learning to see through it.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0  # the log-variance half
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    progress = Progress("vae ", settings.vae_steps, settings.log_every, start)
    vae.train()
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.vae_steps, settings.vae_lr, settings.warmup_steps)
        batch = images[torch.randint(len(images), (settings.vae_batch,), generator=generator)]
        mean, logvar = vae.encode(batch)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
        error = vae.decode(z) - batch
        l1, l2 = error.abs().mean(), error.square().mean()
        luma_error = luminance(error)
        luma = luma_error.abs().mean() + luma_error.square().mean()
        kl = kl_to_standard_normal(mean, logvar)
        loss = l1 + l2 + settings.luma_weight * luma + settings.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.add(step, l1=l1.item(), l2=l2.item(), luma=luma.item(), kl=kl.item())
    vae.eval()
    return progress.last


# --------------------------------------------------------------------------------------------------
# 2. The scaling factor, and the latents of the dataset


@torch.no_grad()
def encode_all(vae: VAE, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior (mean, logvar) of every image, unscaled."""
    means, logvars = zip(*(vae.encode(images[i:i + batch]) for i in range(0, len(images), batch)))
    return torch.cat(means), torch.cat(logvars)


def scaling_factor(mean: torch.Tensor, logvar: torch.Tensor) -> float:
    """1 / std of the sampled latents z over the data: mean and posterior noise both count,
    Var(z) = Var(mean) + E[exp(logvar)]."""
    variance = mean.var() + logvar.exp().mean()
    return float(1 / variance.sqrt())


# --------------------------------------------------------------------------------------------------
# 3. The text encoder and the UNet


def train_diffusion(text_encoder: TextEncoder, unet: UNet, latent_mean: torch.Tensor, latent_logvar: torch.Tensor,
                    scale: float, token_ids: torch.Tensor, empty_ids: torch.Tensor, settings: Settings,
                    generator: torch.Generator, start: float) -> tuple[dict, TextEncoder, UNet]:
    """Epsilon prediction on the SD schedule; returns the last losses and the EMA copies of both networks."""
    alpha_bar = alphas_cumprod()  # (1000,)
    T = len(alpha_bar)
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.unet_lr, weight_decay=0.0)
    ema_text_encoder, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    progress = Progress("unet", settings.unet_steps, settings.log_every, start)
    text_encoder.train(), unet.train()
    for step in range(settings.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings.unet_steps, settings.unet_lr, settings.warmup_steps)
        index = torch.randint(len(latent_mean), (settings.unet_batch,), generator=generator)
        # A fresh sample of each image's posterior, scaled to unit variance as SD's latents are.
        mean, logvar = latent_mean[index], latent_logvar[index]
        x0 = scale * (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator))
        ids = token_ids[index]
        dropped = torch.rand(settings.unet_batch, generator=generator) < settings.empty_prompt_fraction
        ids = torch.where(dropped[:, None], empty_ids, ids)  # the empty prompt "" for CFG

        t = torch.randint(T, (settings.unet_batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alpha_bar[t][:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        squared_error = (unet(noisy, t, text_encoder(ids)) - noise).square().mean(dim=(1, 2, 3))
        loss = (min_snr_weight(a.flatten(), settings.min_snr_gamma) * squared_error).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        # The average starts short (decay (1 + step) / (10 + step)) so that early weights fade fast.
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        update_ema(ema_text_encoder, text_encoder, decay)
        update_ema(ema_unet, unet, decay)
        progress.add(step, loss=loss.item())
    return progress.last, ema_text_encoder.eval(), ema_unet.eval()


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023): min(SNR, gamma) / SNR.

    SNR = alpha_bar / (1 - alpha_bar). Steps with little noise (SNR > gamma) are easy and many; their
    weight shrinks so that the noisy steps, where colour and shape are decided, get the gradient.
    """
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


# --------------------------------------------------------------------------------------------------


def train(settings: Settings, output: Path, fp16: bool = True, fp32_copy: Path | None = None) -> None:
    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # the networks' initial weights
    generator = torch.Generator().manual_seed(settings.seed)  # batches, noise, timesteps, dropped captions
    text_encoder, unet, vae = TextEncoder(TEXT_ENCODER), UNet(UNET_CONFIG), VAE(VAE_CONFIG)
    for name, model in [("text encoder", text_encoder), ("unet", unet), ("vae", vae)]:
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    images, captions = make_dataset(settings.dataset_size, seed=settings.seed)
    print(f"dataset: {len(images)} images {tuple(images.shape[1:])}, e.g. {captions[0]!r}  "
          f"[{time.perf_counter() - start:.0f} s]")

    vae_losses = train_vae(vae, images, settings, generator, start)
    latent_mean, latent_logvar = encode_all(vae, images)
    scale = scaling_factor(latent_mean, latent_logvar)
    vae.config = replace(vae.config, scaling_factor=scale)
    print(f"latents {tuple(latent_mean.shape[1:])}: std {1 / scale:.3f}, so scaling_factor = {scale:.5f}  "
          f"(posterior std {latent_logvar.mul(0.5).exp().mean():.3f})  [{time.perf_counter() - start:.0f} s]")

    tokenizer = Tokenizer()
    token_ids = tokenizer(captions).input_ids
    empty_ids = tokenizer([""]).input_ids
    diffusion_losses, text_encoder, unet = train_diffusion(
        text_encoder, unet, latent_mean, latent_logvar, scale, token_ids, empty_ids, settings, generator, start)

    if fp32_copy is not None:  # to measure what storing float16 costs
        save_checkpoint(fp32_copy, text_encoder, unet, vae, prediction_type="epsilon", image_size=IMAGE_SIZE,
                        defaults=SAMPLING_DEFAULTS)
    if fp16:  # half the file size; the loader casts back to the dtype asked for
        text_encoder, unet, vae = (copy.deepcopy(m).half() for m in (text_encoder, unet, vae))
    output.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(output, text_encoder, unet, vae, prediction_type="epsilon", image_size=IMAGE_SIZE,
                    defaults=SAMPLING_DEFAULTS)
    seconds = time.perf_counter() - start
    print(f"saved {output} ({output.stat().st_size / 1e6:.1f} MB) after {seconds:.0f} s ({seconds / 60:.1f} min)")
    print("final losses: " + "  ".join(f"vae {k} {v:.4f}" for k, v in vae_losses.items())
          + "  " + "  ".join(f"unet {k} {v:.4f}" for k, v in diffusion_losses.items()))


def main():
    defaults = Settings()
    parser = argparse.ArgumentParser(description="Train the tiny Stable Diffusion shipped in weights/.")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--fp32", action="store_true", help="store float32 weights (default: float16)")
    parser.add_argument("--fp32-copy", type=Path, help="also write a float32 copy here")
    for field in ("seed", "dataset_size", "vae_steps", "unet_steps", "unet_batch", "unet_lr", "vae_lr", "kl_weight",
                  "luma_weight"):
        value = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = replace(defaults, **{k: getattr(args, k) for k in vars(args) if hasattr(defaults, k)})
    train(settings, args.output, fp16=not args.fp32, fp32_copy=args.fp32_copy)


if __name__ == "__main__":
    main()
