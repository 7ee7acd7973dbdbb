"""Checks of a model's weights as it loads: every value finite, every token id inside the
embedding table (or the table padded up to the tokenizer when asked)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def vocab_rows(path: str, vocab_size: int, tokenizer_size: int | None, resize_embeddings: bool) -> int:
    """The embedding rows the model needs: `vocab_size`, or the tokenizer's size when that is larger
    and `resize_embeddings` pads the table up; a larger tokenizer is refused otherwise (its ids past
    the table would read nothing and give NaN from the first evaluation)."""
    if tokenizer_size is None or tokenizer_size <= vocab_size:
        return vocab_size
    if not resize_embeddings:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer_size} tokens (added tokens included) but the embedding "
            f"table has vocab_size={vocab_size}; use the model's own tokenizer, or set the model's "
            "resize_embeddings=true to pad the table up"
        )
    return tokenizer_size


def pad_rows(table: np.ndarray, rows: int) -> np.ndarray:
    """An HF vocabulary tensor [vocab, dim] padded to `rows` with its mean row, so new tokens start
    as an average token (transformers' resize_token_embeddings starts them near the mean too)."""
    mean = table.astype(np.float32).mean(axis=0, keepdims=True).astype(table.dtype)
    return np.concatenate([table, np.repeat(mean, rows - table.shape[0], axis=0)])


@jax.jit
def _sums(arrays: list[jax.Array]) -> jax.Array:
    """Each array's float32 sum: [tensors]. A NaN or inf anywhere makes it non-finite (so can an
    overflow, which the exact count then clears); one cheap pass, vectorized on every backend."""
    return jnp.stack([jnp.sum(array, dtype=jnp.float32) for array in arrays])


@functools.partial(jax.jit, static_argnums=1)
def _nonfinite_count(array: jax.Array, per_layer: bool) -> jax.Array:
    """The exact NaN/inf count of one array: [layers] for a stacked [layers, ...] array, else [1]."""
    bad = ~jnp.isfinite(array)
    if per_layer:
        return jnp.sum(bad.reshape(bad.shape[0], -1), axis=1, dtype=jnp.int32)
    return jnp.sum(bad, dtype=jnp.int32)[None]


def check_finite(path: str, tensors: list[tuple[str, jax.Array, int | None]]) -> None:
    """Refuses weights holding a NaN or an inf, naming the first bad tensor, its count and how many
    are affected. `tensors`: (HF name, placed array, layers or None); a stacked array's name holds
    "{i}" for its layer. One jitted reduction on the devices, only the sums come back; the exact
    counts are taken only for arrays it flags."""
    if not tensors:
        return
    sums = np.asarray(jax.device_get(_sums([array for _, array, _ in tensors])))
    bad, total = [], 0
    for (name, array, layers), tensor_sum in zip(tensors, sums):
        total += layers or 1
        if not np.isfinite(tensor_sum):
            counts = jax.device_get(_nonfinite_count(array, layers is not None))
            bad += [(name.format(i=i), int(count)) for i, count in enumerate(counts) if count]
    if bad:
        name, count = bad[0]
        raise ValueError(
            f"{path}: tensor {name} holds {count} NaN or inf values; {len(bad)} of {total} tensors are "
            "affected (a damaged or diverged checkpoint)"
        )
