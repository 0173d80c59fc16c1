"""Textual-inversion embeddings: new words for the prompt, read from the files people share.

The text encoder turns each token of a prompt into a vector (its token embedding, 768 numbers wide
for SD 1.x, 1024 for SD 2.x) before its transformer layers read them. Textual inversion trains no
weight of the model: it learns a few new token embeddings, as if the vocabulary had words for
"this character" or "the flaws of bad images". An embedding is those vectors, n of them, (n, width):
where its trigger word appears in a prompt, the n vectors take the place of the word's tokens, so it
uses n of the 75 token positions of a chunk.

    easynegative = load_embedding("embeddings/easynegative.safetensors", width=768)
    easynegative.name, easynegative.vectors.shape   # "easynegative", (8, 768)

The files, as AUTOMATIC1111's web UI and diffusers read them:

    A1111 .safetensors   one tensor, "emb_params", (n, width) or (width,)
    A1111 .pt            a pickled dict: "string_to_param": {"*": (n, width)}, with "string_to_token",
                         "name", "step", "sd_checkpoint", "sd_checkpoint_name" beside it (ignored here)
    diffusers            learned_embeds.bin / .safetensors: {"<token>": (width,) or (n, width)}, one key
    SDXL                 "clip_l" and "clip_g": vectors for each of SDXL's two text encoders (refused:
                         sd_scratch does not load SDXL checkpoints yet)

The trigger word is the file's name without its extension, as in A1111 (the "name" stored in a .pt is
ignored, as A1111 ignores it). The one exception is diffusers' learned_embeds.*, a name the training
script gives every file: there the word is the file's one key, with its angle brackets stripped
("<cat-toy>" -> "cat-toy"), or the "name" a .pt in A1111's layout stores.

A pickle (.pt, .bin) can hold Python code that runs as it is read. It is read with
`torch.load(weights_only=True)` only, which builds tensors and plain containers and refuses anything
else, so no code in the file ever runs; a file it refuses is reported, never read another way. The
one class allowed beyond torch's own list is nn.ParameterDict, in which the original textual-inversion
code stored its "string_to_param": data only, rebuilt without running anything from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.tensor_file import TensorFile, why_refused

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # what load_embeddings_dir reads, in any letter case
PICKLE_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif", ".jpg", ".jpeg")  # A1111 can hide an embedding in an image
DIFFUSERS_FILE_STEM = "learned_embeds"  # diffusers' training script names every embedding file this
TEXT_ENCODER_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x"}  # the width of the token embeddings -> the model family
SHORT_HASH_LENGTH = 12  # A1111's "TI hashes": the first 12 hex digits of the sha256 of the file


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the one-line message names the file, what was found and what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: equality by identity, since comparing tensors gives no single bool
class Embedding:
    """A textual-inversion embedding: a trigger word and the vectors that replace it in a prompt."""

    name: str  # the word that calls it in a prompt: the file's stem, e.g. "easynegative"
    vectors: torch.Tensor = field(repr=False)  # (n, width) float32 on the CPU: it takes n token positions
    short_hash: str  # the first 12 hex digits of the sha256 of the file's bytes, as A1111 writes in "TI hashes"
    path: Path

    def vectors_for(self, width: int) -> torch.Tensor:
        """The vectors for a text encoder whose token embeddings are `width` wide."""
        if self.vectors.shape[1] != width:
            raise EmbeddingError(_width_mismatch(self.path, self.vectors.shape[1], width))
        return self.vectors


def load_embedding(path: str | Path, width: int | None = None) -> Embedding:
    """Read one textual-inversion embedding file (A1111 .safetensors or .pt, diffusers' learned_embeds.*).

    width: the text encoder's token-embedding width (768 for SD 1.x, 1024 for SD 2.x); when given, an
    embedding made for another width is refused, since its vectors would mean nothing to this encoder.
    The name is the file's stem, except for diffusers' learned_embeds.*, named by the token stored inside
    (its one key without "<" ">"). The vectors come back as float32 on the CPU, whatever the file stores.
    """
    path = Path(path)
    if not path.exists():
        raise EmbeddingError(f"embedding not found: {path}; check the path (an embedding is a .safetensors, "
                             ".pt or .bin file)")
    if path.is_dir():
        raise EmbeddingError(f"{path} is a folder, not an embedding file: give the file inside it (diffusers: "
                             "learned_embeds.safetensors or .bin), or read them all with load_embeddings_dir")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise EmbeddingError(f"{path} is an image: embeddings stored in images are not read; use the .safetensors "
                             "or .pt file of the embedding")
    if path.stat().st_size == 0:
        raise EmbeddingError(f"{path} is empty (0 bytes): the download or copy did not finish; get the file again")

    tensor, stored_word = _find_vectors(path, _read_contents(path))
    vectors = _as_vectors(path, tensor)
    if width is not None and vectors.shape[1] != width:
        raise EmbeddingError(_width_mismatch(path, vectors.shape[1], width))
    return Embedding(name=_trigger_word(path, stored_word), vectors=vectors, short_hash=short_hash(path), path=path)


def load_embeddings_dir(folder: str | Path, width: int | None = None) -> list[Embedding]:
    """Every embedding in `folder` (its *.safetensors, *.pt and *.bin files, not its subfolders), sorted by name.

    A file that cannot be read stops the loading with that file's error, so that no embedding a prompt
    names goes missing unnoticed. Two files giving one trigger word (x.pt and x.safetensors, or names
    differing only in letter case, which the lower-casing tokenizer cannot tell apart) are an error too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise EmbeddingError(f"embeddings folder {what}: {folder}; give the folder that holds the embedding files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES)
    by_word: dict[str, Embedding] = {}
    for file in files:
        embedding = load_embedding(file, width)
        earlier = by_word.setdefault(embedding.name.casefold(), embedding)
        if earlier is not embedding:
            raise EmbeddingError(f"{earlier.path.name} and {file.name} in {folder} both give the trigger word "
                                 f"{embedding.name!r}: a prompt word can call only one, so remove or rename one")
    return sorted(by_word.values(), key=lambda e: (e.name.casefold(), e.name))


def short_hash(path: str | Path, length: int = SHORT_HASH_LENGTH) -> str:
    """The hash A1111 writes for an embedding in "TI hashes": sha256 of the whole file, first 12 hex digits
    (for a VAE, in "VAE hash": the first 10)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def _read_contents(path: Path) -> object:
    """What the file holds: the unpickled object of a pickle, or {name: tensor} of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
    # The bytes decide, not the name: b"PK" starts torch's zip format, b"\x80" a plain pickle (protocol 2+).
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return _read_pickle(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise EmbeddingError(f"{path} is not a PyTorch pickle (its first bytes are not a pickle's): it is damaged "
                             "or another kind of file; download the embedding again")
    try:
        tensors = TensorFile(path)
    except CheckpointError:  # its message speaks of checkpoints; the problem is the same, the advice is not
        raise EmbeddingError(f"{path} is neither a PyTorch pickle nor a readable safetensors file (it may be "
                             "truncated, or another kind of file): download the embedding again") from None
    # The tensors are views of the memory-mapped file, read only when touched: a checkpoint given by
    # mistake is refused from its names alone.
    return {key: tensors.get(key) for key in tensors.keys}


def _read_pickle(path: Path) -> object:
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older ones refuse the class
    allow_parameter_dict = safe_globals([torch.nn.ParameterDict]) if safe_globals else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), allow_parameter_dict:
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: we load tensors, or refuse
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a tensor pickle we can trust"
        # The unpickler names what it would not build or call, in one of two wordings: "Unsupported global:
        # GLOBAL os.system was not an allowed global" or "Trying to load unsupported GLOBAL posix.system
        # whose module posix is blocked"; or it refuses to call or create something it was handed.
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused or "unrecognized function" in str(error) or "Can only create new object" in str(error):
            what = f" ({refused.group(1)})" if refused else ""
            raise EmbeddingError(f"{path} holds Python code beyond tensors{what}, which is not loaded, for safety; "
                                 "use a .safetensors version of this embedding") from None
        raise EmbeddingError(f"{path} could not be read as a PyTorch pickle ({why_refused(error)}); it may be "
                             "truncated or damaged: download it again, or use its .safetensors version") from None


def _find_vectors(path: Path, contents: object) -> tuple[object, str | None]:
    """The one tensor of vectors in a file's contents, and the trigger word the file stores, if any."""
    if not isinstance(contents, dict):
        raise EmbeddingError(f"{path} holds a {type(contents).__name__}, where an embedding file holds a dict "
                             "(string_to_param, emb_params, or diffusers' {token: vectors}): it is not an "
                             "embedding file")
    if "clip_l" in contents or "clip_g" in contents:
        raise EmbeddingError(f"{path} is an SDXL embedding (vectors for clip_l and clip_g): SDXL embeddings need "
                             "an SDXL checkpoint, which sd_scratch does not load yet")
    if "string_to_param" in contents:  # A1111's .pt
        params = contents["string_to_param"]
        params = getattr(params, "_parameters", params)  # the original code's nn.ParameterDict holds them there
        if not isinstance(params, dict) or len(params) != 1:
            found = f"{len(params)} entries" if isinstance(params, dict) else f"a {type(params).__name__}"
            raise EmbeddingError(f"{path} holds {found} in string_to_param, where an embedding has one tensor: "
                                 "it is damaged or not an embedding")
        stored_name = contents.get("name")
        return next(iter(params.values())), stored_name if isinstance(stored_name, str) else None
    if len(contents) == 1 and isinstance(next(iter(contents.values())), torch.Tensor):
        key = next(iter(contents))  # "emb_params" (A1111), or the token trained for (diffusers)
        return contents[key], (key if key != "emb_params" else None)
    if not contents:
        raise EmbeddingError(f"{path} holds no tensors: it is damaged or not an embedding; download it again")
    keys = sorted(map(str, contents))
    listed = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    if "state_dict" in contents or len(contents) > 16:
        raise EmbeddingError(f"{path} holds {len(keys)} entries ({listed}): it looks like a model checkpoint or "
                             "LoRA, not an embedding")
    raise EmbeddingError(f"{path} holds {len(keys)} entries ({listed}), where an embedding holds one tensor "
                         "(emb_params, string_to_param, or diffusers' one token): it is not an embedding file")


def _as_vectors(path: Path, tensor: object) -> torch.Tensor:
    """The stored tensor as (n, width) float32 on the CPU, in memory of its own (not a view of the file)."""
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingError(f"{path} holds a {type(tensor).__name__} where the vectors should be: it is "
                             "not an embedding")
    if not tensor.is_floating_point():
        raise EmbeddingError(f"{path} holds {str(tensor.dtype).removeprefix('torch.')} numbers, where an "
                             "embedding's vectors are floating-point: it is not an embedding")
    if tensor.dim() == 1:  # diffusers stores a one-vector embedding as (width,)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise EmbeddingError(f"{path} holds a tensor of shape {tuple(tensor.shape)}, where an embedding is "
                             "(vectors, width) or (width,): it is not an embedding")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise EmbeddingError(f"{path} holds no vectors (shape {tuple(tensor.shape)}): the file is damaged; "
                             "download it again")
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _trigger_word(path: Path, stored_word: str | None) -> str:
    if path.stem.lower() != DIFFUSERS_FILE_STEM:
        word = path.stem
    elif stored_word is None:
        raise EmbeddingError(f"{path} does not say which word calls it (the name {DIFFUSERS_FILE_STEM} is "
                             "the same for every diffusers embedding): rename the file to that word, e.g. "
                             f"cat-toy{path.suffix}")
    else:
        word = stored_word.strip().strip("<>")
    if not word.strip():
        raise EmbeddingError(f"{path} gives the trigger word {word!r}, which cannot be typed in a prompt: rename "
                             f"the file to the word you want, e.g. my-style{path.suffix}")
    return word


def _width_mismatch(path: Path, found: int, expected: int) -> str:
    # The families listed with the file's own first, when its width is one we know.
    families = sorted(TEXT_ENCODER_FAMILIES.items(), key=lambda item: item[0] != found)
    (first_width, first_family), others = families[0], families[1:]
    widths = f"{first_family} embeddings are {first_width} wide" + "".join(f", {f} {w}" for w, f in others)
    return (f"{path} holds vectors of width {found}, but this text encoder's width is {expected}: it was made "
            f"for another model family ({widths}); use it with a model of its family")
