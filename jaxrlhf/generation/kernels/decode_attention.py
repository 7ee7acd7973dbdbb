"""Attention for one decode step: one new query token per row against the static KV cache.

Two implementations of one function, and a dispatcher:

- `decode_attention_reference`: jnp masked softmax with float32 logits; the ground truth and the
  portable path. XLA fuses it so that it reads the cache in place (no copy, transpose or dtype
  conversion of the cache), but it reads every slot, filled or not.
- `decode_attention_pallas`: flash decoding as a Pallas kernel on Mosaic GPU (Hopper and newer;
  Pallas' Triton backend is deprecated). It reads only the blocks of key slots that hold a valid
  key of the row, each once: grid (batch, kv_heads, splits), one warpgroup per program; the
  query heads of one kv group are the rows of one [64, head_dim] tile (wgmma's smallest M; the
  spare rows are zeros and cost no memory traffic, which is what bounds a decode step), so every
  K/V block is loaded once for the whole group, by TMA, `num_stages` blocks ahead of the math.
  The key range is cut into `num_splits` chunks that run in parallel when batch x kv_heads is
  too small to fill the GPU; a small jnp step merges the chunks by their log-sum-exps.
  On CPU it runs in Pallas' GPU interpret mode (tests); `lower_for_gpu` checks that it lowers.

Cache layout [batch, kv_heads, max_len, head_dim] (see `generation.kv_cache`). Prompts are left
padded, so row b attends to the contiguous slots kv_start[b] <= s < kv_end[b]; an empty range
gives a zero output.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import NamedSharding, PartitionSpec

# Finite stand-in for -inf: masked logits and empty log-sum-exps never make inf - inf = NaN.
MASK_VALUE = -1e30
# wgmma multiplies [64 rows, k] tiles: the query heads of a group are padded to this many rows.
TILE_ROWS = 64
# The 128-byte swizzle of bf16 tiles: head_dim must be a multiple of 64 elements.
SWIZZLE_BYTES = 128
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
# The cache length granularity the kernel reads in (block_kv divides it); generation rounds up to it.
KERNEL_BLOCK_KV = 64


def _check_inputs(q, k_cache, v_cache, kv_start, kv_end) -> None:
    """Raise a one-line error naming the first argument whose shape does not fit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    batch, q_heads, head_dim = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"k_cache must be [batch={batch}, kv_heads, max_len, head_dim={head_dim}], "
            f"got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    kv_heads = k_cache.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}")
    for name, bound in (("kv_start", kv_start), ("kv_end", kv_end)):
        if bound.shape != (batch,) or not jnp.issubdtype(bound.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [batch={batch}], got {bound.dtype}{list(bound.shape)}")


def decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, *, scale=None):
    """Masked softmax attention, float32 logits and sums: out[b, h] = softmax(q k^T * scale) v over
    the valid slots.

    q: [batch, q_heads, head_dim]; k_cache, v_cache: [batch, kv_heads, max_len, head_dim];
    kv_start, kv_end: int [batch]. Returns [batch, q_heads, head_dim] in q's dtype.
    Written so that XLA reads the cache where it lies, in its own dtype: both contractions take
    the cache as it is stored (batch and kv-head dims leading, no transpose, no conversion) and
    accumulate in float32; the mask is computed from slot indices, never from a cache-sized array.
    """
    _check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    batch, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    # q head h reads kv head h // group.
    q_groups = q.reshape(batch, kv_heads, group, head_dim).astype(k_cache.dtype)
    logits = jnp.einsum("bhgd,bhsd->bhgs", q_groups, k_cache, precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) * scale  # [batch, kv_heads, group, max_len]
    slots = jnp.arange(max_len)
    valid = (slots >= kv_start[:, None]) & (slots < kv_end[:, None])  # [batch, max_len]
    valid = valid[:, None, None, :]
    logits = jnp.where(valid, logits, MASK_VALUE)
    # An empty row softmaxes to uniform weights over masked slots; zeroing them gives a zero output.
    weights = jax.nn.softmax(logits, axis=-1) * valid
    out = jnp.einsum("bhgs,bhsd->bhgd", weights.astype(v_cache.dtype), v_cache, precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)


def kernel_supports(dtype, head_dim: int, max_len: int) -> str | None:
    """Why the kernel cannot take a cache of this dtype and shape, or None if it can."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"the kernel needs a bfloat16 or float16 model (compute dtype), not {jnp.dtype(dtype).name}"
    if head_dim % (SWIZZLE_BYTES // jnp.dtype(dtype).itemsize):
        return f"the kernel needs head_dim a multiple of {SWIZZLE_BYTES // jnp.dtype(dtype).itemsize}, not {head_dim}"
    if max_len % KERNEL_BLOCK_KV:
        return f"the kernel needs a cache length that is a multiple of {KERNEL_BLOCK_KV}, not {max_len}"
    return None


def choose_implementation(setting: str, dtype, head_dim: int) -> Literal["reference", "pallas"]:
    """The decode attention a generation setting ("auto", "reference" or "pallas") resolves to.

    "auto" is the reference on every backend until a GPU benchmark shows the kernel faster
    (docs/benchmarks.md); "pallas" with inputs the kernel cannot take is a one-line error.
    """
    if setting not in ("auto", "reference", "pallas"):
        raise ValueError(f"attention={setting!r} is not one of 'auto', 'reference', 'pallas'")
    if setting == "pallas":
        reason = kernel_supports(dtype, head_dim, KERNEL_BLOCK_KV)
        if reason:
            raise ValueError(f"attention=pallas: {reason}; use attention=reference")
        return "pallas"
    return "reference"


def _flash_decoding_kernel(q_gmem, k_gmem, v_gmem, start_gmem, end_gmem, out_gmem, lse_gmem,
                           q_smem, k_smem, v_smem, out_smem, lse_smem, q_barrier, k_barriers, v_barriers,
                           *, scale: float, block_kv: int, num_stages: int, split_len: int, out_rows: int,
                           interpret: bool):
    """One (row, kv head, split) program: online softmax over the split's valid key blocks.

    q_gmem [batch, kv_heads, 64, dim]; k_gmem, v_gmem [batch, kv_heads, max_len, dim];
    start_gmem, end_gmem [batch] int32; out_gmem [batch, kv_heads, splits, out_rows, dim] f32
    (normalised within the split); lse_gmem [batch, kv_heads, splits, out_rows] f32.
    Register layouts are pinned for the GPU lowering (wgmma's accumulator layout); the
    interpreter has no layouts, so there they are left out.
    """
    in_layout = (lambda x, layout: x) if interpret else plgpu.layout_cast
    iota = (lambda dtype, shape, dim, layout: lax.broadcasted_iota(dtype, shape, dim)) if interpret else (
        lambda dtype, shape, dim, layout: plgpu.broadcasted_iota(dtype, shape, dim, layout=layout))
    b, h, s = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("splits")
    split_start = s * split_len
    lo = jnp.maximum(start_gmem[b], split_start)  # the row's valid slots inside this split: [lo, hi)
    hi = jnp.minimum(end_gmem[b], split_start + split_len)
    first_block = lax.div(lo, block_kv)
    num_blocks = jnp.where(hi > lo, lax.div(hi + block_kv - 1, block_kv) - first_block, 0)

    def load_block(i, stage):
        keys = pl.ds((first_block + i) * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_gmem.at[b, h, keys], k_smem.at[stage], k_barriers.at[stage])
        plgpu.copy_gmem_to_smem(v_gmem.at[b, h, keys], v_smem.at[stage], v_barriers.at[stage])

    plgpu.copy_gmem_to_smem(q_gmem.at[b, h], q_smem, q_barrier)
    for stage in range(num_stages):  # the first blocks go out before any math
        pl.when(stage < num_blocks)(functools.partial(load_block, stage, stage))
    plgpu.barrier_wait(q_barrier)

    def attend_block(i, carry):
        acc, running_max, running_sum = carry  # [64, dim], [64], [64] float32
        stage = lax.rem(i, num_stages)
        plgpu.barrier_wait(k_barriers.at[stage])

        def q_times_k(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[stage], (1, 0)))
            return acc_ref[...]

        # The interpreter has no wgmma from registers or from a transposed operand: there both
        # products are computed in jnp from the same shared-memory tiles.
        if interpret:
            logits = jnp.dot(q_smem[...], k_smem[stage].T, preferred_element_type=jnp.float32) * scale
        else:
            logits = pl.run_scoped(q_times_k, plgpu.ACC((TILE_ROWS, block_kv), jnp.float32)) * scale
        slots = (first_block + i) * block_kv + iota(jnp.int32, (TILE_ROWS, block_kv), 1, plgpu.Layout.WGMMA)
        logits = jnp.where((slots >= lo) & (slots < hi), logits, MASK_VALUE)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - lax.broadcast_in_dim(new_max, logits.shape, [0]))
        running_sum = running_sum * correction + probs.sum(axis=1)
        plgpu.barrier_wait(v_barriers.at[stage])

        def probs_times_v(acc_ref):
            plgpu.wgmma(acc_ref, probs.astype(v_smem.dtype), v_smem.at[stage])
            return acc_ref[...]  # waits for the wgmma: the stage is free again

        if interpret:
            attended = jnp.dot(probs.astype(v_smem.dtype), v_smem[stage], preferred_element_type=jnp.float32)
        else:
            attended = pl.run_scoped(probs_times_v, plgpu.ACC((TILE_ROWS, acc.shape[1]), jnp.float32))
        acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + attended
        pl.when(i + num_stages < num_blocks)(functools.partial(load_block, i + num_stages, stage))
        return acc, new_max, running_sum

    dim = q_smem.shape[-1]
    init = (
        in_layout(jnp.zeros((TILE_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA),
        in_layout(jnp.full((TILE_ROWS,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        in_layout(jnp.zeros((TILE_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
    )
    acc, running_max, running_sum = lax.fori_loop(0, num_blocks, attend_block, init)
    _write_split(acc, running_max, running_sum, out_smem, lse_smem, out_gmem.at[b, h, s], lse_gmem.at[b, h, s],
                 out_rows)


def _write_split(acc, running_max, running_sum, out_smem, lse_smem, out_gmem, lse_gmem, out_rows: int):
    """Normalises the split's output and writes its first `out_rows` rows and their log-sum-exps.
    A split with no valid key has running_sum == 0: a zero output, and an lse that weighs nothing."""
    has_keys = running_sum > 0
    safe_sum = jnp.where(has_keys, running_sum, 1.0)
    out_smem[...] = acc / lax.broadcast_in_dim(safe_sum, acc.shape, [0])
    lse_smem[...] = jnp.where(has_keys, running_max + jnp.log(safe_sum), MASK_VALUE)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, out_rows)], out_gmem)
    plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, out_rows)], lse_gmem)
    plgpu.wait_smem_to_gmem(0)


def default_num_splits(batch: int, kv_heads: int, max_len: int, block_kv: int) -> int:
    """Enough splits for about two programs per streaming multiprocessor, at most one per block."""
    device = jax.devices()[0]
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    cores = cores or 132  # an H100 SXM
    return max(1, min(math.ceil(2 * cores / (batch * kv_heads)), max_len // block_kv))


def decode_attention_pallas(q, k_cache, v_cache, kv_start, kv_end, *, scale=None, block_kv: int = 64,
                            num_stages: int = 2, num_splits: int | None = None, interpret: bool = False):
    """Flash-decoding kernel on Mosaic GPU; same contract as `decode_attention_reference`.

    block_kv: keys per step (a multiple of 64 dividing max_len). num_stages: K/V blocks in flight.
    num_splits: parallel chunks of the key range (default: `default_num_splits`).
    interpret: run in Pallas' GPU interpret mode (CPU; exact but slow).
    """
    _check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    batch, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if block_kv % 64 or max_len % block_kv:
        raise ValueError(f"block_kv={block_kv} must be a multiple of 64 that divides max_len={max_len}")
    reason = kernel_supports(k_cache.dtype, head_dim, max_len)
    if reason:
        raise ValueError(f"attention=pallas: {reason}; use attention=reference")
    group = q_heads // kv_heads
    if group > TILE_ROWS:
        raise ValueError(f"attention=pallas takes at most {TILE_ROWS} query heads per kv head, got {group}")
    scale = head_dim**-0.5 if scale is None else scale
    num_splits = num_splits or default_num_splits(batch, kv_heads, max_len, block_kv)
    split_len = pl.cdiv(max_len, num_splits * block_kv) * block_kv
    num_splits = pl.cdiv(max_len, split_len)
    num_stages = max(1, min(num_stages, split_len // block_kv))
    out_rows = max(8, pl.cdiv(group, 8) * 8)  # rows written back: the group, padded for the copy

    # [batch, kv_heads, 64, dim]: the group's query heads, then zero rows.
    q_tiles = jnp.pad(q.reshape(batch, kv_heads, group, head_dim).astype(k_cache.dtype),
                      ((0, 0), (0, 0), (0, TILE_ROWS - group), (0, 0)))
    swizzled = (plgpu.TilingTransform((8, SWIZZLE_BYTES // k_cache.dtype.itemsize)),
                plgpu.SwizzleTransform(SWIZZLE_BYTES))
    kernel = functools.partial(_flash_decoding_kernel, scale=scale, block_kv=block_kv, num_stages=num_stages,
                               split_len=split_len, out_rows=out_rows, interpret=interpret)
    split_out, split_lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, kv_heads, num_splits, out_rows, head_dim), jnp.float32),
                  jax.ShapeDtypeStruct((batch, kv_heads, num_splits, out_rows), jnp.float32)),
        scratch_types=(
            plgpu.SMEM((TILE_ROWS, head_dim), k_cache.dtype, transforms=swizzled),
            plgpu.SMEM((num_stages, block_kv, head_dim), k_cache.dtype, transforms=swizzled),
            plgpu.SMEM((num_stages, block_kv, head_dim), k_cache.dtype, transforms=swizzled),
            plgpu.SMEM((TILE_ROWS, head_dim), jnp.float32),
            plgpu.SMEM((TILE_ROWS,), jnp.float32),
            plgpu.Barrier(),
            plgpu.Barrier(num_barriers=num_stages),
            plgpu.Barrier(num_barriers=num_stages),
        ),
        grid=(batch, kv_heads, num_splits),
        grid_names=("batch", "heads", "splits"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params() if interpret else None,
    )(q_tiles, k_cache, v_cache, kv_start.astype(jnp.int32), jnp.minimum(kv_end, max_len).astype(jnp.int32))

    # Merge the splits: weight each by exp(its lse - the largest lse). An all-empty row has
    # equal weights on all-zero outputs, so it comes out zero.
    weights = jnp.exp(split_lse - split_lse.max(axis=2, keepdims=True))  # [batch, kv_heads, splits, rows]
    out = (weights[..., None] * split_out).sum(axis=2) / weights.sum(axis=2)[..., None]
    return out[:, :, :group].reshape(batch, q_heads, head_dim).astype(q.dtype)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def decode_attention(q, k_cache, v_cache, kv_start, kv_end, *,
                     implementation: Literal["reference", "pallas"] = "reference",
                     sharding: NamedSharding | None = None, scale=None, **pallas_options):
    """Decode attention by the chosen implementation; `pallas_options` go to the kernel.

    sharding: the cache's NamedSharding under tensor/data parallelism. The kernel is a custom
    call XLA cannot partition, so on a GPU it runs per shard (`per_shard`); the reference is
    partitioned by XLA itself. On CPU the kernel runs in interpret mode, on whole arrays: the
    interpreter keeps one global simulated GPU and cannot run several shards at once.
    """
    if implementation == "reference":
        if pallas_options:
            raise ValueError(f"options {sorted(pallas_options)} apply only to implementation='pallas'")
        return decode_attention_reference(q, k_cache, v_cache, kv_start, kv_end, scale=scale)
    if implementation != "pallas":
        raise ValueError(f"implementation={implementation!r} is not one of 'reference', 'pallas'")
    interpret = pallas_options.setdefault("interpret", jax.default_backend() == "cpu")
    kernel = functools.partial(decode_attention_pallas, scale=scale, **pallas_options)
    if sharding is None or sharding.mesh.size == 1 or interpret:
        return kernel(q, k_cache, v_cache, kv_start, kv_end)
    return per_shard(kernel, sharding)(q, k_cache, v_cache, kv_start, kv_end)


def per_shard(attention_fn, sharding: NamedSharding):
    """`attention_fn(q, k_cache, v_cache, kv_start, kv_end)` run by `shard_map` on each shard of a
    cache sharded as `sharding` ([batch, kv_heads, max_len, head_dim]): rows over the batch axes,
    each kv head with its group of query heads."""
    rows, heads = (tuple(sharding.spec) + (None, None))[:2]
    cache = PartitionSpec(rows, heads, None, None)
    return jax.shard_map(attention_fn, mesh=sharding.mesh, check_vma=False,
                         in_specs=(PartitionSpec(rows, heads), cache, cache, PartitionSpec(rows), PartitionSpec(rows)),
                         out_specs=PartitionSpec(rows, heads))
