"""Reading and writing the safetensors format without materializing whole checkpoints.

Reading memory-maps each file and hands out zero-copy numpy views, so a loader can copy just
the slice one device needs. Writing streams one tensor at a time. bfloat16 goes through
ml_dtypes, which numpy alone lacks.
"""

from __future__ import annotations

import json
import os
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


def write_safetensors(
    path: str, tensors: list[tuple[str, tuple[int, ...], np.dtype, callable]], metadata: dict[str, str] | None = None
):
    """Writes tensors given as (name, shape, dtype, produce) where produce() returns the array;
    each array is produced only when it is written. Atomic: a tmp file is renamed at the end."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header["__metadata__"] = metadata or {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, produce in tensors:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())
    os.replace(tmp, path)
