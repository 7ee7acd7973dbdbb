"""Attention for one decode step: one new query token per row against a static KV cache.

Two implementations of the same function, and a dispatcher:

- `decode_attention_reference`: plain jnp masked softmax in float32; the ground truth.
- `decode_attention_pallas`: flash-decoding as a `pl.pallas_call` kernel. The key length is cut
  into `num_splits` chunks that run in parallel (grid: batch x kv_heads x splits); each chunk
  walks its keys in blocks of `block_k` with an online softmax, all query heads of one
  kv-head group together, so a K/V block is loaded once per group. Blocks outside the row's
  valid range are skipped. A small jnp step then merges the chunks by their log-sum-exps.

Backend: the kernel uses only portable Pallas (BlockSpec/grid, ref indexing, `pl.program_id`,
`lax.dot_general`, `lax.fori_loop`) and targets the Triton lowering on GPU; on CPU it runs with
`interpret=True`. It lowers to Triton IR (checked on CPU) but has NOT yet been run on a GPU.

Prompts are left padded, so row b attends to the contiguous cache slots
kv_start[b] <= s < kv_end[b]; an empty range gives a zero output.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

# Finite stand-in for -inf: masked logits and empty log-sum-exps never make inf - inf = NaN.
MASK_VALUE = -1e30
# Triton's dot needs every operand dimension to be a power of two and at least 16.
MIN_DOT_DIM = 16
# [rows, dim] x [keys, dim] -> [rows, keys]: contract the last dimension of both operands.
CONTRACT_LAST_DIMS = (((1,), (1,)), ((), ()))


def _check_inputs(q, k_cache, v_cache, kv_start, kv_end) -> None:
    """Raise a one-line error naming the first argument whose shape does not fit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    batch, q_heads, head_dim = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache must be [batch={batch}, max_len, kv_heads, head_dim={head_dim}], "
            f"got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    kv_heads = k_cache.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    for name, bound in (("kv_start", kv_start), ("kv_end", kv_end)):
        if bound.shape != (batch,) or not jnp.issubdtype(bound.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [batch={batch}], got {bound.dtype}{list(bound.shape)}")


def decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, *, scale=None):
    """Masked softmax attention in float32: out[b, h] = softmax(q k^T * scale) v over the valid slots.

    q: [batch, q_heads, head_dim]; k_cache, v_cache: [batch, max_len, kv_heads, head_dim];
    kv_start, kv_end: int [batch]. Returns [batch, q_heads, head_dim] in q's dtype.
    """
    _check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    # q head h reads kv head h // group.
    q_groups = q.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)
    logits = jnp.einsum(
        "bhgd,bshd->bhgs", q_groups, k_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    ) * scale  # [batch, kv_heads, group, max_len]
    slots = jnp.arange(max_len)
    valid = (slots >= kv_start[:, None]) & (slots < kv_end[:, None])  # [batch, max_len]
    valid = valid[:, None, None, :]
    logits = jnp.where(valid, logits, MASK_VALUE)
    # An empty row softmaxes to uniform weights over masked slots; zeroing them gives a zero output.
    weights = jax.nn.softmax(logits, axis=-1) * valid
    out = jnp.einsum(
        "bhgs,bshd->bhgd", weights, v_cache.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)


def _flash_decoding_kernel(
    kv_start_ref, kv_end_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *, scale: float, block_k: int
):
    """One (row, kv head, split) program: online softmax over the split's valid key blocks.

    kv_start_ref, kv_end_ref: [] int32; q_ref: [rows, dim]; k_ref, v_ref: [split_len, dim];
    out_ref: [rows, dim] float32, normalised within the split; lse_ref: [rows] float32.
    """
    rows, dim = q_ref.shape
    split_len = k_ref.shape[0]
    split_start = pl.program_id(2) * split_len
    kv_start, kv_end = kv_start_ref[...], kv_end_ref[...]

    # The row's valid keys inside this split, in split-local slots: [lo, hi).
    lo = jnp.maximum(kv_start, split_start) - split_start
    hi = jnp.minimum(kv_end, split_start + split_len) - split_start
    # lo >= 0, so truncating division is floor division. Every block in [first, stop) holds a valid key.
    first_block = lax.div(lo, block_k)
    stop_block = jnp.where(hi > lo, lax.div(hi + block_k - 1, block_k), first_block)

    q = q_ref[...]  # [rows, dim]
    key_offsets = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # [1, block_k]

    def attend_block(block, carry):
        acc, running_max, running_sum = carry  # [rows, dim], [rows], [rows]
        start = pl.multiple_of(block * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [block_k, dim]
        v = v_ref[pl.ds(start, block_k), :]  # [block_k, dim]
        logits = lax.dot_general(
            q, k, CONTRACT_LAST_DIMS,
            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
        ) * scale  # [rows, block_k]
        slots = start + key_offsets
        logits = jnp.where((slots >= lo) & (slots < hi), logits, MASK_VALUE)

        new_max = jnp.maximum(running_max, logits.max(axis=1))  # [rows]
        correction = jnp.exp(running_max - new_max)  # [rows]
        probs = jnp.exp(logits - new_max[:, None])  # [rows, block_k]
        running_sum = running_sum * correction + probs.sum(axis=1)
        acc = acc * correction[:, None] + jnp.dot(
            probs.astype(v.dtype), v,
            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
        )  # [rows, dim]
        return acc, new_max, running_sum

    init = (
        jnp.zeros((rows, dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, running_max, running_sum = lax.fori_loop(first_block, stop_block, attend_block, init)

    # A split with no valid key has running_sum == 0: zero output, and an lse that weighs nothing.
    has_keys = running_sum > 0
    safe_sum = jnp.where(has_keys, running_sum, 1.0)
    out_ref[...] = acc / safe_sum[:, None]
    lse_ref[...] = jnp.where(has_keys, running_max + jnp.log(safe_sum), MASK_VALUE)


def _pad_axis(x, axis: int, size: int):
    """Zero-pad `x` along `axis` up to `size` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def decode_attention_pallas(
    q,
    k_cache,
    v_cache,
    kv_start,
    kv_end,
    *,
    scale=None,
    block_k: int = 64,
    num_splits: int = 4,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """Flash-decoding kernel; same contract as `decode_attention_reference`.

    block_k: keys per inner step (a power of two >= 16). num_splits: parallel chunks of the key
    length (reduced when the cache is shorter than num_splits blocks). num_warps, num_stages:
    Triton launch parameters, ignored when interpret=True (Pallas interpreter, for CPU).
    The wrapper zero-pads max_len to a multiple of block_k * num_splits and head_dim to a power
    of two >= 16, which copies the cache each call: allocate caches with those sizes to avoid it.
    """
    _check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    if block_k < MIN_DOT_DIM or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two >= {MIN_DOT_DIM}")
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    num_splits = min(num_splits, pl.cdiv(max_len, block_k))
    split_len = pl.cdiv(max_len, block_k * num_splits) * block_k
    rows = max(MIN_DOT_DIM, pl.next_power_of_2(group))  # query heads of one group, padded
    dim = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))

    q_groups = q.reshape(batch, kv_heads, group, head_dim)
    q_groups = _pad_axis(_pad_axis(q_groups, 2, rows), 3, dim)  # [batch, kv_heads, rows, dim]
    k_cache = _pad_axis(_pad_axis(k_cache, 1, split_len * num_splits), 3, dim)
    v_cache = _pad_axis(_pad_axis(v_cache, 1, split_len * num_splits), 3, dim)
    # [batch, padded_len, kv_heads, dim]

    kernel = functools.partial(_flash_decoding_kernel, scale=scale, block_k=block_k)
    bound_spec = pl.BlockSpec((None,), lambda b, h, s: (b,))
    kv_spec = pl.BlockSpec((None, split_len, None, dim), lambda b, h, s: (b, s, h, 0))
    split_out, split_lse = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            bound_spec,
            bound_spec,
            pl.BlockSpec((None, None, rows, dim), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows, dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, rows), jnp.float32),
        ],
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_decoding",
    )(kv_start.astype(jnp.int32), jnp.minimum(kv_end, max_len).astype(jnp.int32), q_groups, k_cache, v_cache)

    # Merge the splits: weight each by exp(its lse - the largest lse). An all-empty row has
    # equal weights on all-zero outputs, so it comes out zero.
    weights = jnp.exp(split_lse - split_lse.max(axis=2, keepdims=True))  # [batch, kv_heads, splits, rows]
    out = (weights[..., None] * split_out).sum(axis=2) / weights.sum(axis=2)[..., None]
    out = out[:, :, :group, :head_dim]  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)


def decode_attention(
    q,
    k_cache,
    v_cache,
    kv_start,
    kv_end,
    *,
    implementation: Literal["auto", "reference", "pallas"] = "auto",
    scale=None,
    **pallas_options,
):
    """Decode attention by the chosen implementation; `pallas_options` go to the kernel.

    Policy: "auto" uses the reference everywhere until a GPU benchmark shows the kernel faster.
    """
    if implementation in ("auto", "reference"):
        if pallas_options:
            raise ValueError(f"options {sorted(pallas_options)} apply only to implementation='pallas'")
        return decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale=scale)
    if implementation == "pallas":
        return decode_attention_pallas(q, k_cache, v_cache, kv_start, kv_end, scale=scale, **pallas_options)
    raise ValueError(f"implementation={implementation!r} is not one of 'auto', 'reference', 'pallas'")
