"""Micro-benchmark: the Mosaic GPU flash-decoding kernel against the jnp reference for one decode step.

From the repository root:
  GPU: PYTHONPATH=. python scripts/bench_decode_attention.py --max-len 1024 --block-kv 64,128 --num-splits 1,2,4
  CPU: PYTHONPATH=. python scripts/bench_decode_attention.py --interpret   (tiny smoke shape; timings meaningless)

Each row's valid range is left padded the way generation fills the cache: it starts at a random
slot in the first half and ends at `--fill` of the cache. Prints one line per kernel setting with
the median time per call, the K/V bandwidth over the valid slots, and the max error vs the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.generation.kernels.flash_decoding import decode_attention_pallas
from jaxrlhf.generation.kernels.reference import decode_attention_reference


@dataclasses.dataclass(frozen=True)
class BenchShape:
    batch: int
    max_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    fill: float  # fraction of the cache filled so far: kv_end = fill * max_len


SMOKE_SHAPE = BenchShape(batch=2, max_len=128, q_heads=4, kv_heads=2, head_dim=64, dtype="bfloat16", fill=0.8)


def make_inputs(shape: BenchShape, seed: int = 0):
    """Random q, caches and left-padded [kv_start, kv_end) ranges for `shape`."""
    q_key, k_key, v_key, start_key = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(shape.dtype)
    q = jax.random.normal(q_key, (shape.batch, shape.q_heads, shape.head_dim), dtype)
    cache_shape = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
    k_cache = jax.random.normal(k_key, cache_shape, dtype)
    v_cache = jax.random.normal(v_key, cache_shape, dtype)
    kv_end = jnp.full((shape.batch,), max(1, int(shape.fill * shape.max_len)), jnp.int32)
    kv_start = jax.random.randint(start_key, (shape.batch,), 0, shape.max_len // 2) % kv_end
    return q, k_cache, v_cache, kv_start, kv_end


def median_seconds(fn, args, iters: int) -> float:
    """Median wall time of `fn(*args)` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def valid_kv_bytes(shape: BenchShape, kv_start, kv_end) -> int:
    """Bytes of K and V inside the valid ranges: what an ideal kernel has to read."""
    slots = int(jnp.sum(kv_end - kv_start))
    return 2 * slots * shape.kv_heads * shape.head_dim * jnp.dtype(shape.dtype).itemsize


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--fill", type=float, default=0.75, help="fraction of the cache filled (kv_end / max_len)")
    parser.add_argument("--block-kv", type=int_list, default=[64], help="comma-separated values to sweep")
    parser.add_argument("--num-splits", type=int_list, default=[0], help="comma-separated; 0 = the default heuristic")
    parser.add_argument("--num-stages", type=int_list, default=[2], help="comma-separated values to sweep")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--interpret", action="store_true", help="CPU smoke run: Pallas interpreter on a tiny shape, 2 timed iterations"
    )
    args = parser.parse_args()

    if args.interpret:
        shape, iters = SMOKE_SHAPE, 2
    else:
        shape = BenchShape(args.batch, args.max_len, args.q_heads, args.kv_heads, args.head_dim, args.dtype, args.fill)
        iters = args.iters
    inputs = make_inputs(shape)
    bytes_read = valid_kv_bytes(shape, inputs[3], inputs[4])
    print(f"device: {jax.devices()[0].device_kind}  {shape}")

    reference = jax.jit(decode_attention_reference)
    expected = reference(*inputs).astype(jnp.float32)
    seconds = median_seconds(reference, inputs, iters)
    print(f"{'reference':<44} {seconds * 1e6:10.1f} us  {bytes_read / seconds / 1e9:8.1f} GB/s")

    for block_kv, num_splits, num_stages in itertools.product(args.block_kv, args.num_splits, args.num_stages):
        kernel = jax.jit(
            functools.partial(
                decode_attention_pallas,
                block_kv=block_kv,
                num_splits=num_splits or None,
                num_stages=num_stages,
                interpret=args.interpret,
            )
        )
        error = float(jnp.max(jnp.abs(kernel(*inputs).astype(jnp.float32) - expected)))
        seconds = median_seconds(kernel, inputs, iters)
        label = f"pallas block_kv={block_kv} splits={num_splits or 'auto'} stages={num_stages}"
        print(f"{label:<44} {seconds * 1e6:10.1f} us  {bytes_read / seconds / 1e9:8.1f} GB/s  max|err|={error:.2e}")


if __name__ == "__main__":
    main()
