"""The decoder-only causal LM shared by every family, and the per-token value model.

Call `model(input_ids, attention_mask) -> logits [batch, seq, vocab]` for training and scoring.
Generation calls `model.decoder(..., cache=...)` with a preallocated `KVCache`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.layers import Dense, DecoderLayer, Norm, make_param, rope_inverse_frequencies


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static keys and values for all layers: [layers, batch, max_len, kv_heads, head_dim] each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def positions_from_mask(attention_mask):
    """Position ids that count only real tokens, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def attention_mask_4d(key_valid, query_slots, key_slots, sliding_window: int | None):
    """[batch, 1, queries, keys] mask: key is real, not in the future, and inside the window.

    key_valid: [batch, keys] bool; query_slots: [queries] and key_slots: [keys] are the
    positions in the (cache) sequence, used for causality.
    """
    causal = key_slots[None, :] <= query_slots[:, None]  # [queries, keys]
    if sliding_window is not None:
        causal &= query_slots[:, None] - key_slots[None, :] < sliding_window
    return (causal[None, :, :] & key_valid[:, None, :])[:, None]


class Decoder(nnx.Module):
    """Token (and OPT position) embeddings, the stacked blocks, the final norm."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        dtype = config.weight_dtype
        self.embed_tokens = make_param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), "normal", dtype)
        num_positions = config.max_position_embeddings + config.learned_position_offset
        self.embed_positions = make_param(rngs, (num_positions, config.hidden_size), ("positions", "embed"), "normal",
                                          dtype) if config.positions == "learned" else None
        e, p = config.hidden_size, config.embed_dim
        projection = lambda i, o, ia, oa: Dense((i,), (o,), (ia,), (oa,), bias=False, config=config, rngs=rngs)
        self.project_in = projection(p, e, "embed_proj", "embed") if config.has_projection else None
        self.project_out = projection(e, p, "embed", "embed_proj") if config.has_projection else None
        self.layers = DecoderLayer(config, rngs, stack=config.num_layers)
        self.final_norm = Norm(config.hidden_size, config, rngs) if config.final_norm else None

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                 write_index=None, key_valid=None, attention_fn=None, segment_ids=None):
        """Hidden states [batch, seq, embed_dim] (and the updated cache when one is given).

        Without a cache, keys are the input tokens themselves; with `segment_ids` (packed rows,
        0 = pad) a token sees only earlier tokens of its own segment. With a cache, the tokens are
        written at slots [write_index, write_index + seq) and attend to every slot whose
        `key_valid` [batch, max_len] is set, up to their own slot.
        """
        config = self.config
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(config.compute_dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            pos_ids = positions + config.learned_position_offset
            x = x + jnp.take(self.embed_positions[...], pos_ids, axis=0).astype(config.compute_dtype)

        if cache is None:
            slots = jnp.arange(seq)
            mask = attention_mask_4d(attention_mask.astype(bool), slots, slots, config.sliding_window)
            if segment_ids is not None:
                mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        else:
            query_slots = write_index + jnp.arange(seq)
            key_slots = jnp.arange(cache.k.shape[2])
            mask = attention_mask_4d(key_valid.astype(bool), query_slots, key_slots, config.sliding_window)
        x, cache = self._run_layers(x, positions, mask, cache, write_index, attention_fn)

        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x, cache

    def _run_layers(self, x, positions, mask, cache, write_index, attention_fn):
        """All blocks with one lax.scan over the stacked layer weights (and the cache, if any)."""
        graphdef, layer_state = nnx.split(self.layers)
        inv_freq = rope_inverse_frequencies(self.config)

        def block(x, layer_state, kv):
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, positions, mask, inv_freq, kv, write_index, attention_fn)

        if self.config.remat == "block":
            block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)

        if cache is None:
            x, _ = jax.lax.scan(lambda h, s: (block(h, s, None)[0], None), x, layer_state)
            return x, None

        def step(carry, scanned):
            h, cache_k, cache_v = carry
            state, index = scanned
            h, (k, v) = block(h, state, (cache_k[index], cache_v[index]))
            cache_k = jax.lax.dynamic_update_index_in_dim(cache_k, k, index, 0)
            cache_v = jax.lax.dynamic_update_index_in_dim(cache_v, v, index, 0)
            return (h, cache_k, cache_v), None

        layer_ids = jnp.arange(self.config.num_layers)
        (x, k, v), _ = jax.lax.scan(step, (x, cache.k, cache.v), (layer_state, layer_ids))
        return x, KVCache(k, v)


class CausalLM(nnx.Module):
    """Decoder plus the language-model head (tied to the embeddings where the checkpoint ties)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        self.decoder = Decoder(config, rngs)
        self.lm_head = None if config.tie_word_embeddings else make_param(
            rngs, (config.embed_dim, config.vocab_size), ("embed", "vocab"), "normal", config.weight_dtype)

    def logits(self, hidden):
        """float32 logits [batch, seq, vocab] from hidden states [batch, seq, embed_dim]."""
        if self.lm_head is None:
            table = self.decoder.embed_tokens[...].astype(self.config.compute_dtype)
            return jnp.einsum("bte,ve->btv", hidden, table, preferred_element_type=jnp.float32)
        head = self.lm_head[...].astype(self.config.compute_dtype)
        return jnp.einsum("bte,ev->btv", hidden, head, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        hidden, _ = self.decoder(input_ids, attention_mask, positions, segment_ids=segment_ids)
        return self.logits(hidden)


class ValueModel(nnx.Module):
    """Decoder plus a scalar head per token: the reward model and the PPO critic.

    Exported as `<Family>ForSequenceClassification` with one label (the head is HF's `score`),
    whose output is the value at the last non-pad token, as our `sequence_scores` takes it.
    """

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        self.decoder = Decoder(config, rngs)
        self.value_head = Dense((config.embed_dim,), (1,), ("embed",), (None,), bias=False, config=config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """float32 values [batch, seq]."""
        hidden, _ = self.decoder(input_ids, attention_mask, positions)
        return self.value_head(hidden)[..., 0].astype(jnp.float32)
