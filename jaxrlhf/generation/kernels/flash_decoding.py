"""Flash decoding as a Pallas kernel on Mosaic GPU (Hopper and newer; Pallas' Triton backend is deprecated).

Same contract as `reference.decode_attention_reference`, but it reads only the blocks of key
slots that hold a valid key of the row, each once: grid (batch, kv_heads, splits), one
warpgroup per program; the query heads of one kv group are the rows of one [64, head_dim] tile
(wgmma's smallest M; the spare rows are zeros and cost no memory traffic, which is what bounds a
decode step), so every K/V block is loaded once for the whole group, by TMA, `num_stages` blocks
ahead of the math. The key range is cut into `num_splits` chunks that run in parallel when
batch x kv_heads is too small to fill the GPU; a small jnp step merges the chunks by their
log-sum-exps. On CPU it runs in Pallas' GPU interpret mode (tests); it lowers for CUDA anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxrlhf.generation.kernels.reference import MASK_VALUE, check_inputs

# wgmma multiplies [64 rows, k] tiles: the query heads of a group are padded to this many rows.
TILE_ROWS = 64
# The 128-byte swizzle of bf16 tiles: head_dim must be a multiple of 64 elements.
SWIZZLE_BYTES = 128
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)
# The cache length granularity the kernel reads in (block_kv divides it); generation rounds up to it.
KERNEL_BLOCK_KV = 64


def kernel_supports(dtype, head_dim: int, max_len: int) -> str | None:
    """Why the kernel cannot take a cache of this dtype and shape, or None if it can."""
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"the kernel needs a bfloat16 or float16 model (compute dtype), not {jnp.dtype(dtype).name}"
    if head_dim % (SWIZZLE_BYTES // jnp.dtype(dtype).itemsize):
        return f"the kernel needs head_dim a multiple of {SWIZZLE_BYTES // jnp.dtype(dtype).itemsize}, not {head_dim}"
    if max_len % KERNEL_BLOCK_KV:
        return f"the kernel needs a cache length that is a multiple of {KERNEL_BLOCK_KV}, not {max_len}"
    return None


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """The static shape of one kernel call."""

    scale: float
    block_kv: int  # keys per step
    num_stages: int  # K/V blocks in flight
    num_splits: int  # parallel chunks of the key range
    split_len: int  # keys per chunk, a multiple of block_kv
    out_rows: int  # output rows written back per program: the group, padded to 8 for the copy


def plan_kernel(q, k_cache, scale, block_kv: int, num_stages: int, num_splits: int | None) -> KernelPlan:
    batch, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    num_splits = num_splits or default_num_splits(batch, kv_heads, max_len, block_kv)
    split_len = pl.cdiv(max_len, num_splits * block_kv) * block_kv
    num_stages = max(1, min(num_stages, split_len // block_kv))
    out_rows = max(8, pl.cdiv(q_heads // kv_heads, 8) * 8)
    scale = head_dim**-0.5 if scale is None else scale
    return KernelPlan(scale, block_kv, num_stages, pl.cdiv(max_len, split_len), split_len, out_rows)


def _flash_decoding_kernel(*refs, plan: KernelPlan, interpret: bool):
    """One (row, kv head, split) program: online softmax over the split's valid key blocks.

    refs: q_gmem [batch, kv_heads, 64, dim]; k_gmem, v_gmem [batch, kv_heads, max_len, dim];
    start_gmem, end_gmem [batch] int32; out_gmem [batch, kv_heads, splits, out_rows, dim] f32
    (normalised within the split); lse_gmem [batch, kv_heads, splits, out_rows] f32; then the
    shared-memory scratch of `_scratch_types`.
    """
    q_gmem, k_gmem, v_gmem, start_gmem, end_gmem, out_gmem, lse_gmem, *scratch = refs
    q_smem, k_smem, v_smem, out_smem, lse_smem, q_barrier, k_barriers, v_barriers = scratch
    block_kv, num_stages, split_len = plan.block_kv, plan.num_stages, plan.split_len
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
        logits = _q_times_k(q_smem, k_smem.at[stage], interpret) * plan.scale  # [64, block_kv]
        slots = (first_block + i) * block_kv + _iota(logits.shape, 1, interpret)
        logits = jnp.where((slots >= lo) & (slots < hi), logits, MASK_VALUE)
        new_max = jnp.maximum(running_max, logits.max(axis=1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - lax.broadcast_in_dim(new_max, logits.shape, [0]))
        running_sum = running_sum * correction + probs.sum(axis=1)
        plgpu.barrier_wait(v_barriers.at[stage])
        attended = _probs_times_v(probs.astype(v_smem.dtype), v_smem.at[stage], interpret)
        acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + attended
        pl.when(i + num_stages < num_blocks)(functools.partial(load_block, i + num_stages, stage))  # stage is free
        return acc, new_max, running_sum

    rows, dim = q_smem.shape
    init = (
        _in_layout(jnp.zeros((rows, dim), jnp.float32), plgpu.Layout.WGMMA, interpret),
        _in_layout(jnp.full((rows,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret),
        _in_layout(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1), interpret),
    )
    acc, running_max, running_sum = lax.fori_loop(0, num_blocks, attend_block, init)
    _write_split(
        acc, running_max, running_sum, out_smem, lse_smem, out_gmem.at[b, h, s], lse_gmem.at[b, h, s], plan.out_rows
    )


# Register layouts are pinned for the GPU lowering (wgmma's accumulator layout). The interpreter
# has no layouts and no wgmma from registers or from a transposed tile: there the same products
# are computed in jnp from the same shared-memory tiles.


def _in_layout(x, layout, interpret: bool):
    return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dimension: int, interpret: bool):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dimension)
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _q_times_k(q_smem, k_tile, interpret: bool):
    """[64, dim] x [block_kv, dim]^T -> [64, block_kv] float32."""
    if interpret:
        return jnp.dot(q_smem[...], k_tile[...].T, preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((q_smem.shape[0], k_tile.shape[0]), jnp.float32))


def _probs_times_v(probs, v_tile, interpret: bool):
    """[64, block_kv] x [block_kv, dim] -> [64, dim] float32; returns once the tile is read."""
    if interpret:
        return jnp.dot(probs, v_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
        plgpu.wgmma(acc_ref, probs, v_tile)
        return acc_ref[...]

    return pl.run_scoped(product, plgpu.ACC((probs.shape[0], v_tile.shape[1]), jnp.float32))


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


def decode_attention_pallas(
    q,
    k_cache,
    v_cache,
    kv_start,
    kv_end,
    *,
    scale=None,
    block_kv: int = 64,
    num_stages: int = 2,
    num_splits: int | None = None,
    interpret: bool = False,
):
    """Flash-decoding kernel on Mosaic GPU; same contract as `decode_attention_reference`.

    block_kv: keys per step (a multiple of 64 dividing max_len). num_stages: K/V blocks in flight.
    num_splits: parallel chunks of the key range (default: `default_num_splits`).
    interpret: run in Pallas' GPU interpret mode (CPU; exact but slow).
    """
    check_inputs(q, k_cache, v_cache, kv_start, kv_end)
    _check_kernel_shapes(q, k_cache, block_kv)
    batch, q_heads, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    plan = plan_kernel(q, k_cache, scale, block_kv, num_stages, num_splits)
    splits, rows = plan.num_splits, plan.out_rows

    # [batch, kv_heads, 64, dim]: the group's query heads, then zero rows.
    q_tiles = jnp.pad(
        q.reshape(batch, kv_heads, group, head_dim).astype(k_cache.dtype),
        ((0, 0), (0, 0), (0, TILE_ROWS - group), (0, 0)),
    )
    split_out, split_lse = plgpu.kernel(
        functools.partial(_flash_decoding_kernel, plan=plan, interpret=interpret),
        out_type=(
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
        ),
        scratch_types=_scratch_types(k_cache.dtype, head_dim, block_kv, plan.num_stages),
        grid=(batch, kv_heads, splits),
        grid_names=("batch", "heads", "splits"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params() if interpret else None,
    )(q_tiles, k_cache, v_cache, kv_start.astype(jnp.int32), jnp.minimum(kv_end, max_len).astype(jnp.int32))

    return _merge_splits(split_out, split_lse, q)


def _check_kernel_shapes(q, k_cache, block_kv: int) -> None:
    head_dim, (kv_heads, max_len) = q.shape[2], k_cache.shape[1:3]
    if block_kv % 64 or max_len % block_kv:
        raise ValueError(f"block_kv={block_kv} must be a multiple of 64 that divides max_len={max_len}")
    reason = kernel_supports(k_cache.dtype, head_dim, max_len)
    if reason:
        raise ValueError(f"attention=pallas: {reason}; use attention=reference")
    if q.shape[1] // kv_heads > TILE_ROWS:
        raise ValueError(
            f"attention=pallas takes at most {TILE_ROWS} query heads per kv head, got {q.shape[1] // kv_heads}"
        )


def _scratch_types(dtype, head_dim: int, block_kv: int, num_stages: int):
    """Shared memory: the query tile, `num_stages` K and V tiles (swizzled for wgmma and TMA), the
    output tile and its log-sum-exps; barriers for the query and each stage's K and V."""
    swizzled = (
        plgpu.TilingTransform((8, SWIZZLE_BYTES // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(SWIZZLE_BYTES),
    )
    return (
        plgpu.SMEM((TILE_ROWS, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=swizzled),
        plgpu.SMEM((TILE_ROWS, head_dim), jnp.float32),
        plgpu.SMEM((TILE_ROWS,), jnp.float32),
        plgpu.Barrier(),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
    )


def _merge_splits(split_out, split_lse, q):
    """Weights each split by exp(its lse - the largest lse). An all-empty row has equal weights
    on all-zero outputs, so it comes out zero. -> [batch, q_heads, head_dim] in q's dtype."""
    batch, q_heads, head_dim = q.shape
    weights = jnp.exp(split_lse - split_lse.max(axis=2, keepdims=True))  # [batch, kv_heads, splits, rows]
    out = (weights[..., None] * split_out).sum(axis=2) / weights.sum(axis=2)[..., None]
    group = q_heads // split_out.shape[1]
    return out[:, :, :group].reshape(batch, q_heads, head_dim).astype(q.dtype)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
