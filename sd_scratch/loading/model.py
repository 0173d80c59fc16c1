"""What loading a checkpoint gives: the networks of one Stable Diffusion and the facts sampling needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd_scratch.schedule import SD15_SCHEDULE, ScheduleConfig
from sd_scratch.text_encoder import TextEncoder
from sd_scratch.tokenizer import Tokenizer
from sd_scratch.unet import UNet
from sd_scratch.vae import VAE


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what was found and what to do."""


@dataclass
class StableDiffusion:
    """Everything a checkpoint provides for sampling."""

    tokenizer: Tokenizer | None  # None only for the SDXL refiner, which has text_encoder_2 alone (as in diffusers)
    text_encoder: TextEncoder | None  # SD 1.x: CLIP ViT-L; SD 2.x: OpenCLIP ViT-H; SDXL: CLIP ViT-L
    unet: UNet
    vae: VAE
    kind: str  # "SD 1.x", "SD 1.x inpainting", "SD 2.x", "SDXL", "SDXL refiner", ...
    prediction_type: str  # "epsilon" or "v_prediction"
    skip_last_layers: int  # text encoder layers to skip by default (SD 2.x: 1, the penultimate layer)
    image_size: int  # the side the model was trained at: the default height and width
    source: str
    schedule: ScheduleConfig = SD15_SCHEDULE  # the training noise schedule (a diffusers folder may name another)
    # Sampling settings the model is best used with, from its metadata: the command line's defaults
    # where the user gives none (the tiny model: {"guidance": 3.0}, at which every sampler draws it right).
    defaults: dict = field(default_factory=dict)
    # A VAE from a file of its own (load_checkpoint's `vae`, --vae: vae_file.py), as the PNG's parameters name it
    # after AUTOMATIC1111: (file name, first 10 hex digits of its sha256). None: the checkpoint's own VAE.
    vae_file: tuple[str, str] | None = None
    # The LoRAs merged into the weights now, as (Lora, multiplier) pairs: lora.apply_loras sets them.
    loras: list = field(default_factory=list)
    # SDXL's second text encoder, OpenCLIP ViT-bigG (with its pooled output), and its tokenizer (padding with 0).
    text_encoder_2: TextEncoder | None = None
    tokenizer_2: Tokenizer | None = None

    @property
    def is_sdxl(self) -> bool:
        """SDXL base or refiner: a UNet with a label_emb, conditioned on a vector beside the text."""
        return self.unet.config.adm_in_channels is not None

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner: bigG alone, its vector carrying an aesthetic score where the base's has the target size."""
        return self.is_sdxl and self.text_encoder is None

    @property
    def text_encoders(self) -> list[tuple[Tokenizer, TextEncoder]]:
        """(tokenizer, text encoder) pairs in the order their outputs are concatenated: one for SD 1.x/2.x and the
        SDXL refiner, two for the SDXL base."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    @property
    def device(self) -> torch.device:
        """Where the denoising loop runs: the UNet's device."""
        return self.unet.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The precision the UNet (and so the loop's latents) computes in."""
        return self.unet.time_embed[0].weight.dtype
