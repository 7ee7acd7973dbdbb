"""The static KV cache and the two cached forward passes: prefill (fills it) and a decode step (extends it).

Layout, chosen so that a decode step touches each byte once:
- one pair of buffers per layer (a tuple, not one stacked array): a layer's attention reads its
  own buffer in place. A stacked [layers, ...] cache inside a layer scan is sliced per layer
  (a copy of the layer's whole cache) and written back whole through the scan carry.
- [batch, kv_heads, max_len, head_dim], head-major: the slots of one (row, kv head) are one
  contiguous [max_len, head_dim] matrix, which is what both the attention contraction (batch
  dims leading, no transpose) and the decode kernel's block loads want.
- a decode step writes only the new token's slot, with `dynamic_update_slice` on a buffer that
  the `while_loop` carries (updated in place, never copied).
- stored in the compute dtype (bf16 in practice): read without conversion.

Prompts are left padded to a common length, so a prompt's keys end at the same slot in every row
and row b's real keys are the contiguous slots [kv_start[b], slot[b]]. Static generation moves all
rows in step (one slot for all); the refill engine's rows each keep their own length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.generation.kernels.decode_attention import decode_attention
from jaxrlhf.models.decoder import layer_attention_inputs
from jaxrlhf.models.layers import alibi_bias, alibi_slopes, attention, rope_inverse_frequencies


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, each [batch, kv_heads, max_len, head_dim]."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config, batch: int, max_len: int, sharding=None) -> KVCache:
        """An empty cache in the compute dtype; `sharding` (e.g. rows over data, kv heads over
        tensor) is imposed on every buffer inside jit."""
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)

        def buffer():
            x = jnp.zeros(shape, config.compute_dtype)
            return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

        layers = range(config.num_layers)
        return cls(tuple(buffer() for _ in layers), tuple(buffer() for _ in layers))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in (*self.keys, *self.values))

    def repeat_rows(self, n: int, sharding=None) -> KVCache:
        """Every row repeated n times, prompt-major (row b becomes rows b*n .. b*n + n - 1): one
        prefilled prompt's cache shared by its n samples. `sharding` as in `zeros`."""

        def repeat(x):
            x = jnp.repeat(x, n, axis=0)  # [batch * n, kv_heads, max_len, head_dim]
            return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

        return KVCache(tuple(map(repeat, self.keys)), tuple(map(repeat, self.values)))

    def write_rows(self, chunk: KVCache, slots) -> KVCache:
        """This cache with row j of `chunk` (its slots [0, chunk.max_len)) written into row
        `slots[j]`; a slot index past the last row drops that row (masked, fixed-shape refills)."""

        def write(x, part):
            return x.at[slots, :, : part.shape[2], :].set(part.astype(x.dtype), mode="drop")

        return KVCache(tuple(map(write, self.keys, chunk.keys)), tuple(map(write, self.values, chunk.values)))

    def take_rows(self, rows) -> KVCache:
        """The cache of the given rows, in order (a gather: rows may repeat)."""
        take = lambda x: jnp.take(x, rows, axis=0)
        return KVCache(tuple(map(take, self.keys)), tuple(map(take, self.values)))


def _head_major(x):
    """[batch, seq, kv_heads, dim] -> [batch, kv_heads, seq, dim]."""
    return x.transpose(0, 2, 1, 3)


def prefill(model, prompt_ids, prompt_mask, positions, cache: KVCache):
    """Runs the left-padded prompts [batch, prompt], writes their keys and values into slots
    [0, prompt) and returns (hidden [batch, prompt, embed_dim], cache). The prompt attends only to
    itself (not to the empty rest of the cache)."""
    decoder = model.decoder
    config = decoder.config
    slots = jnp.arange(prompt_ids.shape[1])
    inputs = layer_attention_inputs(config, prompt_mask.astype(bool), slots, slots)  # per-layer windows
    bias = alibi_bias(config, positions)
    x = decoder.embed(prompt_ids, positions)
    keys, values = [], []
    for index, (layer, k_cache, v_cache) in enumerate(zip(decoder.blocks(), cache.keys, cache.values)):
        mask, inv_freq = inputs(index)

        def attend(attn, h, k_cache=k_cache, v_cache=v_cache, mask=mask, inv_freq=inv_freq):
            q, k, v = attn.project(h, positions, inv_freq)
            k_cache = jax.lax.dynamic_update_slice(k_cache, _head_major(k).astype(k_cache.dtype), (0, 0, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, _head_major(v).astype(v_cache.dtype), (0, 0, 0, 0))
            attended = attention(q, k, v, mask, attn.implementation, bias, scale=attn.scale, softcap=attn.softcap)
            return attn.output(attended), (k_cache, v_cache)

        x, (k_cache, v_cache) = layer(x, attend)
        # Write this layer's cache before the next layer starts: left free, the scheduler may keep
        # every layer's prompt keys and values alive until the end of prefill.
        x, k_cache, v_cache = jax.lax.optimization_barrier((x, k_cache, v_cache))
        keys.append(k_cache)
        values.append(v_cache)
    return decoder.finish(x), KVCache(tuple(keys), tuple(values))


def _write_slot(cache, update, slot):
    """cache [batch, kv_heads, max_len, dim] with update [batch, kv_heads, 1, dim] written at `slot`:
    one slot for every row (a scalar: one in-place `dynamic_update_slice`), or each row's own ([batch])."""
    update = update.astype(cache.dtype)
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice(cache, update, (0, 0, slot, 0))
    rows = jnp.arange(cache.shape[0])
    return cache.at[rows, :, slot, :].set(update[:, :, 0, :], mode="promise_in_bounds")


def decode_forward(
    model, tokens, positions, cache: KVCache, slot, kv_start, implementation: str = "reference", cache_sharding=None
):
    """One decode step: tokens, positions [batch] -> (hidden [batch, embed_dim], cache).

    Writes each layer's new key and value at `slot` (a scalar for left-padded rows that move in
    step, or [batch] for rows at their own lengths, as the refill engine's slots are) and attends
    over each row's real slots [kv_start[b], slot[b]] (narrowed, layer by layer, to the layer's
    sliding window where it has one) with the decode attention `implementation` ("reference" or "pallas";
    `cache_sharding` tells the kernel the mesh). An ALiBi model's bias takes the key in slot s of
    row b at position s - kv_start[b]: the row's keys are contiguous from kv_start[b], whose key is
    the row's position 0 (HF's BLOOM counts positions over real tokens, as `positions_from_mask`).
    """
    decoder = model.decoder
    config = decoder.config
    slopes = alibi_slopes(config.num_heads) if config.positions == "alibi" else None
    batch = tokens.shape[0]
    kv_end = jnp.broadcast_to(slot + 1, (batch,)).astype(jnp.int32)
    positions = positions[:, None]  # [batch, 1]
    x = decoder.embed(tokens[:, None], positions)
    keys, values = [], []
    for index, (layer, k_cache, v_cache) in enumerate(zip(decoder.blocks(), cache.keys, cache.values)):
        window = config.window(index)
        layer_start = kv_start if window is None else jnp.maximum(kv_start, kv_end - window)
        inv_freq = rope_inverse_frequencies(config, windowed=window is not None)

        def attend(attn, h, k_cache=k_cache, v_cache=v_cache, layer_start=layer_start, inv_freq=inv_freq):
            q, k, v = attn.project(h, positions, inv_freq)  # q [batch, 1, heads, dim], k/v [batch, 1, kv_heads, dim]
            k_cache, v_cache = _write_slot(k_cache, _head_major(k), slot), _write_slot(v_cache, _head_major(v), slot)
            out = decode_attention(
                q[:, 0],
                k_cache,
                v_cache,
                layer_start,
                kv_end,
                implementation=implementation,
                sharding=cache_sharding,
                scale=attn.scale,
                softcap=attn.softcap,
                alibi_slopes=slopes,
            )
            return attn.output(out[:, None]), (k_cache, v_cache)

        x, (k_cache, v_cache) = layer(x, attend)
        keys.append(k_cache)
        values.append(v_cache)
    return decoder.finish(x)[:, 0], KVCache(tuple(keys), tuple(values))
