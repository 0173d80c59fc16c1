"""Reading tensors from a checkpoint file, one at a time, and handing their memory back when done.

Two kinds of file hold Stable Diffusion weights: `.safetensors` (a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes) and the older PyTorch pickles (`.ckpt`), which are
read with `torch.load(weights_only=True)` only, so that no code stored in them can run.

A safetensors file is memory-mapped: each tensor is a view of the file's pages, read from disk when
first touched, never copied when the model keeps the file's dtype. `release_weights` hands those
pages back to the OS once a network has done its part of a run.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from sd_scratch.loading.model import CheckpointError

PREFETCH_CHUNK = 128 << 10  # bytes: the smallest read-ahead window Linux ships with (TensorFile.prefetch)

# The element types a .safetensors header names, and the torch dtype of each.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors' name


def safetensors_header(tensors, metadata: dict[str, str]) -> bytes:
    """What a .safetensors file starts with, for `tensors` ((name, dtype, shape) in the order their bytes follow):
    8 bytes of length, then JSON naming each tensor's dtype, shape and byte range (counted from the end of the
    header, one tensor after the other), padded with spaces to a multiple of 8. merge.py and int8_file.py, which
    stream their tensors one at a time after it, write it with this; TensorFile.read_header reads it."""
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class TensorFile:
    """The tensors of one file, read one at a time so that the weights are never held twice.

    A .safetensors file is simple enough to read by hand: 8 bytes (a little-endian integer N), N bytes
    of JSON, {name: {"dtype": "F16", "shape": [320, 4, 3, 3], "data_offsets": [begin, end]}, ...,
    "__metadata__": {...}}, then the raw bytes of every tensor, offsets counted from the end of the
    JSON. The file is memory-mapped and each tensor is a view of its bytes. A pickle (.ckpt) is read safely.
    """

    def __init__(self, path: Path):
        self.path = path
        self.metadata: dict[str, str] = {}
        with open(path, "rb") as f:
            head = f.read(8)
        if self.is_pickle(path, head):
            self._pickle = self._read_pickle(path)
            self.keys = list(self._pickle)
            return
        self._pickle = None
        self._entries, self._data_start = self.read_header(path, head)
        with open(path, "rb") as f:  # copy-on-write mapping: tensors viewing it are writable, the file is not
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        _MAPPINGS.add(self._map)
        self.metadata = self._entries.pop("__metadata__", None) or {}
        self.keys = list(self._entries)

    @staticmethod
    def is_pickle(path: Path, head: bytes) -> bool:
        """Whether the file is a PyTorch pickle, by its suffix or its first bytes (a zip archive, or pickle's
        protocol marker) rather than a .safetensors file."""
        return path.suffix in (".ckpt", ".pt", ".pth", ".bin") or head[:2] == b"PK" or head[:1] == b"\x80"

    @staticmethod
    def read_header(path: Path, head: bytes) -> tuple[dict, int]:
        """The JSON header (every tensor's dtype, shape and byte range; "__metadata__") and where the data start."""
        def unreadable(reason):
            return CheckpointError(
                f"{path} is not a readable safetensors file ({reason}); it may be truncated or of another "
                f"format: download it again, or give a .safetensors / .ckpt Stable Diffusion checkpoint"
            )

        size = path.stat().st_size
        header_length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= header_length <= size - 8:
            raise unreadable("no header")
        with open(path, "rb") as f:
            f.seek(8)
            try:
                entries = json.loads(f.read(header_length))
                tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
                data_end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
                unknown = {v["dtype"] for v in tensors.values()} - set(SAFETENSORS_DTYPES)
            except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
                raise unreadable("its header is not safetensors JSON") from None
        if unknown:
            raise unreadable(f"unsupported element types {sorted(unknown)}")
        if 8 + header_length + data_end > size:
            raise unreadable(f"truncated: the header describes {8 + header_length + data_end} bytes, the file has {size}")
        return entries, 8 + header_length

    @staticmethod
    def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
        # weights_only=True never runs code from the file: a pickle that needs more than tensors is refused.
        # Memory-mapping needs torch's zip format (torch.save since 1.6); older pickles are read into memory.
        with open(path, "rb") as f:
            is_zip = f.read(2) == b"PK"
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: we load tensors, or refuse
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as error:  # noqa: BLE001 - any failure here means "not a tensor pickle we can trust"
            raise CheckpointError(
                f"{path} could not be read as a weights-only PyTorch pickle ({why_refused(error)}); convert it "
                "to .safetensors, or use the .safetensors release of the same model"
            ) from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickle is not None:
            return tuple(self._pickle[key].shape)
        return tuple(self._entries[key]["shape"])

    def stored_dtype(self, key: str) -> torch.dtype:
        if self._pickle is not None:
            return self._pickle[key].dtype
        return SAFETENSORS_DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, cast to `dtype` (floating-point tensors only) and moved to `device`.

        A safetensors tensor starts as a view of the memory-mapped file: no copy, and the pages are
        read from disk when first touched. When the cast or move makes a copy, the view's pages are
        handed back to the kernel at once, so the file's bytes and the copy are not held together.
        """
        tensor = self._pickle[key] if self._pickle is not None else self._view(key)
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        result = tensor.to(device=device or tensor.device, dtype=target_dtype)
        if self._pickle is None and result.data_ptr() != tensor.data_ptr():
            self.release(key)
        return result

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of this file's memory (read in place, not copied)."""
        if self._pickle is not None:
            return False
        start = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
        return 0 <= tensor.untyped_storage().data_ptr() - start < len(self._map)

    def _view(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin).reshape(entry["shape"])

    def prefetch(self, *groups: list[str]) -> None:
        """Start reading the bytes of each group of tensors into the OS's file cache, group by group, on a background
        thread, and return at once. A mapped weight is read from the disk only when first touched, a page fault at
        a time with a small read-ahead; on a cold start (after a reboot, or once the OS has needed the memory)
        that made the first UNet step wait for the disk. POSIX_FADV_WILLNEED asks for whole stretches of the file,
        while the rest of the load and the text encoder work. Nothing is mapped into the process (its resident
        memory does not grow); pages already cached cost nothing. Measured on SD 1.5's fp32 file with the file
        cache dropped, reading every UNet weight 1 s after the load took 3.3 to 3.5 s without this and 0.4 to
        0.5 s with it, and the load 0.6 to 0.75 s instead of 0.35 s (the whole run: whole_run_phases.py --cold)."""
        if self._pickle is not None or not hasattr(os, "posix_fadvise"):
            return
        ranges = []  # (begin, end) in the file, neighbours merged
        for group in groups:
            stretches = sorted(tuple(self._data_start + offset for offset in self._entries[key]["data_offsets"])
                               for key in group)
            for begin, end in stretches:
                if ranges and ranges[-1][1] == begin:
                    ranges[-1] = (ranges[-1][0], end)
                else:
                    ranges.append((begin, end))

        def read_ahead():
            with open(self.path, "rb") as f:
                for begin, end in ranges:  # Linux reads at most its read-ahead window (128 kB by default) a call
                    for start in range(begin, end, PREFETCH_CHUNK):
                        os.posix_fadvise(f.fileno(), start, min(PREFETCH_CHUNK, end - start), os.POSIX_FADV_WILLNEED)

        threading.Thread(target=read_ahead, name="sd_scratch prefetch", daemon=True).start()

    def release(self, key: str) -> None:
        """Hand the pages of tensor `key` back to the OS (read again from the file if touched again): for a tensor
        whose copy has been made."""
        if self._pickle is not None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = (self._data_start + offset for offset in self._entries[key]["data_offsets"])
        drop_whole_pages(self._map, begin, end)


def why_refused(error: Exception) -> str:
    """torch.load's reason in one short phrase: the unpickler's own words when it names what it would not
    load (its message around them is advice to turn the safety off, which we do not give)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        reason = reason.split(". Please")[0].split(" Check the documentation")[0].rstrip(".")
        return f"it holds more than tensors: {reason}"
    first = " ".join(text.split())
    return first[:first.index(". ") + 1] if ". " in first[:200] else first[:200]


_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # mapped checkpoint files, while their weights live


def release_weights(module: nn.Module) -> None:
    """Let the OS reclaim the memory of `module`'s weights that are views of a checkpoint file.

    A single-file checkpoint loaded on the CPU in its own dtype is not copied: its weights are the
    file's pages, read into memory when first used. Once a network has done its part of a run (the
    text encoder after the prompts, the UNet after the loop), `generate` calls this so that those
    pages stop counting against the process while the next network works. Nothing is lost:
    MADV_DONTNEED unmaps a page of the file, which stays in the OS's file cache, and the next touch
    maps it again (from the cache, or the disk if the OS has needed the memory since). A page written
    since loading is the process's own copy, which DONTNEED would throw away: `written_pages` finds those,
    and they stay. Copied weights (a cast, the GPU) are untouched. Linux only; elsewhere it does nothing.

    (Not MADV_PAGEOUT, which this used before: it evicts the pages from the file cache as well, so the
    next run, in a new process, read the 3.4 GB of SD 1.5's UNet from the disk again.)
    """
    if sys.platform != "linux":
        return
    starts = {mapping: torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() for mapping in _MAPPINGS}
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            for mapping, start in starts.items():
                offset = storage.data_ptr() - start
                if 0 <= offset < len(mapping):
                    first = offset // mmap.PAGESIZE  # pages of the mapping, counted from its start
                    last = -(-min(offset + storage.nbytes(), len(mapping)) // mmap.PAGESIZE)
                    written = written_pages(pagemap, start // mmap.PAGESIZE + first, last - first)
                    for begin, end in runs_without(written, first, last):
                        mapping.madvise(mmap.MADV_DONTNEED, begin * mmap.PAGESIZE, (end - begin) * mmap.PAGESIZE)


def written_pages(pagemap, first_page: int, count: int) -> list[int]:
    """Which of `count` pages of virtual memory from `first_page` on are the process's own (anonymous) copies,
    as /proc/self/pagemap says: one 64-bit entry a page, bit 63 present, bit 62 swapped, bit 61 a page of a
    file (or shared). A page of a private file mapping that was written is present or swapped, not a file's.
    Returned as offsets from first_page."""
    pagemap.seek(first_page * 8)
    entries = memoryview(pagemap.read(count * 8)).cast("Q")
    in_memory, of_a_file = (1 << 63) | (1 << 62), 1 << 61
    return [i for i, entry in enumerate(entries) if entry & in_memory and not entry & of_a_file]


def runs_without(skipped: list[int], first: int, last: int) -> list[tuple[int, int]]:
    """The runs [begin, end) of pages from first to last, leaving out those `skipped` (offsets from first)."""
    runs, begin = [], first
    for page in skipped:
        if first + page > begin:
            runs.append((begin, first + page))
        begin = first + page + 1
    if last > begin:
        runs.append((begin, last))
    return runs


def release_view(tensor: torch.Tensor) -> None:
    """Hand back the pages of `tensor` if it is a view of a mapped checkpoint file whose copy has been made (as
    TensorFile.get does after a cast; int8_file.py after quantising a weight as it is read): the whole pages
    inside its storage's bytes are dropped, to be read again from the file (or the OS's cache) if touched
    again. Nothing happens to a tensor of its own memory. Only at load time: MADV_DONTNEED forgets a page
    written since (release_weights is the one for later)."""
    if not hasattr(mmap, "MADV_DONTNEED") or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    for mapping in _MAPPINGS:
        offset = storage.data_ptr() - torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
        if 0 <= offset < len(mapping):
            drop_whole_pages(mapping, offset, min(offset + storage.nbytes(), len(mapping)))
            return


def drop_whole_pages(mapping: mmap.mmap, begin: int, end: int) -> None:
    """MADV_DONTNEED on the whole pages inside bytes [begin, end) of `mapping` (a page shared with a neighbouring
    tensor is kept): unmapped, to be mapped again from the file (or the OS's cache) if touched again."""
    first_page = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    last_page = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last_page > first_page:
        mapping.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)


def free_weights(module: nn.Module) -> None:
    """Drop `module`'s weights for good: each becomes an empty tensor (the same Parameter, so that whatever refers
    to it stays valid) and its memory, copied or mapped, goes back to the OS once nothing else holds it. For a run that is the last use of a network in this
    process (the command line's last batch) when the weights are copies, a cast from the file's dtype, which
    release_weights cannot hand back. The network cannot compute again: load the checkpoint again for that."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.new_empty(0)


def weights_freed(module: nn.Module) -> bool:
    """Whether free_weights dropped `module`'s weights."""
    return any(tensor.numel() == 0 for tensor in module.parameters())
