"""Decode attention: the jnp reference against a numpy loop, the Pallas kernel (interpret mode) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.generation.kernels.decode_attention import (
    decode_attention,
    decode_attention_pallas,
    decode_attention_reference,
)


def random_inputs(seed, batch, max_len, kv_heads, group, head_dim, dtype):
    """Random q/k/v and per-row [start, end) ranges; row 0 has one key, the last row none."""
    q_key, k_key, v_key, start_key, end_key = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(q_key, (batch, kv_heads * group, head_dim), dtype)
    k_cache = jax.random.normal(k_key, (batch, max_len, kv_heads, head_dim), dtype)
    v_cache = jax.random.normal(v_key, (batch, max_len, kv_heads, head_dim), dtype)
    kv_start = jax.random.randint(start_key, (batch,), 0, max_len)
    kv_end = kv_start + 1 + jax.random.randint(end_key, (batch,), 0, max_len) % (max_len - kv_start)
    kv_end = kv_end.at[0].set(kv_start[0] + 1).at[-1].set(kv_start[-1])
    return q, k_cache, v_cache, kv_start.astype(jnp.int32), kv_end.astype(jnp.int32)


def naive_decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale):
    """One (row, head) at a time in float64."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    batch, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            keys = k_cache[b, kv_start[b] : kv_end[b], h // group]  # [n, head_dim]
            values = v_cache[b, kv_start[b] : kv_end[b], h // group]
            if len(keys) == 0:
                continue
            logits = keys @ q[b, h] * scale
            weights = np.exp(logits - logits.max())
            out[b, h] = weights @ values / weights.sum()
    return out


def test_reference_matches_numpy_loop():
    q, k_cache, v_cache, kv_start, kv_end = random_inputs(0, 4, 11, 2, 3, 8, jnp.float32)
    out = decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale=0.3)
    expected = naive_decode_attention(q, k_cache, v_cache, np.asarray(kv_start), np.asarray(kv_end), 0.3)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    assert not np.any(np.asarray(out[-1])), "the empty row must be all zeros"


# batch, max_len (never a multiple of block_k * num_splits), kv_heads, group, head_dim, dtype, num_splits
KERNEL_CASES = [
    (3, 37, 2, 1, 16, jnp.float32, 2),  # plain multi-head attention
    (2, 50, 2, 2, 32, jnp.bfloat16, 3),  # GQA 2
    (4, 45, 2, 4, 16, jnp.float32, 4),  # GQA 4, a split longer than the cache gets dropped
    (5, 29, 1, 4, 24, jnp.bfloat16, 1),  # MQA, head_dim padded to a power of two
]


@pytest.mark.parametrize("batch, max_len, kv_heads, group, head_dim, dtype, num_splits", KERNEL_CASES)
def test_pallas_kernel_matches_reference(batch, max_len, kv_heads, group, head_dim, dtype, num_splits):
    inputs = random_inputs(batch + max_len, batch, max_len, kv_heads, group, head_dim, dtype)
    q, k_cache, v_cache, kv_start, kv_end = inputs
    kernel = jax.jit(
        lambda *args: decode_attention_pallas(*args, block_k=16, num_splits=num_splits, interpret=True)
    )
    out = kernel(*inputs)
    assert out.dtype == dtype and out.shape == q.shape

    as_f32 = [x.astype(jnp.float32) for x in (q, k_cache, v_cache)]
    expected = decode_attention_reference(*as_f32, kv_start, kv_end)
    atol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=atol)
    assert not np.any(np.asarray(out[-1], np.float32)), "the empty row must be all zeros, not NaN"


def test_pallas_kernel_lowers_to_triton():
    """The kernel body must use only primitives the Triton lowering knows (no GPU needed to check)."""
    inputs = random_inputs(1, 2, 40, 2, 2, 32, jnp.bfloat16)
    kernel = jax.jit(lambda *args: decode_attention_pallas(*args, block_k=16, num_splits=2))
    hlo = kernel.trace(*inputs).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in hlo or "triton_kernel_call" in hlo


def test_dispatcher_and_bad_input():
    q, k_cache, v_cache, kv_start, kv_end = random_inputs(2, 2, 8, 1, 2, 8, jnp.float32)
    auto = decode_attention(q, k_cache, v_cache, kv_start, kv_end)
    reference = decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(reference))
    with pytest.raises(ValueError, match="implementation='flash'"):
        decode_attention(q, k_cache, v_cache, kv_start, kv_end, implementation="flash")
    with pytest.raises(ValueError, match="q_heads=2 is not a multiple of kv_heads=3"):
        decode_attention_reference(q, jnp.zeros((2, 8, 3, 8)), jnp.zeros((2, 8, 3, 8)), kv_start, kv_end)
    with pytest.raises(ValueError, match="kv_end must be int"):
        decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end[:1])
    with pytest.raises(ValueError, match="block_k=24"):
        decode_attention_pallas(q, k_cache, v_cache, kv_start, kv_end, block_k=24, interpret=True)
