"""Decode attention: the jnp reference against a numpy loop; the Mosaic GPU kernel (GPU interpret mode on
CPU, natively on a GPU) against the reference, alone and under shard_map; its lowering for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.generation.kernels.decode_attention import choose_implementation, decode_attention, per_shard
from jaxrlhf.generation.kernels.flash_decoding import decode_attention_pallas
from jaxrlhf.generation.kernels.reference import decode_attention_reference
from jaxrlhf.parallel import make_mesh

ON_GPU = jax.default_backend() == "gpu"


def random_inputs(seed, batch, max_len, kv_heads, group, head_dim, dtype):
    """Random q/k/v and per-row [start, end) ranges; row 0 has one key, the last row none."""
    q_key, k_key, v_key, start_key, end_key = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(q_key, (batch, kv_heads * group, head_dim), dtype)
    k_cache = jax.random.normal(k_key, (batch, kv_heads, max_len, head_dim), dtype)
    v_cache = jax.random.normal(v_key, (batch, kv_heads, max_len, head_dim), dtype)
    kv_start = jax.random.randint(start_key, (batch,), 0, max_len)
    kv_end = kv_start + 1 + jax.random.randint(end_key, (batch,), 0, max_len) % (max_len - kv_start)
    kv_end = kv_end.at[0].set(kv_start[0] + 1).at[-1].set(kv_start[-1])
    return q, k_cache, v_cache, kv_start.astype(jnp.int32), kv_end.astype(jnp.int32)


def naive_decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale):
    """One (row, head) at a time in float64."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    batch, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[1]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(q_heads):
            keys = k_cache[b, h // group, kv_start[b] : kv_end[b]]  # [n, head_dim]
            values = v_cache[b, h // group, kv_start[b] : kv_end[b]]
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


def test_reference_adds_alibi_from_each_rows_first_key():
    """ALiBi: the key in slot s of row b sits at position s - kv_start[b] (left padding shifts nothing)."""
    q, k_cache, v_cache, kv_start, kv_end = random_inputs(4, 4, 11, 2, 3, 8, jnp.float32)
    slopes = np.array([0.5, 0.25, 0.125, 0.7, 0.35, 0.05], np.float32)
    out = decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale=0.3, alibi_slopes=slopes)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    expected = np.zeros_like(q64)
    for b in range(q.shape[0]):
        start, end = int(kv_start[b]), int(kv_end[b])
        for h in range(q.shape[1]):
            logits = k64[b, h // 3, start:end] @ q64[b, h] * 0.3 + slopes[h] * np.arange(end - start)
            if len(logits):
                weights = np.exp(logits - logits.max())
                expected[b, h] = weights @ v64[b, h // 3, start:end] / weights.sum()
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, alibi_slopes=slopes[:2])


def test_reference_soft_caps_the_logits_and_the_kernel_refuses_to():
    """Gemma 2: softcap * tanh(scaled logits / softcap) before the softmax; the kernel has no cap."""
    q, k_cache, v_cache, kv_start, kv_end = random_inputs(5, 4, 11, 2, 3, 8, jnp.float32)
    out = decode_attention_reference(10.0 * q, k_cache, v_cache, kv_start, kv_end, scale=0.3, softcap=2.0)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (10.0 * q, k_cache, v_cache))
    expected = np.zeros_like(q64)
    for b in range(q.shape[0]):
        start, end = int(kv_start[b]), int(kv_end[b])
        for h in range(q.shape[1]):
            logits = 2.0 * np.tanh(k64[b, h // 3, start:end] @ q64[b, h] * 0.3 / 2.0)
            if len(logits):
                weights = np.exp(logits - logits.max())
                expected[b, h] = weights @ v64[b, h // 3, start:end] / weights.sum()
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    uncapped = decode_attention_reference(10.0 * q, k_cache, v_cache, kv_start, kv_end, scale=0.3)
    assert np.abs(np.asarray(uncapped) - expected).max() > 1e-2  # the cap matters here
    assert choose_implementation("auto", jnp.bfloat16, 64, softcap=50.0) == "reference"
    with pytest.raises(ValueError, match="^attention=pallas: the kernel does not soft-cap attention logits"):
        choose_implementation("pallas", jnp.bfloat16, 64, softcap=50.0)
    with pytest.raises(ValueError, match="does not soft-cap"):
        decode_attention(q, k_cache, v_cache, kv_start, kv_end, implementation="pallas", softcap=50.0)


# batch, max_len, kv_heads, group, head_dim, dtype, num_splits, block_kv, num_stages
KERNEL_CASES = [
    (3, 128, 2, 1, 64, jnp.bfloat16, 2, 64, 2),  # plain multi-head attention (OPT)
    (2, 256, 2, 4, 64, jnp.bfloat16, 1, 64, 3),  # GQA 4, one split walking four blocks, 3 stages
    (4, 256, 1, 8, 128, jnp.float16, 3, 64, 2),  # MQA with 8 query heads, head_dim 128, uneven splits
    (2, 256, 2, 2, 64, jnp.bfloat16, 2, 128, 2),  # 128-key blocks
]


def kernel_output(inputs, num_splits, block_kv, num_stages):
    kernel = jax.jit(
        lambda *args: decode_attention_pallas(
            *args, num_splits=num_splits, block_kv=block_kv, num_stages=num_stages, interpret=not ON_GPU
        )
    )
    return kernel(*inputs)


@pytest.mark.parametrize(
    "batch, max_len, kv_heads, group, head_dim, dtype, num_splits, block_kv, num_stages", KERNEL_CASES
)
def test_pallas_kernel_matches_reference(
    batch, max_len, kv_heads, group, head_dim, dtype, num_splits, block_kv, num_stages
):
    inputs = random_inputs(batch + max_len + group, batch, max_len, kv_heads, group, head_dim, dtype)
    out = kernel_output(inputs, num_splits, block_kv, num_stages)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    q, k_cache, v_cache, kv_start, kv_end = inputs
    expected = decode_attention_reference(*[x.astype(jnp.float32) for x in (q, k_cache, v_cache)], kv_start, kv_end)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=2e-2)
    assert not np.any(np.asarray(out[-1], np.float32)), "the empty row must be all zeros, not NaN"


def test_pallas_kernel_lowers_for_mosaic_gpu():
    """The kernel goes through Mosaic GPU's lowering (layouts, wgmma shapes, TMA copies) as a
    `mosaic_gpu` custom call; no GPU is needed to check that."""
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in random_inputs(1, 2, 256, 2, 4, 64, jnp.bfloat16)]
    kernel = jax.jit(lambda *args: decode_attention_pallas(*args, num_splits=2))
    hlo = kernel.trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in hlo


def test_per_shard_wrapper_matches_whole_arrays():
    """Rows over fsdp, kv heads over tensor: each shard attends with its own slice (the wrapper the
    kernel runs in on a GPU; here around the reference, since the CPU interpreter runs one shard at a time)."""
    inputs = random_inputs(3, 4, 128, 2, 4, 64, jnp.float32)
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    sharding = NamedSharding(mesh, PartitionSpec("fsdp", "tensor", None, None))
    out = jax.jit(per_shard(decode_attention_reference, sharding))(*inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(decode_attention_reference(*inputs)), atol=1e-6)
    assert out.sharding.spec == PartitionSpec("fsdp", "tensor")
    sharded_kernel = jax.jit(lambda *args: decode_attention(*args, implementation="pallas", sharding=sharding))
    bf16 = [x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in inputs]
    np.testing.assert_allclose(
        np.asarray(sharded_kernel(*bf16), np.float32), np.asarray(decode_attention_reference(*inputs)), atol=3e-2
    )


def test_dispatcher_and_bad_input():
    q, k_cache, v_cache, kv_start, kv_end = random_inputs(2, 2, 8, 1, 2, 8, jnp.float32)
    assert choose_implementation("auto", jnp.bfloat16, 64) == "reference"
    with pytest.raises(ValueError, match="attention=pallas: the kernel needs a bfloat16 or float16 model"):
        choose_implementation("pallas", jnp.float32, 64)
    with pytest.raises(ValueError, match="head_dim a multiple of 64, not 8"):
        choose_implementation("pallas", jnp.bfloat16, 8)
    assert choose_implementation("auto", jnp.bfloat16, 64, alibi=True) == "reference"
    with pytest.raises(ValueError, match="^attention=pallas: the kernel does not add ALiBi biases"):
        choose_implementation("pallas", jnp.bfloat16, 64, alibi=True)
    with pytest.raises(ValueError, match="does not add ALiBi biases"):
        decode_attention(q, k_cache, v_cache, kv_start, kv_end, implementation="pallas", alibi_slopes=jnp.ones(2))
    with pytest.raises(ValueError, match="implementation='flash'"):
        decode_attention(q, k_cache, v_cache, kv_start, kv_end, implementation="flash")
    with pytest.raises(ValueError, match="q_heads=2 is not a multiple of kv_heads=3"):
        decode_attention_reference(q, jnp.zeros((2, 3, 8, 8)), jnp.zeros((2, 3, 8, 8)), kv_start, kv_end)
    with pytest.raises(ValueError, match="kv_end must be int"):
        decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end[:1])
    with pytest.raises(ValueError, match="block_kv=96"):
        decode_attention_pallas(*random_inputs(1, 2, 192, 1, 2, 64, jnp.bfloat16), block_kv=96, interpret=True)
