"""Prompts -> what the UNet is conditioned on, and the [uncond, cond] batch of classifier-free guidance.

The text side hands the loop one `Conditioning` value and the loop hands it to the UNet as it is:

    context   (B, T, C)  the token embeddings the UNet's cross-attention reads, T = 77 per chunk of
                         prompt (SD 1.x: C = 768 from CLIP ViT-L; SD 2.x: 1024 from OpenCLIP ViT-H)
    vector    (B, D)     one vector per image for the UNet's `label_emb`, added to its timestep
                         embedding: SDXL's pooled text embedding and the Fourier features of the
                         image's size and crop. None for SD 1.x and 2.x, whose UNet has no label_emb.

A model family with more to condition on adds a builder here that fills both fields; the loop
does not change. SDXL's (Podell et al. 2023, "SDXL"):

    context   CLIP ViT-L's penultimate layer (768) and OpenCLIP bigG's (1280), side by side: (B, 77 k, 2048)
    vector    bigG's pooled output (1280), then 256 Fourier features (the timestep's sinusoids) of each of
              original height, original width, crop top, crop left, target height, target width: 2816.
              The refiner (bigG alone, context 1280) puts one aesthetic score where the target size was: 2560.

The sizes tell the UNet what kind of training picture to imitate: SDXL was trained on pictures of every
size, each upscaled to the training size and randomly cropped, with the original size and the crop given
as conditioning. Asking for "original 1024x1024, crop (0, 0)" asks for a sharp, uncropped picture.

Prompts are read in AUTOMATIC1111's syntax (`prompts.py`): emphasis weights scale the encoded tokens
(`emphasize`), a prompt longer than 75 tokens is encoded in chunks laid end to end (`tokenizer.py`),
textual-inversion embeddings put their learned vectors in place of their names, and prompt editing
(`[from:to:when]`, `[a|b]`) gives a different conditioning for different stretches of steps
(`ConditioningSchedule`), between which the loop switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from sd_scratch.prompts import parse_emphasis, prompt_schedule, text_at_step
from sd_scratch.unet import timestep_embedding

if TYPE_CHECKING:  # only for the annotations: loading builds the model, this module reads it
    from sd_scratch.loading import StableDiffusion
    from sd_scratch.loading.embeddings import Embedding

TOKENS_PER_CHUNK = 77  # CLIP's positions: the context's length is a multiple of this
FOURIER_FEATURES = 256  # SDXL: the width of each size number's sinusoidal embedding (sgm's outdim)


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


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's "micro-conditioning": the sizes, as (height, width) and (top, left) in pixels, and for the refiner
    the aesthetic scores (its training pictures' rated beauty, 0 to 10; the negative prompt's half gets the low one).
    `for_size` gives the usual defaults, which diffusers and the original sampling scripts use."""

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    @classmethod
    def for_size(cls, height: int, width: int) -> SizeConditioning:
        """Original size = target size = the picture asked for, no crop."""
        return cls(original_size=(height, width), target_size=(height, width))


@dataclass(frozen=True)
class EncodedText:
    """One prompt through the text encoders: its context (77 k, width), SDXL's pooled output (projection width;
    None for SD 1.x/2.x) and the names of the textual-inversion embeddings it used."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    embeddings_used: frozenset[str]


def encode_text(model: StableDiffusion, prompt: str, skip_last_layers: int,
                embeddings: list[Embedding] = ()) -> EncodedText:
    """One prompt in AUTOMATIC1111's syntax through each of the model's text encoders. SDXL's two contexts are
    laid side by side (channels 0-767 from ViT-L, 768-2047 from bigG), read without the final layer norm; its
    pooled output is bigG's for the first chunk (as AUTOMATIC1111 takes it), read at the last layer whatever
    the CLIP skip."""
    pieces = parse_emphasis(prompt)
    contexts, pooled, used = [], None, set()
    for tokenizer, encoder in model.text_encoders:
        chunks = tokenizer.chunks(pieces, embeddings)
        ids = chunks.input_ids.to(encoder.text_model.final_layer_norm.weight.device)
        token_embeddings = encoder.text_model.embeddings.token_embedding(ids)
        for chunk, position, embedding in chunks.embeddings:  # textual inversion: learned vectors where the name was
            vectors = embedding.vectors_for(encoder.config.width).to(token_embeddings)
            token_embeddings[chunk, position:position + len(vectors)] = vectors
        with_pooled = model.is_sdxl and encoder.config.projection_dim is not None
        z, chunk_pooled = encoder.encode(ids, skip_last_layers, token_embeddings, final_layer_norm=not model.is_sdxl,
                                         pooled=with_pooled)  # z: (k, 77, width), each chunk encoded on its own
        contexts.append(emphasize(z, chunks.weights.to(z.device)).flatten(0, 1))
        if chunk_pooled is not None:
            pooled = chunk_pooled[0].float()
        used.update(e.name for _, _, e in chunks.embeddings)
    return EncodedText(torch.cat(contexts, dim=-1), pooled, frozenset(used))


def encode_prompt(model: StableDiffusion, prompt: str, skip_last_layers: int,
                  embeddings: list[Embedding] = ()) -> tuple[torch.Tensor, set[str]]:
    """One prompt in AUTOMATIC1111's syntax -> its context (77 k, width), k its chunks, and the names of the
    embeddings it used."""
    encoded = encode_text(model, prompt, skip_last_layers, embeddings)
    return encoded.context, set(encoded.embeddings_used)


def size_vector(model: StableDiffusion, pooled: torch.Tensor, sizes: SizeConditioning,
                negative: bool = False) -> torch.Tensor:
    """SDXL's conditioning vector for B images: (B, pooled width) -> (B, adm_in_channels), the pooled text and the
    Fourier features of the sizes (the base) or of the sizes and the aesthetic score (the refiner: `negative` picks
    the negative prompt's score)."""
    if model.is_refiner:  # the refiner (bigG alone): its vector carries the aesthetic score
        score = sizes.negative_aesthetic_score if negative else sizes.aesthetic_score
        numbers = [*sizes.original_size, *sizes.crop, score]
    else:
        numbers = [*sizes.original_size, *sizes.crop, *sizes.target_size]
    # Each number gets the timestep's sinusoidal embedding, 256 wide, in this order: (h, w, top, left, ...)
    features = timestep_embedding(torch.tensor(numbers, dtype=torch.float32), FOURIER_FEATURES).flatten()
    vector = torch.cat([pooled.float(), features.to(pooled.device).expand(len(pooled), -1)], dim=1)
    if vector.shape[1] != model.unet.config.adm_in_channels:
        raise ValueError(f"a conditioning vector of {vector.shape[1]} numbers for a UNet that takes "
                         f"{model.unet.config.adm_in_channels}: the text encoders do not fit this UNet")
    return vector


def zeros_for_empty_negative(model: StableDiffusion) -> bool:
    """Whether an empty negative prompt gives zero context and zero pooled output instead of the encoded "": the
    SDXL base does (its original sampling scripts, diffusers' force_zeros_for_empty_prompt, AUTOMATIC1111); the
    refiner encodes "" (its diffusers config does not zero); SD 1.x/2.x encode "" as they were trained."""
    return model.is_sdxl and not model.is_refiner


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
                   embeddings: list[Embedding] = (), sizes: SizeConditioning | None = None,
                   negative: bool = False) -> Conditioning:
    """Prompts -> their Conditioning: the text encoders' embeddings, (B, 77 k, width), as the context; for SDXL
    the vector too, from `sizes` (default: SizeConditioning.for_size of the model's image size; `negative` picks
    the refiner's negative aesthetic score).

    skip_last_layers: the text encoder layers not run ("CLIP skip"); None means the model's own
    (SD 2.x and SDXL read the penultimate layer).
    """
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    encoded = [encode_text(model, prompt, skip_last_layers, embeddings) for prompt in prompts]
    context = pad_to_chunks([e.context for e in encoded], lambda: encode_text(model, "", skip_last_layers).context)
    if not model.is_sdxl:
        return Conditioning(context)
    sizes = sizes or SizeConditioning.for_size(model.image_size, model.image_size)
    return Conditioning(context, size_vector(model, torch.stack([e.pooled for e in encoded]), sizes, negative))


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
                          guided: bool, skip_last_layers: int | None = None, embeddings: list[Embedding] = (),
                          sizes: SizeConditioning | None = None) -> ConditioningSchedule:
    """Every prompt and the negative prompt, each read by `prompts.prompt_schedule` over `steps` steps, encoded
    once per distinct text, and batched for each stretch of steps where none of them changes. With `guided`
    each stretch's conditioning is the guidance batch [negative, prompts]; prompts and negative prompt are
    then padded to one chunk count with the encoded empty prompt, so that one UNet call serves both halves
    (AUTOMATIC1111's option "pad prompt/negative prompt"; by default it runs the two halves separately at
    their own lengths when they differ, which gives the same numbers at the cost of a second UNet call).
    SDXL: each half gets its vector from `sizes` (default: the model's image size); the base's empty negative
    prompt is zeros (`zeros_for_empty_negative`).
    """
    skip_last_layers = model.skip_last_layers if skip_last_layers is None else skip_last_layers
    sizes = sizes or SizeConditioning.for_size(model.image_size, model.image_size)
    schedules = [prompt_schedule(prompt, steps) for prompt in [negative_prompt, *prompts]]
    encoded: dict[str, EncodedText] = {}

    def encode(text) -> EncodedText:
        if text not in encoded:
            encoded[text] = encode_text(model, text, skip_last_layers, embeddings)
        return encoded[text]

    def contexts(texts) -> torch.Tensor:  # (B, 77 k, width), padded to one chunk count with the encoded ""
        return pad_to_chunks([encode(t).context for t in texts], lambda: encode("").context)

    def vectors(texts, negative=False, zeros=False) -> torch.Tensor | None:  # SDXL's, else None
        if not model.is_sdxl:
            return None
        pooled = torch.stack([encode(t).pooled for t in texts])
        return size_vector(model, torch.zeros_like(pooled) if zeros else pooled, sizes, negative)

    stretches, previous = [], None
    # AUTOMATIC1111 compares the step index, counted from 0, with the schedule's ends, counted from 1: so
    # [a:b:10] draws 'a' at indices 0 to 10 (11 steps) and [a|b] 'a' at indices 0 and 1. Kept as it is.
    for last in sorted({end for schedule in schedules for end, _ in schedule}):
        texts = [text_at_step(schedule, last) for schedule in schedules]
        if texts == previous:  # nothing changes here: the previous stretch goes on
            stretches[-1] = (last, stretches[-1][1])
            continue
        negative, prompt_texts = texts[0], texts[1:]
        n = len(prompt_texts)
        negatives = [negative] * n
        if not guided:
            stretch = Conditioning(contexts(prompt_texts), vectors(prompt_texts))
        elif negative == "" and zeros_for_empty_negative(model):  # SDXL base: zeros for "nothing", sizes kept
            cond = Conditioning(contexts(prompt_texts), vectors(prompt_texts))
            # (the prompts' pooled outputs, zeroed: the shape without encoding "")
            stretch = guidance_batch(Conditioning(torch.zeros_like(cond.context),
                                                  vectors(prompt_texts, negative=True, zeros=True)), cond)
        else:
            both = contexts(negatives + prompt_texts)
            stretch = guidance_batch(Conditioning(both[:n], vectors(negatives, negative=True)),
                                     Conditioning(both[n:], vectors(prompt_texts)))
        stretches.append((last, stretch))
        previous = texts
    used = frozenset(name for e in encoded.values() for name in e.embeddings_used)
    return ConditioningSchedule(tuple(stretches), used)


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
