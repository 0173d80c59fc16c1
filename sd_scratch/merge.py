"""Merge Stable Diffusion checkpoints into a new one, weight by weight: `python -m sd_scratch.merge`.

Two recipes, the two of AUTOMATIC1111's checkpoint merger. Each weight of the output is computed
from the same weight of the inputs, with the same formula for every one of them:

    weighted sum     python -m sd_scratch.merge A B --alpha 0.3 --out M.safetensors
                     M = (1 - alpha) * A + alpha * B

    add difference   python -m sd_scratch.merge A B --add-difference C --alpha 0.5 --out M.safetensors
                     M = A + alpha * (B - C)

The weighted sum interpolates between two fine-tunes of one base model: alpha 0 gives A, 1 gives B,
0.3 gives 70% of A and 30% of B. Add difference transplants a fine-tuning: when B was fine-tuned from
C (C is usually the base model, e.g. SD 1.5), B - C is what the fine-tuning changed, and A gets
alpha times that change (alpha 1: all of it) on top of its own. Any finite alpha is taken: outside
0..1 the weighted sum extrapolates, past A or past B, which is rarely useful.

Both only make sense between models of one architecture, and are computed only between them: the
inputs must hold the same tensors with the same shapes (SD 1.5 with SD 2.1 is refused, naming the
tensors that differ). Tensors that inference does not use (EMA copies, the training schedule's
buffers, position_ids; `IGNORED_KEYS` of single_file.py) may be in one file only; what happens to
each tensor of A:

    merged              a floating-point tensor of A that every input holds with A's shape
    copied from A       integer tensors, the constants (position_ids, the schedule's buffers), and
                        ignored tensors some other input lacks (as AUTOMATIC1111 does: it keeps A's)
    (not written)       tensors of B or C that A lacks: the output has A's tensors, as A1111's

The arithmetic is done in float32 (float64 for float64 tensors), the result stored in A's dtype, or
in --dtype's: on float32 inputs each output tensor is, bit for bit, what torch computes from the
formula above. The output's safetensors metadata is A's, plus the recipe under the names A1111
writes: `sd_merge_recipe` (method, multiplier, the inputs' sha256) and `sd_merge_models` (each
input's name and hashes, and the recipes of inputs that were merges themselves). Hashing reads every
input once more (a second or so per GB); --no-hash records the inputs' sizes and A1111's legacy hash only.

Memory stays near that of the interpreter: a checkpoint is never loaded whole. A .safetensors file
starts with a JSON header naming every tensor's dtype, shape and byte range, so the output's header
can be written first, from the inputs' headers alone, and then each tensor's bytes one after the
other, computed a slice of CHUNK_ELEMENTS elements at a time from slices read with plain file reads
(not memory-mapped: mapped pages that were read count as the process's memory while mapped). The
arithmetic runs on one thread: on slices this small it is bound by memory, not by the cores, and a
second OpenMP thread, waiting for the other at every operation, made a merge on a busy 2-core machine
five times slower.

A pickled .ckpt input is read weights-only (torch.load(weights_only=True), as loading reads it):
no code stored in it runs, but it is not streamed, it costs up to its size in memory.

The output is written to a temporary file next to it and given its name only when complete: an
interrupted merge leaves nothing behind, and an existing file is never replaced without --force.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd_scratch.cli import finite_float
from sd_scratch.loading.int8_file import INT8_METADATA_KEY
from sd_scratch.loading.model import CheckpointError
from sd_scratch.loading.single_file import IGNORED_KEYS, identify
from sd_scratch.loading.strict import list_keys
from sd_scratch.loading.tensor_file import DTYPE_NAMES, SAFETENSORS_DTYPES, TensorFile, safetensors_header
from sd_scratch.new_file import write_new_file

CHUNK_ELEMENTS = 1 << 20  # elements of a tensor read, merged and written at a time (4 MB of float32)
KEYS_NAMED = 5  # names an error or a note lists before it says how many more there are
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype
# Constants, not learned weights: copied from A, never averaged. position_ids is an arange that some files
# store as floats (A1111 skips it too); the rest are the training noise schedule's buffers (A1111 merges only
# keys containing "model", which leaves them out too).
CONSTANTS = re.compile(
    r"(^|\.)position_ids$|^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|"
    r"sqrt_one_minus_alphas_cumprod|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|"
    r"sqrt_recipm1_alphas_cumprod|posterior_variance|"
    r"posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar)$"
)


class MergeError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise MergeError(message)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m sd_scratch.merge",
                       description="Merge two Stable Diffusion checkpoints: (1 - alpha) * A + alpha * B, or with "
                                   "--add-difference C: A + alpha * (B - C).")
    p.add_argument("a", type=Path, metavar="A", help="the first model (.safetensors, or a .ckpt read weights-only); "
                   "the output has its tensors, dtypes and metadata")
    p.add_argument("b", type=Path, metavar="B", help="the second model, of A's architecture")
    p.add_argument("--add-difference", type=Path, metavar="C",
                   help="add alpha * (B - C) to A instead of averaging: C is usually the model B was fine-tuned from")
    p.add_argument("--alpha", type=finite_float, required=True,
                   help="weighted sum: B's share, between 0 (A) and 1 (B) to interpolate (0.3: 70%% A, 30%% B); "
                        "add difference: how much of B - C to add (1: all of it). Any finite number is taken: "
                        "outside 0..1 it extrapolates")
    p.add_argument("--out", type=Path, required=True, help="the merged file to write (.safetensors)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="store every floating-point tensor in this precision (default: each in A's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-hash", action="store_true",
                   help="do not compute the inputs' sha256 for the recipe in the metadata (it reads each input "
                        "once more); their sizes and A1111's legacy hashes are recorded still")
    return p


# --------------------------------------------------------------------------------------------------
# Reading: an input's header up front, its tensors a slice at a time


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # a safetensors tensor's first byte in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """One input file: every tensor's dtype and shape, and its elements read a slice at a time.

    A .safetensors file is read with plain reads into one reusable buffer, so that what was read is not
    held; the header is read and checked by the project's TensorFile. A pickle is loaded weights-only.
    """

    def __init__(self, path: Path, role: str):
        self.path, self.role = path, role  # role: "A", "B" or "C"
        if not path.exists():
            raise MergeError(f"{role}: {path} not found")
        if not path.is_file():
            raise MergeError(f"{role}: {path} is not a file; merging takes single-file checkpoints (.safetensors)")
        try:
            with open(path, "rb") as f:
                head = f.read(8)
            if TensorFile.is_pickle(path, head):
                self._open_pickle(path)
            else:
                self._open_safetensors(path, head)
        except CheckpointError as error:
            raise MergeError(f"{role}: {error}") from None
        except OSError as error:
            raise MergeError(f"{role}: cannot read {path}: {error.strerror or error}") from None

    def _open_safetensors(self, path: Path, head: bytes) -> None:
        header, data_start = TensorFile.read_header(path, head)
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        if INT8_METADATA_KEY in self.metadata:  # averaging q of different scales means nothing
            raise MergeError(f"{self.role}: {path} holds 8-bit weights (sd_scratch.quantize): merge the float "
                             "checkpoints, then quantize the merge")
        self.entries = {}
        for key, entry in header.items():
            try:
                dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
                begin, end = entry["data_offsets"]
                sizes_agree = all(isinstance(n, int) and n >= 0 for n in (*shape, begin)) and \
                    end - begin == math.prod(shape) * dtype.itemsize
            except (TypeError, ValueError):
                sizes_agree = False
            if not sizes_agree:
                raise MergeError(f"{self.role}: {path} is not a readable safetensors file (its header gives "
                                 f"tensor {key} a byte range that does not fit its shape); it may be damaged: "
                                 "download it again")
            self.entries[key] = Entry(dtype, shape, data_start + begin)
        # In the order of the file's bytes: A's tensors are then read from start to end.
        self.entries = dict(sorted(self.entries.items(), key=lambda item: item[1].offset))
        self._file = open(path, "rb")  # noqa: SIM115 - open while merging; closed by close()
        self._buffer = bytearray(CHUNK_ELEMENTS * 8)  # the widest dtype's slice
        self._tensors = None

    def _open_pickle(self, path: Path) -> None:
        file = TensorFile(path)  # torch.load(weights_only=True): a pickle holding more than tensors is refused
        tensors = {key: file.get(key) for key in file.keys}
        unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in DTYPE_NAMES})
        if unknown:
            raise MergeError(f"{self.role}: {path} holds tensors of types safetensors cannot store: "
                             f"{', '.join(unknown)}")
        self.metadata, self._file = {}, None
        self.entries = {key: Entry(t.dtype, tuple(t.shape)) for key, t in tensors.items()}
        self._tensors = {key: t.reshape(-1) for key, t in tensors.items()}  # flat: slices are views

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements start..stop of tensor `key`, flattened. A .safetensors slice lives in this file's
        buffer: it is valid until the next read."""
        entry = self.entries[key]
        if self._tensors is not None:
            return self._tensors[key][start:stop]
        size = entry.dtype.itemsize
        view = memoryview(self._buffer)[:(stop - start) * size]
        self._file.seek(entry.offset + start * size)
        done = 0
        while done < len(view):  # a read may return less than asked
            got = self._file.readinto(view[done:])
            if not got:
                raise MergeError(f"{self.role}: {self.path} ended while being read: was it changed during the merge?")
            done += got
        return torch.frombuffer(self._buffer, dtype=entry.dtype, count=stop - start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    @property
    def kind(self) -> str | None:
        """"SD 1.x", "SD 2.x", "SDXL", or None for anything else: to name architectures in errors."""
        keys = list(self.entries)
        try:
            return identify(keys, self.path)
        except CheckpointError:
            return "SDXL" if any(k.startswith("conditioner.embedders.") for k in keys) else None


# --------------------------------------------------------------------------------------------------
# Planning: which tensors are merged, which copied, the output's header


@dataclass(frozen=True)
class Step:
    """One tensor of the output."""

    key: str
    dtype: torch.dtype  # as written
    shape: tuple[int, ...]
    merged: bool  # False: A's tensor as it is (cast to --dtype if floating-point)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check_architectures(a: Checkpoint, others: list[Checkpoint]) -> None:
    """Refuse inputs that do not hold the same tensors with the same shapes (besides the ignored ones)."""
    for other in others:
        differences = []
        for key in sorted(a.entries.keys() | other.entries.keys()):
            if IGNORED_KEYS.match(key):
                continue
            if key not in other.entries:
                differences.append(f"{key} (only in {a.role})")
            elif key not in a.entries:
                differences.append(f"{key} (only in {other.role})")
            elif a.entries[key].shape != other.entries[key].shape:
                differences.append(f"{key} ({a.role} {list(a.entries[key].shape)}, "
                                   f"{other.role} {list(other.entries[key].shape)})")
        if differences:
            kinds = (a.kind, other.kind)
            said = f" ({kinds[0] or 'unknown kind'} and {kinds[1] or 'unknown kind'})" if any(kinds) else ""
            raise MergeError(
                f"{a.role} ({a.path.name}) and {other.role} ({other.path.name}) are not of one architecture{said}: "
                f"{len(differences)} tensors differ: {list_keys(differences, KEYS_NAMED)}; merging needs the same "
                "tensors with the same shapes"
            )


def plan(inputs: list[Checkpoint], dtype: torch.dtype | None) -> list[Step]:
    """The output's tensors: A's, in A's order, each merged or copied (see the module's docstring)."""
    a, others = inputs[0], inputs[1:]
    steps = []
    for key, entry in a.entries.items():
        merged = (entry.dtype.is_floating_point and not CONSTANTS.search(key)
                  and all(key in x.entries and x.entries[key].shape == entry.shape for x in others))
        out_dtype = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
        steps.append(Step(key, out_dtype, entry.shape, merged))
    return steps


def header_bytes(steps: list[Step], metadata: dict[str, str]) -> bytes:
    """The output's safetensors header (tensor_file.safetensors_header), the tensors in the order they are written."""
    return safetensors_header(((step.key, step.dtype, step.shape) for step in steps), metadata)


# --------------------------------------------------------------------------------------------------
# The recipe, in the output's metadata


def sha256_of(path: Path) -> str:
    """The file's sha256 (A1111's and civitai's model hash; its first 10 digits are A1111's short hash)."""
    digest, buffer = hashlib.sha256(), bytearray(16 << 20)
    with open(path, "rb") as f:
        while count := f.readinto(buffer):
            digest.update(memoryview(buffer)[:count])
    return digest.hexdigest()


def legacy_hash(path: Path) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at 1 MiB into the file, 8 digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def parsed(text: str | None):
    """A metadata value that holds JSON, parsed (as A1111 reads them); other text as it is."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def recipe_formula(alpha: float, add_difference: bool) -> str:
    return f"A + {alpha} * (B - C)" if add_difference else f"(1 - {alpha}) * A + {alpha} * B"


def recipe_metadata(inputs: list[Checkpoint], hashes: list[str | None], alpha: float, dtype_name: str | None) -> dict:
    """A's metadata (the output has A's layout; an sd_scratch config in it keeps the file loadable), and the
    recipe under A1111's key names, nesting the inputs' own recipes as A1111's merger does. sd_merge_models
    is keyed by sha256, as A1111's, or by file name when the inputs were not hashed."""
    add_difference = len(inputs) == 3
    metadata = {k: v for k, v in inputs[0].metadata.items() if k not in ("sd_merge_recipe", "sd_merge_models")}
    metadata["format"] = "pt"
    recipe = {
        "type": "sd_scratch",
        **{f"{rank}_model_hash": hashes[i] if i < len(inputs) else None
           for i, rank in enumerate(("primary", "secondary", "tertiary"))},
        "interp_method": "Add difference" if add_difference else "Weighted sum",
        "multiplier": alpha,
        "save_as_half": dtype_name == "fp16",
        "formula": recipe_formula(alpha, add_difference),
        "dtype": dtype_name or "A's",
        "models": {x.role: {"name": x.path.name, "bytes": x.path.stat().st_size, "sha256": h}
                   for x, h in zip(inputs, hashes)},
    }
    models = {}
    for x, h in zip(inputs, hashes):
        models[h or x.path.name] = {"name": x.path.name, "legacy_hash": legacy_hash(x.path),
                     "sd_merge_recipe": parsed(x.metadata.get("sd_merge_recipe"))}
        if isinstance(earlier := parsed(x.metadata.get("sd_merge_models")), dict):
            models.update(earlier)
    metadata["sd_merge_recipe"] = json.dumps(recipe)
    metadata["sd_merge_models"] = json.dumps(models)
    return metadata


# --------------------------------------------------------------------------------------------------
# Merging


class Workspace:
    """Float buffers of CHUNK_ELEMENTS, made once and reused for every slice: a new tensor per operation would
    cost more than the arithmetic (each new block's pages are zeroed by the OS on first touch)."""

    def __init__(self):
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, count: int) -> torch.Tensor:
        if (name, dtype) not in self._buffers:
            self._buffers[name, dtype] = torch.empty(CHUNK_ELEMENTS, dtype=dtype)
        return self._buffers[name, dtype][:count]


def combine(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, alpha: float, work: Workspace) -> torch.Tensor:
    """One slice of the recipe, computed in float32 (float64 when an input is), in place in the workspace's
    buffers but with the formula's operations in the formula's order: the same bits as torch computing
    `(1 - alpha) * a + alpha * b` or `a + alpha * (b - c)` on the float32 tensors."""
    compute = torch.float64 if torch.float64 in (a.dtype, b.dtype, getattr(c, "dtype", None)) else torch.float32
    x, y = work.get("a", compute, len(a)).copy_(a), work.get("b", compute, len(b)).copy_(b)
    if c is None:
        return x.mul_(1 - alpha).add_(y.mul_(alpha))
    z = work.get("c", compute, len(c)).copy_(c)
    return x.add_(y.sub_(z).mul_(alpha))


def write_tensors(f, inputs: list[Checkpoint], steps: list[Step], alpha: float, progress: tqdm) -> None:
    """Each tensor's bytes, one after the other, computed CHUNK_ELEMENTS elements at a time."""
    a, others, work = inputs[0], inputs[1:], Workspace()
    for step in steps:
        for start in range(0, step.numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, step.numel)
            piece = a.read(step.key, start, stop)
            if step.merged:
                b = others[0].read(step.key, start, stop)
                c = others[1].read(step.key, start, stop) if len(others) == 2 else None
                piece = combine(piece, b, c, alpha, work)
            if piece.dtype != step.dtype:  # the result in A's dtype, or in --dtype
                piece = work.get("out", step.dtype, len(piece)).copy_(piece)
            f.write(piece.view(torch.uint8).numpy())
            progress.update((stop - start) * step.dtype.itemsize)


APPEARED = "{out} appeared during the merge and was left as it is (--force replaces it)"


def check_output(out: Path, force: bool) -> None:
    if out.suffix != ".safetensors":
        raise MergeError(f"--out {out}: the merged file is written as safetensors: give it a .safetensors name")
    if out.is_dir():
        raise MergeError(f"--out {out} is a folder: give the merged file's name")
    if out.exists() and not force:
        raise MergeError(f"{out} exists: sd_scratch never overwrites a file (--force replaces it)")
    if not out.parent.is_dir():
        raise MergeError(f"--out {out}: the folder {out.parent} does not exist")


def merge(a: Path, b: Path, out: Path, alpha: float, c: Path | None = None, dtype: str | None = None,
          force: bool = False, hash_inputs: bool = True) -> str:
    """Write the merge of a and b (with c: add difference) to out; return what was done, in words."""
    check_output(out, force)
    started = time.perf_counter()
    inputs = []
    try:
        for path, role in [(a, "A"), (b, "B"), (c, "C")]:
            if path is not None:
                inputs.append(Checkpoint(path, role))
        check_architectures(inputs[0], inputs[1:])
        steps = plan(inputs, DTYPES.get(dtype))
        total = sum(step.numel * step.dtype.itemsize for step in steps)
        free = shutil.disk_usage(out.parent).free
        if free < total + (1 << 20):  # the tensors and (much less than) a MB of header
            raise MergeError(f"the merged file needs {total / 1e9:.2f} GB and {out.parent} has "
                             f"{free / 1e9:.2f} GB free")
        hashes = [sha256_of(x.path) if hash_inputs else None for x in inputs]
        header = header_bytes(steps, recipe_metadata(inputs, hashes, alpha, dtype))

        def write(f):
            f.write(header)
            with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=None) as progress:
                write_tensors(f, inputs, steps, alpha, progress)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see the module's docstring
        try:
            write_new_file(out, write, replace=force)
        except FileExistsError:
            raise MergeError(APPEARED.format(out=out)) from None
        finally:
            torch.set_num_threads(threads)
    except OSError as error:  # a file unreadable or unwritable midway, the disk full: nothing is left written
        raise MergeError(f"merging into {out} failed: {error.strerror or error}") from None
    finally:
        for x in inputs:
            x.close()
    copied = [step.key for step in steps if not step.merged]
    left_out = sorted({key for x in inputs[1:] for key in x.entries} - set(inputs[0].entries))
    lines = [f"merged {len(steps) - len(copied)} tensors as {recipe_formula(alpha, c is not None)}"]
    if copied:
        lines.append(f"copied {len(copied)} from A: {list_keys(copied, KEYS_NAMED)}")
    if left_out:
        lines.append(f"left out {len(left_out)} that A lacks: {list_keys(left_out, KEYS_NAMED)}")
    lines.append(f"wrote {out} ({(len(header) + total) / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        print(merge(args.a, args.b, args.out, args.alpha, args.add_difference, args.dtype, args.force,
                    not args.no_hash))
        return 0
    except MergeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
