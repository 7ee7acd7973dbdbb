"""The reference decode attention: plain jnp, float32 logits; the ground truth and the portable path.

XLA fuses it so that it reads the cache in place (no copy, transpose or dtype conversion of the
cache), but it reads every slot, filled or not. Cache layout [batch, kv_heads, max_len, head_dim]
(see `generation.kv_cache`); row b attends to the slots kv_start[b] <= s < kv_end[b].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf: masked logits and empty log-sum-exps never make inf - inf = NaN.
MASK_VALUE = -1e30


def check_inputs(q, k_cache, v_cache, kv_start, kv_end) -> None:
    """Raise a one-line error naming the first argument whose shape does not fit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    batch, q_heads, head_dim = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache must be [batch={batch}, kv_heads, max_len, head_dim={head_dim}], got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    kv_heads = k_cache.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    for name, bound in (("kv_start", kv_start), ("kv_end", kv_end)):
        if bound.shape != (batch,) or not jnp.issubdtype(bound.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [batch={batch}], got {bound.dtype}{list(bound.shape)}")


def decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, *, scale=None, alibi_slopes=None, softcap=None):
    """Masked softmax attention, float32 logits and sums: out[b, h] = softmax(q k^T * scale) v over
    the valid slots; with `alibi_slopes` ([q_heads], ALiBi: BLOOM) the logit of slot s gains
    alibi_slopes[h] * (s - kv_start[b]), the key's position counted from the row's first key; with
    `softcap` (Gemma 2) the scaled logits are capped as softcap * tanh(logits / softcap) first.

    q: [batch, q_heads, head_dim]; k_cache, v_cache: [batch, kv_heads, max_len, head_dim];
    kv_start, kv_end: int [batch]. Returns [batch, q_heads, head_dim] in q's dtype.
    Written so that XLA reads the cache where it lies, in its own dtype: both contractions take
    the cache as it is stored (batch and kv-head dims leading, no transpose, no conversion) and
    accumulate in float32; the mask and the bias are computed from slot indices, never from a
    cache-sized array.
    """
    check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    batch, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (q_heads,):
        raise ValueError(f"alibi_slopes must be [q_heads={q_heads}], got shape {jnp.shape(alibi_slopes)}")
    scale = head_dim**-0.5 if scale is None else scale

    # q head h reads kv head h // group.
    q_groups = q.reshape(batch, kv_heads, group, head_dim).astype(k_cache.dtype)
    logits = (
        jnp.einsum(
            "bhgd,bhsd->bhgs", q_groups, k_cache, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )
        * scale
    )  # [batch, kv_heads, group, max_len]
    if softcap is not None:  # Gemma 2: softcap * tanh(logits / softcap), before the mask
        logits = softcap * jnp.tanh(logits / softcap)
    slots = jnp.arange(max_len)
    if alibi_slopes is not None:
        key_positions = (slots[None, :] - kv_start[:, None]).astype(jnp.float32)  # [batch, max_len]
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(kv_heads, group)
        logits = logits + slopes[None, :, :, None] * key_positions[:, None, None, :]
    valid = (slots >= kv_start[:, None]) & (slots < kv_end[:, None])  # [batch, max_len]
    valid = valid[:, None, None, :]
    logits = jnp.where(valid, logits, MASK_VALUE)
    # An empty row softmaxes to uniform weights over masked slots; zeroing them gives a zero output.
    weights = jax.nn.softmax(logits, axis=-1) * valid
    out = jnp.einsum(
        "bhgs,bhsd->bhgd",
        weights.astype(v_cache.dtype),
        v_cache,
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)
