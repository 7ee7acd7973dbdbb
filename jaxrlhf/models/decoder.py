"""The decoder-only causal LM shared by every family, and the per-token value model.

Call `model(input_ids, attention_mask) -> logits [batch, seq, vocab]` for training and scoring.
Generation (prefill and cached decode steps) lives in `jaxrlhf.generation`; it runs the same
blocks through `Decoder.embed`, `Decoder.blocks` and `Decoder.finish`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.layers import DecoderLayer, Dense, Norm, alibi_bias, make_param, rope_inverse_frequencies
from jaxrlhf.models.outputs import chunked_token_logprobs
from jaxrlhf.parallel.rules import constrain

RESIDUAL_AXES = ("batch", None, None)  # the residual stream: rows over the data axes, the rest whole
# What a block keeps for its backward pass ("none": everything; the others recompute the rest):
# "dots" keeps the outputs of the weight matmuls (not the attention scores), "block" only its input.
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "block": jax.checkpoint_policies.nothing_saveable,
}


def positions_from_mask(attention_mask):
    """Position ids that count only real tokens, so left padding does not shift them."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def attention_mask_4d(key_valid, query_slots, key_slots, sliding_window: int | None):
    """[batch, 1, queries, keys] mask: key is real, not in the future, and inside the window.

    key_valid: [batch, keys] bool; query_slots: [queries] and key_slots: [keys] are the
    positions in the sequence, used for causality.
    """
    causal = key_slots[None, :] <= query_slots[:, None]  # [queries, keys]
    if sliding_window is not None:
        causal &= query_slots[:, None] - key_slots[None, :] < sliding_window
    return (causal[None, :, :] & key_valid[:, None, :])[:, None]


def layer_attention_inputs(config: DecoderConfig, key_valid, query_slots, key_slots, same_segment=None):
    """`inputs(layer) -> (mask [batch, 1, queries, keys], inv_freq [rope_dim // 2])` for block `layer`
    (an int, or traced inside the layer scan): blocks differ by their sliding window and (Gemma 3)
    the rotary base of the windowed ones. One mask is built per distinct window; `same_segment`
    [batch, 1, queries, keys] (packed rows) narrows every one."""
    windows = [config.window(layer) for layer in range(config.num_layers)]
    distinct = list(dict.fromkeys(windows))
    masks = [attention_mask_4d(key_valid, query_slots, key_slots, window) for window in distinct]
    if same_segment is not None:
        masks = [mask & same_segment for mask in masks]
    freqs = [rope_inverse_frequencies(config, windowed=window is not None) for window in distinct]
    if len(distinct) == 1:
        return lambda layer: (masks[0], freqs[0])
    kind = np.array([distinct.index(window) for window in windows], np.int32)  # [layers]
    masks, freqs = jnp.stack(masks), jnp.stack(freqs)

    def inputs(layer):
        index = kind[layer] if isinstance(layer, int) else jnp.asarray(kind)[layer]
        return masks[index], freqs[index]

    return inputs


class Decoder(nnx.Module):
    """Token (and learned position: OPT, GPT-2) embeddings, normed (BLOOM) or not, the blocks, the final norm.

    With `config.scan_layers` (training) the blocks' weights are stacked on a leading "layers"
    axis and run by one `lax.scan`, so compile time does not grow with depth. Without it
    (generation) every block is its own module with its own arrays, run by a Python loop: a
    decode step then reads each weight where it lies, with no per-layer slice of a stacked array.
    """

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        dtype = config.weight_dtype
        self.embed_tokens = make_param(rngs, (config.vocab_size, config.embed_dim), ("vocab", "embed"), "normal", dtype)
        num_positions = config.max_position_embeddings + config.learned_position_offset
        self.embed_positions = (
            make_param(rngs, (num_positions, config.hidden_size), ("positions", "embed"), "normal", dtype)
            if config.positions == "learned"
            else None
        )
        e, p = config.hidden_size, config.embed_dim
        projection = lambda i, o, ia, oa: Dense((i,), (o,), (ia,), (oa,), bias=False, config=config, rngs=rngs)
        self.project_in = projection(p, e, "embed_proj", "embed") if config.has_projection else None
        self.project_out = projection(e, p, "embed", "embed_proj") if config.has_projection else None
        self.embed_norm = Norm(config.hidden_size, config, rngs) if config.embed_norm else None
        if config.scan_layers:
            self.layers = DecoderLayer(config, rngs, stack=config.num_layers)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = Norm(config.hidden_size, config, rngs) if config.final_norm else None

    def embed(self, input_ids, positions):
        """[batch, seq] ids and positions -> the residual stream [batch, seq, hidden] in the compute dtype."""
        config = self.config
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(config.compute_dtype)
        if config.scale_embeddings:  # Gemma; the factor rounded to the compute dtype, as HF does
            x = x * jnp.asarray(config.hidden_size**0.5, config.compute_dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        if self.embed_positions is not None:
            pos_ids = positions + config.learned_position_offset
            x = x + jnp.take(self.embed_positions[...], pos_ids, axis=0).astype(config.compute_dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return constrain(x, RESIDUAL_AXES)

    def finish(self, x):
        """Final norm (and OPT's projection back to the embedding width): [batch, seq, embed_dim]."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def blocks(self) -> list[DecoderLayer]:
        """The blocks one by one (generation layout only)."""
        if self.config.scan_layers:
            raise ValueError(
                "the blocks of a scanned (training-layout) decoder are stacked; convert it with "
                "jaxrlhf.generation.to_generation_layout first"
            )
        return list(self.layers)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Hidden states [batch, seq, embed_dim]. With `segment_ids` (packed rows, 0 = pad) a token
        sees only earlier tokens of its own segment."""
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
        x = self.embed(input_ids, positions)
        slots = jnp.arange(seq)
        same_segment = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        inputs = layer_attention_inputs(self.config, attention_mask.astype(bool), slots, slots, same_segment)
        bias = alibi_bias(self.config, positions)

        def attend_for(layer):
            mask, inv_freq = inputs(layer)
            return lambda attn, h: (attn(h, positions, mask, inv_freq, bias), None)

        return self.finish(self._run_layers(x, attend_for))

    def _run_layers(self, x, attend_for):
        """All blocks: one lax.scan over the stacked weights, or a loop over the separate blocks;
        `attend_for(layer)` is block `layer`'s attention step (the layer traced inside the scan)."""
        if not self.config.scan_layers:
            for index, layer in enumerate(self.layers):
                x, _ = layer(x, attend_for(index))
            return x
        graphdef, layer_state = nnx.split(self.layers)

        def block(x, layer_state, index):
            return constrain(nnx.merge(graphdef, layer_state)(x, attend_for(index))[0], RESIDUAL_AXES)

        if self.config.remat in REMAT_POLICIES:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.config.remat])
        layers = jnp.arange(self.config.num_layers)
        x, _ = jax.lax.scan(lambda h, xs: (block(h, *xs), None), x, (layer_state, layers))
        return x


class CausalLM(nnx.Module):
    """Decoder plus the language-model head (tied to the embeddings where the checkpoint ties;
    with a bias per token where it has one, GPT-J)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        self.config = config
        self.decoder = Decoder(config, rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else make_param(
                rngs, (config.embed_dim, config.vocab_size), ("embed", "vocab"), "normal", config.weight_dtype
            )
        )
        self.lm_head_bias = (
            make_param(rngs, (config.vocab_size,), ("vocab",), "zeros", config.weight_dtype)
            if config.lm_head_bias
            else None
        )

    def logits(self, hidden):
        """float32 logits [batch, seq, vocab] from hidden states [batch, seq, embed_dim]."""
        if self.lm_head is None:
            table = self.decoder.embed_tokens[...].astype(self.config.compute_dtype)
            logits = jnp.einsum("bte,ve->btv", hidden, table, preferred_element_type=jnp.float32)
        else:
            head = self.lm_head[...].astype(self.config.compute_dtype)
            logits = jnp.einsum("bte,ev->btv", hidden, head, preferred_element_type=jnp.float32)
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias[...].astype(jnp.float32)
        if self.config.final_logit_softcap is not None:  # Gemma
            cap = self.config.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self.logits(self.decoder(input_ids, attention_mask, positions, segment_ids=segment_ids))

    def token_logprobs(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """(log p(input_ids[:, t+1] | ... t), the entropy of that distribution), each float32
        [batch, seq - 1], without ever holding the float32 logits of the whole sequence
        (`outputs.chunked_token_logprobs`): what training and scoring need of the LM head."""
        hidden = self.decoder(input_ids, attention_mask, positions, segment_ids=segment_ids)
        return chunked_token_logprobs(self.logits, hidden[:, :-1], input_ids[:, 1:])


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
        return self.value_head(self.decoder(input_ids, attention_mask, positions))[..., 0].astype(jnp.float32)
