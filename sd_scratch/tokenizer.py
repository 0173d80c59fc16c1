"""Prompt -> token ids in 77-token frames, the input of the CLIP text encoder.

The byte-pair encoding itself (lower-casing, splitting into words, merging bytes into the 49408
vocabulary entries) is done by ``transformers.CLIPTokenizer`` from the two files in ``weights/``
(see ``weights/make_clip_vocab.py``). What Stable Diffusion adds, and what this file shows, is
the fixed frame every prompt is put into:

    [<|startoftext|>, up to 75 prompt tokens, <|endoftext|>, padding ...]   (always 77 ids)

The text encoder has only 77 positions. `Tokenizer.__call__` puts each prompt into one frame and
drops what does not fit (words are not tokens: "batman" is one token, "photorealistic" two, so it
says which words were lost); the tiny model's training uses it. Generation uses `Tokenizer.chunks`,
AUTOMATIC1111's way past the limit: the prompt's tokens are cut into chunks of 75, each put into a
frame of its own and encoded separately, and the encodings are laid end to end (77 k tokens), each
token carrying the emphasis weight `prompts.parse_emphasis` gave its piece of text.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import CLIPTokenizer

if TYPE_CHECKING:
    from sd_scratch.loading.embeddings import Embedding

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

MAX_LENGTH = 77  # CLIP's text encoder has 77 position embeddings
START_ID = 49406  # <|startoftext|>
END_ID = 49407  # <|endoftext|>
PAD_EOS = END_ID  # SD 1.x (OpenAI CLIP) pads with the end token
PAD_ZERO = 0  # SD 2.x (OpenCLIP) pads with id 0 (the token "!")
CHUNK_LENGTH = MAX_LENGTH - 2  # prompt tokens per frame, between the start and the end token
# A chunk that would end at most this many tokens after a comma ends after the comma instead, so that
# a phrase is not split between two chunks (AUTOMATIC1111's default "comma padding backtrack").
COMMA_BACKTRACK = 20
# Past this many chunks (600 tokens) the rest of a prompt is dropped, with a warning: each chunk costs one more
# text-encoder pass and lengthens every cross-attention of every UNet call, and a prompt that long is a pasted
# file far more often than a picture's description.
MAX_CHUNKS = 8


class Tokens(NamedTuple):
    input_ids: torch.Tensor  # (B, 77) int64
    attention_mask: torch.Tensor  # (B, 77) int64: 1 on start, prompt and end tokens, 0 on padding
    dropped: list[str]  # per prompt, the text cut off at the end ("" when nothing was cut)


class PromptChunks(NamedTuple):
    """One prompt as k frames of 77 (k >= 1), what the text encoder reads for it."""

    input_ids: torch.Tensor  # (k, 77) int64
    weights: torch.Tensor  # (k, 77) float32: each position's emphasis; 1 on the start, end and padding
    embeddings: list[tuple[int, int, Embedding]]  # (chunk, position, embedding): its vectors go there
    dropped: str  # the text past MAX_CHUNKS chunks ("" when nothing was cut)


class Tokenizer:
    """Turns prompts into (B, 77) token ids.

    folder: a folder with CLIP's ``vocab.json`` and ``merges.txt`` (default: this repository's
        ``weights/``; a diffusers model folder's ``tokenizer/`` works too).
    pad_token_id: the id written after the end token. PAD_EOS (49407) for SD 1.x, PAD_ZERO (0) for
        SD 2.x. The text encoder sees the padding, so the wrong choice changes the image.
    """

    def __init__(self, folder: str | Path = WEIGHTS_DIR, pad_token_id: int = PAD_EOS):
        self.bpe = CLIPTokenizer.from_pretrained(str(folder))
        self.pad_token_id = pad_token_id
        self.comma_id = self.bpe.convert_tokens_to_ids(",</w>")  # where chunks prefer to end

    def __call__(self, prompts: str | list[str]) -> Tokens:
        if isinstance(prompts, str):
            prompts = [prompts]
        body_length = MAX_LENGTH - 2  # room left between the start and the end token
        rows, masks, dropped = [], [], []
        for prompt, body in zip(prompts, self.bpe(prompts, add_special_tokens=False).input_ids):
            kept, cut = body[:body_length], body[body_length:]
            ids = [START_ID, *kept, END_ID]
            padding = MAX_LENGTH - len(ids)
            rows.append(ids + [self.pad_token_id] * padding)
            masks.append([1] * len(ids) + [0] * padding)
            dropped.append(self.bpe.decode(cut) if cut else "")
            if cut:
                warnings.warn(
                    f"prompt is {len(body)} tokens, CLIP reads only {body_length}; "
                    f"this part was dropped: {dropped[-1]!r}",
                    stacklevel=2,
                )
        return Tokens(torch.tensor(rows), torch.tensor(masks), dropped)

    def chunks(self, pieces: list[tuple[str, float]], embeddings: list[Embedding] = ()) -> PromptChunks:
        """Weighted pieces of a prompt (`prompts.parse_emphasis`) -> its frames of 77 ids, as AUTOMATIC1111 makes them.

        Each piece is tokenized on its own and its tokens take its weight. A piece ("BREAK", -1) ends the
        chunk early. Where the tokens of a textual-inversion embedding's name appear, they are replaced by as
        many placeholder positions as it has vectors (the text encoder puts the vectors there), never split
        between two chunks.
        """
        names = sorted(((self.bpe(e.name, add_special_tokens=False).input_ids, e) for e in embeddings),
                       key=lambda pair: -len(pair[0]))  # the longest name that matches wins
        frames, slots = [], []  # finished chunks: (ids, weights); (chunk, position, embedding)
        tokens, weights, placed = [], [], []  # the chunk being filled; placed: (index in tokens, embedding)
        last_comma = -1  # index in tokens of the chunk's last comma, -1: none yet

        def close_chunk():  # frame the chunk: start, its tokens, end tokens up to 77
            nonlocal tokens, weights, placed, last_comma
            padding = CHUNK_LENGTH - len(tokens)
            ids = [START_ID, *tokens, END_ID, *[self.pad_token_id] * padding]  # SD 1.x pads with END_ID too
            frames.append((ids, [1.0, *weights, 1.0, *[1.0] * padding]))
            slots.extend((len(frames) - 1, index + 1, embedding) for index, embedding in placed)  # + 1: the start
            tokens, weights, placed, last_comma = [], [], [], -1

        for text, weight in pieces:
            if (text, weight) == ("BREAK", -1.0):
                close_chunk()
                continue
            piece = self.bpe(text, add_special_tokens=False).input_ids
            position = 0
            while position < len(piece):
                if piece[position] == self.comma_id:
                    last_comma = len(tokens)
                elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                    # Full, with a comma near its end: what follows the comma opens the next chunk. (AUTOMATIC1111
                    # leaves an embedding moved this way behind; here its vectors move with its placeholders.)
                    cut = last_comma + 1
                    moved = tokens[cut:], weights[cut:], [(i - cut, e) for i, e in placed if i >= cut]
                    tokens, weights, placed = tokens[:cut], weights[:cut], [(i, e) for i, e in placed if i < cut]
                    close_chunk()
                    tokens, weights, placed = moved
                if len(tokens) == CHUNK_LENGTH:
                    close_chunk()
                name_ids, embedding = next(((ids, e) for ids, e in names if piece[position:position + len(ids)] == ids),
                                           (None, None))
                if embedding is None:
                    tokens.append(piece[position])
                    weights.append(weight)
                    position += 1
                    continue
                if len(tokens) + len(embedding.vectors) > CHUNK_LENGTH:  # its vectors stay in one chunk
                    close_chunk()
                placed.append((len(tokens), embedding))
                tokens += [0] * len(embedding.vectors)  # placeholders; any id will do, the vectors replace them
                weights += [weight] * len(embedding.vectors)
                position += len(name_ids)
        if tokens or not frames:
            close_chunk()

        dropped = ""
        if len(frames) > MAX_CHUNKS:
            dropped = " ".join(self.decode(ids) for ids, _ in frames[MAX_CHUNKS:])
            warnings.warn(f"prompt is {len(frames)} chunks of {CHUNK_LENGTH} tokens, more than the {MAX_CHUNKS} read; "
                          f"this part was dropped: {dropped!r}", stacklevel=2)
            frames, slots = frames[:MAX_CHUNKS], [slot for slot in slots if slot[0] < MAX_CHUNKS]
        return PromptChunks(torch.tensor([ids for ids, _ in frames]), torch.tensor([w for _, w in frames]), slots,
                            dropped)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The prompt text of one row of ids: what lies between the start and the first end token."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == START_ID:
            ids = ids[1:]
        if END_ID in ids:
            ids = ids[: ids.index(END_ID)]
        return self.bpe.decode(ids)
