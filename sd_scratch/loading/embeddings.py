"""Textual-inversion embeddings: new words for the prompt, read from the files people share.

The text encoder turns each token of a prompt into a vector (its token embedding, 768 numbers wide
for SD 1.x, 1024 for SD 2.x; SDXL's two encoders, 768 and 1280) before its transformer layers read
them. Textual inversion trains no weight of the model: it learns a few new token embeddings, as if the
vocabulary had words for "this character" or "the flaws of bad images". An embedding is those vectors,
n of them, (n, width): where its trigger word appears in a prompt, the n vectors take the place of the
word's tokens, so it uses n of the 75 token positions of a chunk.

    easynegative = load_embedding("embeddings/easynegative.safetensors", width=768)
    easynegative.name, easynegative.vectors.shape   # "easynegative", (8, 768)

The files, as AUTOMATIC1111's web UI and diffusers read them:

    A1111 .safetensors   one tensor, "emb_params", (n, width) or (width,)
    A1111 .pt            a pickled dict: "string_to_param": {"*": (n, width)}, with "string_to_token",
                         "name", "step", "sd_checkpoint", "sd_checkpoint_name" beside it (ignored here)
    diffusers            learned_embeds.bin / .safetensors: {"<token>": (width,) or (n, width)}, one key
    SDXL                 "clip_l" (n, 768) and "clip_g" (n, 1280): vectors for each of SDXL's two text
                         encoders, CLIP ViT-L and OpenCLIP bigG, the same n for both (A1111, ComfyUI)

An embedding belongs to a model family, told by its widths: one set of vectors for SD 1.x/2.x (as wide
as the model's one text encoder), both clip_l and clip_g for SDXL. A file of one family is refused with
a model of the other, as A1111 refuses it. The SDXL refiner, bigG alone, takes an SDXL file's clip_g.

    negative = load_embedding("embeddings/negativeXL_D.safetensors", width=(768, 1280))
    negative.vectors_for(768).shape, negative.vectors_for(1280).shape   # (8, 768), (8, 1280)

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
    # (n, width) float32 on the CPU: it takes n token positions. For SDXL, the first text encoder's (clip_l; the
    # refiner's clip_g): every encoder's are in vectors_by_width.
    vectors: torch.Tensor = field(repr=False)
    short_hash: str  # the first 12 hex digits of the sha256 of the file's bytes, as A1111 writes in "TI hashes"
    path: Path
    # Each text encoder's vectors, by the encoder's width: {768: clip_l, 1280: clip_g} for SDXL; {width: vectors}
    # for SD 1.x/2.x (filled from `vectors` when not given).
    vectors_by_width: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.vectors_by_width:
            object.__setattr__(self, "vectors_by_width", {self.vectors.shape[1]: self.vectors})  # frozen: set once

    def vectors_for(self, width: int) -> torch.Tensor:
        """The vectors for a text encoder whose token embeddings are `width` wide."""
        if width in self.vectors_by_width:
            return self.vectors_by_width[width]
        if len(self.vectors_by_width) == 1:
            raise EmbeddingError(_width_mismatch(self.path, self.vectors.shape[1], width))
        raise EmbeddingError(f"{self.path} holds vectors {_widths(self.vectors_by_width)} wide, none for a text "
                             f"encoder {width} wide: use it with a model of its family")


def load_embedding(path: str | Path, width: int | tuple[int, ...] | None = None) -> Embedding:
    """Read one textual-inversion embedding file (A1111 .safetensors or .pt, diffusers' learned_embeds.*, SDXL's
    clip_l + clip_g).

    width: the width of the model's text encoder's token embeddings (768 for SD 1.x, 1024 for SD 2.x), or of
    each of its text encoders in order ((768, 1280) for SDXL, (1280,) for its refiner); when given, an
    embedding made for another family is refused, since its vectors would mean nothing to these encoders.
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

    widths = (width,) if isinstance(width, int) else None if width is None else tuple(width)
    contents = _read_contents(path)
    if isinstance(contents, dict) and ("clip_l" in contents or "clip_g" in contents):
        (by_width, vectors), stored_word = _sdxl_vectors(path, contents, widths), None
    else:
        tensor, stored_word = _find_vectors(path, contents)
        vectors = _as_vectors(path, tensor)
        _check_one_set(path, vectors, widths)
        by_width = {vectors.shape[1]: vectors}
    return Embedding(name=_trigger_word(path, stored_word), vectors=vectors, short_hash=short_hash(path), path=path,
                     vectors_by_width=by_width)


def load_embeddings_dir(folder: str | Path, width: int | tuple[int, ...] | None = None) -> list[Embedding]:
    """Every embedding in `folder` (its *.safetensors, *.pt and *.bin files, not its subfolders), sorted by name;
    `width` as for load_embedding.

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


def _check_one_set(path: Path, vectors: torch.Tensor, widths: tuple[int, ...] | None) -> None:
    """An SD 1.x/2.x embedding's one set of vectors fits a model of one text encoder that wide."""
    if widths is not None and len(widths) > 1:  # A1111 refuses these too: SDXL's encoders need a set each
        family = TEXT_ENCODER_FAMILIES.get(vectors.shape[1], "a one-encoder model")
        raise EmbeddingError(f"{path} holds one set of vectors, {vectors.shape[1]} wide (an embedding for {family}), "
                             f"but this model has {len(widths)} text encoders, {_widths(widths)} wide: use an "
                             "embedding made for SDXL (clip_l and clip_g)")
    if widths is not None and vectors.shape[1] != widths[0]:
        raise EmbeddingError(_width_mismatch(path, vectors.shape[1], widths[0]))


def _sdxl_vectors(path: Path, contents: dict, widths: tuple[int, ...] | None
                  ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """An SDXL file's vectors by width, {clip_l's: clip_l, clip_g's: clip_g}, and those of the model's first text
    encoder; `widths`, the model's encoders' (None: any), checked. clip_l is CLIP ViT-L's, SDXL's first encoder,
    clip_g OpenCLIP bigG's, its second and the refiner's only one: the key names them, the widths must agree."""
    extra = sorted(map(str, set(contents) - {"clip_l", "clip_g"}))
    if extra or "clip_l" not in contents or "clip_g" not in contents:
        found = ", ".join(sorted(map(str, contents)))
        raise EmbeddingError(f"{path} holds {found}, where an SDXL embedding holds clip_l and clip_g alone: it is "
                             "damaged or not an embedding")
    clip_l, clip_g = _as_vectors(path, contents["clip_l"]), _as_vectors(path, contents["clip_g"])
    if len(clip_l) != len(clip_g):
        raise EmbeddingError(f"{path} holds {len(clip_l)} vectors in clip_l but {len(clip_g)} in clip_g, where an "
                             "SDXL embedding has as many for each text encoder: it is damaged")
    if clip_l.shape[1] == clip_g.shape[1]:  # a width can then no longer tell the encoders apart
        raise EmbeddingError(f"{path} holds clip_l and clip_g of one width, {clip_l.shape[1]}, where SDXL's two "
                             "text encoders differ: it is damaged or not an SDXL embedding")
    found = (clip_l.shape[1], clip_g.shape[1])
    if widths is None or widths == found:
        return {found[0]: clip_l, found[1]: clip_g}, clip_l
    if widths == found[1:]:  # the refiner: bigG alone
        return {found[0]: clip_l, found[1]: clip_g}, clip_g
    if len(widths) == 1:  # A1111 refuses it too
        family = TEXT_ENCODER_FAMILIES.get(widths[0], "a one-encoder model")
        raise EmbeddingError(f"{path} is an SDXL embedding (clip_l and clip_g, {_widths(found)} wide), but this "
                             f"model has one text encoder, {widths[0]} wide ({family}): use it with an SDXL model, "
                             "or use an embedding made for this model")
    raise EmbeddingError(f"{path} holds clip_l and clip_g {_widths(found)} wide, but this model's text encoders are "
                         f"{_widths(widths)} wide: it was made for another model; use it with a model of its family")


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


def _widths(widths) -> str:
    return " and ".join(map(str, widths))


def _width_mismatch(path: Path, found: int, expected: int) -> str:
    # The families listed with the file's own first, when its width is one we know.
    families = sorted(TEXT_ENCODER_FAMILIES.items(), key=lambda item: item[0] != found)
    (first_width, first_family), others = families[0], families[1:]
    widths = f"{first_family} embeddings are {first_width} wide" + "".join(f", {f} {w}" for w, f in others)
    return (f"{path} holds vectors of width {found}, but this text encoder's width is {expected}: it was made "
            f"for another model family ({widths}); use it with a model of its family")
