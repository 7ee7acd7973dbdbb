"""Attention for one decode step, one new query token per row against the static KV cache: the
implementation a setting resolves to, and the dispatch (per shard for the kernel).

- `reference.decode_attention_reference`: jnp, reads every slot; the ground truth.
- `flash_decoding.decode_attention_pallas`: the Mosaic GPU kernel, reads only the valid blocks.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.generation.kernels.flash_decoding import KERNEL_BLOCK_KV, decode_attention_pallas, kernel_supports
from jaxrlhf.generation.kernels.reference import decode_attention_reference

NO_ALIBI = "the kernel does not add ALiBi biases (BLOOM)"
NO_SOFTCAP = "the kernel does not soft-cap attention logits (Gemma 2)"


def choose_implementation(
    setting: str, dtype, head_dim: int, alibi: bool = False, *, softcap: float | None = None
) -> Literal["reference", "pallas"]:
    """The decode attention a generation setting ("auto", "reference" or "pallas") resolves to
    (`model_implementation` reads the arguments off a model's config).

    "auto" is the reference on every backend until a GPU benchmark shows the kernel faster
    (docs/benchmarks.md); "pallas" with inputs the kernel cannot take (an ALiBi or a
    soft-capped model among them) is a one-line error.
    """
    if setting not in ("auto", "reference", "pallas"):
        raise ValueError(f"attention={setting!r} is not one of 'auto', 'reference', 'pallas'")
    if setting == "pallas":
        reason = NO_ALIBI if alibi else kernel_supports(dtype, head_dim, KERNEL_BLOCK_KV)
        reason = NO_SOFTCAP if softcap is not None else reason
        if reason:
            raise ValueError(f"attention=pallas: {reason}; use attention=reference")
        return "pallas"
    return "reference"


def model_implementation(setting: str, config) -> Literal["reference", "pallas"]:
    """`choose_implementation` for a model's DecoderConfig (its dtype, head_dim, ALiBi, soft-cap)."""
    alibi = config.positions == "alibi"
    return choose_implementation(
        setting, config.compute_dtype, config.head_dim, alibi, softcap=config.attn_logit_softcap
    )


def decode_attention(
    q,
    k_cache,
    v_cache,
    kv_start,
    kv_end,
    *,
    implementation: Literal["reference", "pallas"] = "reference",
    sharding: NamedSharding | None = None,
    scale=None,
    alibi_slopes=None,
    softcap=None,
    **pallas_options,
):
    """Decode attention by the chosen implementation; `pallas_options` go to the kernel.

    sharding: the cache's NamedSharding under tensor/data parallelism. The kernel is a custom
    call XLA cannot partition, so on a GPU it runs per shard (`per_shard`); the reference is
    partitioned by XLA itself (ALiBi slopes, a whole [q_heads] array, included). On CPU the kernel
    runs in interpret mode, on whole arrays: the interpreter keeps one global simulated GPU and
    cannot run several shards at once.
    """
    if implementation == "reference":
        if pallas_options:
            raise ValueError(f"options {sorted(pallas_options)} apply only to implementation='pallas'")
        return decode_attention_reference(
            q, k_cache, v_cache, kv_start, kv_end, scale=scale, alibi_slopes=alibi_slopes, softcap=softcap
        )
    if implementation != "pallas":
        raise ValueError(f"implementation={implementation!r} is not one of 'reference', 'pallas'")
    if softcap is not None:
        raise ValueError(f"implementation='pallas': {NO_SOFTCAP}; use implementation='reference'")
    if alibi_slopes is not None:
        raise ValueError(f"implementation='pallas': {NO_ALIBI}; use implementation='reference'")
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
    return jax.shard_map(
        attention_fn,
        mesh=sharding.mesh,
        check_vma=False,
        in_specs=(PartitionSpec(rows, heads), cache, cache, PartitionSpec(rows), PartitionSpec(rows)),
        out_specs=PartitionSpec(rows, heads),
    )
