"""Prompts -> what the UNet is conditioned on, and the [uncond, cond] batch of classifier-free guidance.

The text side hands the loop one `Conditioning` value and the loop hands it to the UNet as it is:

    context   (B, T, C)  the token embeddings the UNet's cross-attention reads, T = 77 per chunk of
                         prompt (SD 1.x: C = 768 from CLIP ViT-L; SD 2.x: 1024 from OpenCLIP ViT-H)
    vector    (B, D)     one vector per image for the UNet's `label_emb`, added to its timestep
                         embedding: SDXL's pooled text embedding and the Fourier features of the
                         image's size and crop. None for SD 1.x and 2.x, whose UNet has no label_emb.

A model family with more to condition on adds a builder here that fills both fields; the loop
does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # only for the annotations: loading builds the model, this module reads it
    from sd_scratch.loading import StableDiffusion

TOKENS_PER_CHUNK = 77  # CLIP's positions: the context's length is a multiple of this


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, for a batch of B images (the module docstring has the shapes)."""

    context: torch.Tensor
    vector: torch.Tensor | None = None

    def __post_init__(self):
        batch, tokens = self.context.shape[:2]
        if tokens % TOKENS_PER_CHUNK:
            raise ValueError(f"a context of {tokens} tokens: it must be a multiple of {TOKENS_PER_CHUNK}")
        if self.vector is not None and self.vector.shape[0] != batch:
            raise ValueError(f"a vector for {self.vector.shape[0]} images and a context for {batch}")

    def to(self, dtype: torch.dtype) -> Conditioning:
        """The same conditioning in the UNet's dtype."""
        return Conditioning(self.context.to(dtype), None if self.vector is None else self.vector.to(dtype))


def encode_prompts(model: StableDiffusion, prompts: list[str], skip_last_layers: int | None = None) -> Conditioning:
    """Prompts -> their Conditioning: the text encoder's (B, 77, width) embeddings as the context.

    skip_last_layers: the text encoder layers not run ("CLIP skip"); None means the model's own
    (SD 2.x reads the penultimate layer).
    """
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    tokens = model.tokenizer(prompts)
    device = model.text_encoder.text_model.final_layer_norm.weight.device
    return Conditioning(model.text_encoder(tokens.input_ids.to(device), skip_last_layers=skip_last_layers))


def guidance_batch(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """[uncond, cond] along the batch: one UNet call on the doubled latents serves both halves of
    classifier-free guidance, the unconditional (or negative-prompt) prediction first."""
    if uncond.context.shape[1:] != cond.context.shape[1:]:
        raise ValueError(f"the negative prompt's context is {tuple(uncond.context.shape[1:])} and the prompt's "
                         f"{tuple(cond.context.shape[1:])}: both halves of the guidance batch need one shape")
    if (uncond.vector is None) != (cond.vector is None):
        raise ValueError("one half of the guidance batch has a vector and the other has none")
    vector = None if cond.vector is None else torch.cat([uncond.vector, cond.vector])
    return Conditioning(torch.cat([uncond.context, cond.context]), vector)
