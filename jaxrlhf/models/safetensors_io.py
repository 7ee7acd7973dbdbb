"""Reading and writing the safetensors format without materializing whole checkpoints.

Reading memory-maps each file and hands out zero-copy numpy views, so a loader can copy just
the slice one device needs. Writing is planned from shapes alone (which file each tensor goes
to, at which byte), files are created at their full size, and then any process writes any slice
of a tensor into place with pwrite, so no host needs a whole tensor. bfloat16 goes through
ml_dtypes, which numpy alone lacks.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# What a model computes in (F64 is cast down on load); integer, bool and F8 tensors are quantized weights.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Name parts of the extra tensors quantized checkpoints carry (GPTQ/AWQ, bitsandbytes, FP8).
QUANTIZATION_NAMES = {"qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale"}
QUANTIZATION_NAMES |= {"weight_zero_point", "SCB", "absmax", "quant_map", "quant_state"}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: its file, dtype, shape and byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def array(self) -> np.ndarray:
        """A read-only memory-mapped view; nothing is read until it is indexed."""
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.file}: tensor of unsupported dtype {self.dtype}")
        data = np.memmap(self.file, dtype=np.uint8, mode="r", offset=self.start, shape=(self.end - self.start,))
        return data.view(DTYPES[self.dtype]).reshape(self.shape)


def read_header(path: str) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file; a damaged or truncated file is an error naming it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise ValueError(f"{path}: not a safetensors file, or truncated (its header is cut off)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: damaged safetensors header ({error})") from None
    base = 8 + header_len
    end = max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"), default=0)
    if base + end > size:
        raise ValueError(f"{path}: truncated: its tensors need {base + end} bytes, the file has {size}")
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
    return refs


def index_checkpoint(directory: str) -> dict[str, TensorRef]:
    """All tensors of a Hugging Face directory: model.safetensors or a sharded index."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single_path = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        refs = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(directory, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"{shard_path}: shard listed in {index_path} is missing")
            refs.update(read_header(shard_path))
        return check_float_tensors(directory, refs)
    if os.path.exists(single_path):
        return check_float_tensors(directory, read_header(single_path))
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)"
    )


def check_float_tensors(directory: str, refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Refuses, naming the first, tensors a model cannot compute in: integer, bool or F8 dtypes, or
    the scales and zero points of a quantized checkpoint (cast to float they would train as noise)."""
    bad = [
        name
        for name, ref in sorted(refs.items())
        if ref.dtype not in FLOAT_DTYPES or QUANTIZATION_NAMES.intersection(name.split("."))
    ]
    if bad:
        more = f" ({len(bad)} such tensors)" if len(bad) > 1 else ""
        raise ValueError(
            f"{directory}: tensor {bad[0]} is {refs[bad[0]].dtype}; quantized or integer checkpoints "
            f"are not supported{more}"
        )
    return refs


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_shard_size(size: int | str) -> int:
    """Bytes per file from transformers' `max_shard_size` notation: an int, "5GB" (10**9),
    "5GiB" (2**30), likewise MB/MiB/KB/KiB; a lower-case b means bits ("5Gb" is 5GB / 8)."""
    text = str(size).strip()
    if text.isdigit():
        return int(text)
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
    for unit, scale in units.items():
        number = text[: -len(unit)]
        if text.upper().endswith(unit) and number.isdigit():
            return int(number) * scale // (8 if text.endswith("b") and "I" not in unit else 1)
    raise ValueError(f"max_shard_size {size!r}: use bytes or a number with a unit, e.g. 5GB, 500MB, 2GiB")


@dataclass(frozen=True)
class FilePlan:
    """Which file each tensor goes to and where its bytes start, from names, shapes and dtypes
    alone, so every process computes the same plan. `headers` holds each file's bytes before its
    data (length + JSON), `sizes` each file's full size, `location` tensor -> (file, byte offset)."""

    headers: dict[str, bytes]
    sizes: dict[str, int]
    location: dict[str, tuple[str, int]]
    total_size: int
    total_parameters: int

    def create(self, directory: str) -> None:
        """Each file with its header, extended to its full size (holes, filled by the slice writes)."""
        for name, header in self.headers.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(header)
                f.truncate(self.sizes[name])

    def index(self) -> dict | None:
        """transformers' model.safetensors.index.json, or None for a single model.safetensors."""
        if list(self.headers) == [WEIGHTS_NAME]:
            return None
        return {
            "metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
            "weight_map": {name: file for name, (file, _) in sorted(self.location.items())},
        }


def plan_files(tensors: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int | str) -> FilePlan:
    """Splits tensors, in order, into files of at most `max_shard_size` bytes as transformers does
    (huggingface_hub's splitter: a larger tensor gets a file of its own at once) and names them
    as it does: model.safetensors for one file, else model-00001-of-0000N.safetensors and an index."""
    limit = parse_shard_size(max_shard_size)
    groups, current, size = [], [], 0
    for tensor in tensors:
        nbytes = math.prod(tensor[1]) * np.dtype(tensor[2]).itemsize
        if nbytes > limit:  # a file of its own, while the current one stays open
            groups.append([tensor])
            continue
        if size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    if current or not groups:
        groups.append(current)
    names = (
        [WEIGHTS_NAME]
        if len(groups) == 1
        else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    headers, sizes, location = {}, {}, {}
    for file, group in zip(names, groups):
        header, offset = {}, 0
        for name, shape, dtype in group:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data 8-byte aligned, as the safetensors library writes it
        headers[file] = struct.pack("<Q", len(encoded)) + encoded
        sizes[file] = len(headers[file]) + offset
        for name in header.keys() - {"__metadata__"}:
            location[name] = (file, len(headers[file]) + header[name]["data_offsets"][0])
    total_size = sum(size - len(headers[file]) for file, size in sizes.items())
    total_parameters = sum(math.prod(shape) for _, shape, _ in tensors)
    return FilePlan(headers, sizes, location, total_size, total_parameters)


def region(shape: tuple[int, ...], dtype: np.dtype, view, index: tuple) -> tuple[int, tuple[int, ...]]:
    """Where `view(tensor)[index]` lies in a C-ordered tensor of `shape` (`view`: reshape,
    transpose and indexing only): the byte offset of its first element and its byte strides.
    Found by viewing an anonymous mapping of the tensor's size that is never touched (no memory)."""
    buffer = mmap.mmap(-1, math.prod(shape) * np.dtype(dtype).itemsize)
    whole = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    picked = view(whole)[index]
    if not np.may_share_memory(picked, whole):  # a copy would be written nowhere
        raise RuntimeError(f"a view of a {shape} tensor copies it instead of viewing it")
    offset = picked.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
    strides = picked.strides
    del whole, picked
    buffer.close()
    return offset, strides


def write_strided(fd: int, offset: int, strides: tuple[int, ...], values: np.ndarray) -> None:
    """Writes `values` at the file positions offset + sum(index * strides): reordered into the
    file's order first, so that each contiguous run of the file is one pwrite. Several processes
    may write disjoint regions of one file at once."""
    kept = [d for d in range(values.ndim) if values.shape[d] > 1]  # size-1 dims have no stride to follow
    order = sorted(kept, key=lambda d: -strides[d])
    values = np.ascontiguousarray(
        values.reshape([values.shape[d] for d in kept]).transpose([kept.index(d) for d in order])
    )
    shape, steps = list(values.shape), [strides[d] for d in order]
    run = values.itemsize
    while shape and steps[-1] == run:  # trailing dims that are contiguous in the file join one run
        run *= shape.pop()
        steps.pop()
    starts = np.full((), offset, dtype=np.int64)
    for size, step in zip(shape, steps):
        starts = starts[..., None] + np.arange(size, dtype=np.int64) * step
    rows = values.reshape(-1).view(np.uint8).reshape(-1, run)
    for start, row in zip(starts.reshape(-1).tolist(), rows):
        row = memoryview(row)
        while row:  # a network filesystem may take part of a write
            written = os.pwrite(fd, row, start)
            row, start = row[written:], start + written
