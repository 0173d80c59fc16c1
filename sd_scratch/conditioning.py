"""Prompts -> what the UNet is conditioned on, and the [uncond, cond] batch of classifier-free guidance.

The text side hands the loop one `Conditioning` value and the loop hands it to the UNet as it is:

    context   (B, T, C)  the token embeddings the UNet's cross-attention reads, T = 77 per chunk of
                         prompt (SD 1.x: C = 768 from CLIP ViT-L; SD 2.x: 1024 from OpenCLIP ViT-H)
    vector    (B, D)     one vector per image for the UNet's `label_emb`, added to its timestep
                         embedding: SDXL's pooled text embedding and the Fourier features of the
                         image's size and crop. None for SD 1.x and 2.x, whose UNet has no label_emb.

A model family with more to condition on adds a builder here that fills both fields; the loop
does not change.

Prompts are read in AUTOMATIC1111's syntax (`prompts.py`): emphasis weights scale the encoded tokens
(`emphasize`), a prompt longer than 75 tokens is encoded in chunks laid end to end (`tokenizer.py`),
textual-inversion embeddings put their learned vectors in place of their names, and prompt editing
(`[from:to:when]`, `[a|b]`) gives a different conditioning for different stretches of steps
(`ConditioningSchedule`), between which the loop switches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from sd_scratch.prompts import parse_emphasis, prompt_schedule, text_at_step

if TYPE_CHECKING:  # only for the annotations: loading builds the model, this module reads it
    from sd_scratch.loading import StableDiffusion
    from sd_scratch.loading.embeddings import Embedding

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


def encode_prompt(model: StableDiffusion, prompt: str, skip_last_layers: int,
                  embeddings: list[Embedding] = ()) -> tuple[torch.Tensor, set[str]]:
    """One prompt in AUTOMATIC1111's syntax -> its context (77 k, width), k its chunks, and the names of the
    embeddings it used."""
    chunks = model.tokenizer.chunks(parse_emphasis(prompt), embeddings)
    encoder = model.text_encoder
    ids = chunks.input_ids.to(encoder.text_model.final_layer_norm.weight.device)
    token_embeddings = encoder.text_model.embeddings.token_embedding(ids)
    for chunk, position, embedding in chunks.embeddings:  # textual inversion: learned vectors where the name was
        vectors = embedding.vectors.to(token_embeddings)
        token_embeddings[chunk, position:position + len(vectors)] = vectors
    z = encoder(ids, skip_last_layers, token_embeddings)  # (k, 77, width): each chunk encoded on its own
    return emphasize(z, chunks.weights.to(z.device)).flatten(0, 1), {e.name for _, _, e in chunks.embeddings}


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's emphasis ("Original"): each token's output vector times its weight, then each chunk
    rescaled so that its mean over tokens and channels is what it was. So (word:1.2) makes that word's
    vectors larger than the others', while the chunk as a whole keeps its scale.

    z: (k, 77, width); weights: (k, 77). AUTOMATIC1111 takes the mean over the whole batch of prompts at
    once, here each prompt's own, which is the same when the batch repeats one prompt (its usual case) and
    keeps each image independent of the others in the batch. The means are taken in float64: a chunk's mean
    can lie near 0 (2e-5 against values of size 0.8, in a small random model), where float32's rounding of
    the sums would be magnified in the ratio.
    """
    z = z.float()
    weighted = z * weights[..., None]
    old_mean, new_mean = z.double().mean(dim=(1, 2), keepdim=True), weighted.double().mean(dim=(1, 2), keepdim=True)
    return weighted * (old_mean / new_mean).float()


def pad_to_chunks(contexts: list[torch.Tensor], empty: Callable[[], torch.Tensor]) -> torch.Tensor:
    """(77 k_i, width) contexts -> (B, 77 k, width), k the largest k_i: shorter ones continue with the encoded empty
    prompt, `empty()` (77, width), as AUTOMATIC1111 fills a batch of prompts with empty chunks. `empty` is only
    called (the empty prompt only encoded) when some context is shorter."""
    length = max(len(c) for c in contexts)
    if all(len(c) == length for c in contexts):
        return torch.stack(contexts)
    return torch.stack([torch.cat([c, *[empty()] * ((length - len(c)) // TOKENS_PER_CHUNK)]) for c in contexts])


def encode_prompts(model: StableDiffusion, prompts: list[str], skip_last_layers: int | None = None,
                   embeddings: list[Embedding] = ()) -> Conditioning:
    """Prompts -> their Conditioning: the text encoder's embeddings, (B, 77 k, width), as the context.

    skip_last_layers: the text encoder layers not run ("CLIP skip"); None means the model's own
    (SD 2.x reads the penultimate layer).
    """
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    contexts = [encode_prompt(model, prompt, skip_last_layers, embeddings)[0] for prompt in prompts]
    return Conditioning(pad_to_chunks(contexts, lambda: encode_prompt(model, "", skip_last_layers)[0]))


@dataclass(frozen=True)
class ConditioningSchedule:
    """Prompt editing: one Conditioning for each stretch of steps, as (last step, conditioning) in step order.
    A prompt without `[from:to:when]` or `[a|b]` has one stretch."""

    stretches: tuple[tuple[int, Conditioning], ...]
    embeddings_used: frozenset[str] = frozenset()  # the names of the textual-inversion embeddings the prompts used

    def to(self, dtype: torch.dtype) -> ConditioningSchedule:
        """The same schedule in the UNet's dtype."""
        return ConditioningSchedule(tuple((last, c.to(dtype)) for last, c in self.stretches), self.embeddings_used)

    def at(self, step: int) -> Conditioning:
        """The conditioning of step `step` (counted from 0), AUTOMATIC1111's rule: the first stretch ending at or
        after it."""
        return next(conditioning for last, conditioning in self.stretches if step <= last)


def schedule_conditioning(model: StableDiffusion, prompts: list[str], negative_prompt: str, steps: int, *,
                          guided: bool, skip_last_layers: int | None = None,
                          embeddings: list[Embedding] = ()) -> ConditioningSchedule:
    """Every prompt and the negative prompt, each read by `prompts.prompt_schedule` over `steps` steps, encoded
    once per distinct text, and batched for each stretch of steps where none of them changes. With `guided`
    each stretch's conditioning is the guidance batch [negative, prompts]; prompts and negative prompt are
    then padded to one chunk count with the encoded empty prompt, so that one UNet call serves both halves
    (AUTOMATIC1111's option "pad prompt/negative prompt"; by default it runs the two halves separately at
    their own lengths when they differ, which gives the same numbers at the cost of a second UNet call).
    """
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    schedules = [prompt_schedule(prompt, steps) for prompt in [negative_prompt, *prompts]]
    encoded, used = {}, set()  # text -> its context; the embeddings any text used

    def context(text):
        if text not in encoded:
            encoded[text], names = encode_prompt(model, text, skip_last_layers, embeddings)
            used.update(names)
        return encoded[text]

    empty = functools.partial(context, "")  # encoded once, and only if a prompt needs padding
    stretches, previous = [], None
    # AUTOMATIC1111 compares the step index, counted from 0, with the schedule's ends, counted from 1: so
    # [a:b:10] draws 'a' at indices 0 to 10 (11 steps) and [a|b] 'a' at indices 0 and 1. Kept as it is.
    for last in sorted({end for schedule in schedules for end, _ in schedule}):
        texts = [text_at_step(schedule, last) for schedule in schedules]
        if texts == previous:  # nothing changes here: the previous stretch goes on
            stretches[-1] = (last, stretches[-1][1])
            continue
        negative, prompt_texts = texts[0], texts[1:]
        if guided:
            batch = pad_to_chunks([context(negative)] * len(prompt_texts) + [context(t) for t in prompt_texts], empty)
            conditioning = guidance_batch(Conditioning(batch[:len(prompt_texts)]),
                                          Conditioning(batch[len(prompt_texts):]))
        else:
            conditioning = Conditioning(pad_to_chunks([context(t) for t in prompt_texts], empty))
        stretches.append((last, conditioning))
        previous = texts
    return ConditioningSchedule(tuple(stretches), frozenset(used))


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
