"""Prompt -> 77 token ids, the input of the CLIP text encoder.

The byte-pair encoding itself (lower-casing, splitting into words, merging bytes into the 49408
vocabulary entries) is done by ``transformers.CLIPTokenizer`` from the two files in ``weights/``
(see ``weights/make_clip_vocab.py``). What Stable Diffusion adds, and what this file shows, is
the fixed frame every prompt is put into:

    [<|startoftext|>, up to 75 prompt tokens, <|endoftext|>, padding ...]   (always 77 ids)

Tokens past the 75th are dropped: the text encoder has only 77 positions. Words are not tokens
("batman" is one token, "photorealistic" is two: "photo" + "realistic</w>"), so we say which
words were lost.
"""

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import CLIPTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

MAX_LENGTH = 77  # CLIP's text encoder has 77 position embeddings
START_ID = 49406  # <|startoftext|>
END_ID = 49407  # <|endoftext|>
PAD_EOS = END_ID  # SD 1.x (OpenAI CLIP) pads with the end token
PAD_ZERO = 0  # SD 2.x (OpenCLIP) pads with id 0 (the token "!")


class Tokens(NamedTuple):
    input_ids: torch.Tensor  # (B, 77) int64
    attention_mask: torch.Tensor  # (B, 77) int64: 1 on start, prompt and end tokens, 0 on padding
    dropped: list[str]  # per prompt, the text cut off at the end ("" when nothing was cut)


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

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The prompt text of one row of ids: what lies between the start and the first end token."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == START_ID:
            ids = ids[1:]
        if END_ID in ids:
            ids = ids[: ids.index(END_ID)]
        return self.bpe.decode(ids)
