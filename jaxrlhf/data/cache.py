"""An on-disk cache of named numpy arrays, keyed by a content hash and written atomically."""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable

import numpy as np


def content_hash(parts: Iterable) -> str:
    """sha256 over the JSON form of each part, one per line (parts must be JSON-serializable)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cached_arrays(
    cache_dir: str | None, name: str, key: str, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Load `{cache_dir}/{name}-{key}.npz` if present, else `build()` and store it there.

    The file is written to a temporary name in the same directory and renamed into place, so
    a reader never sees a half-written file. With `cache_dir=None` this just calls `build()`.
    """
    if cache_dir is None:
        return build()
    path = os.path.join(cache_dir, f"{name}-{key[:24]}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            return {array_name: stored[array_name] for array_name in stored.files}
    arrays = build()
    os.makedirs(cache_dir, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return arrays
