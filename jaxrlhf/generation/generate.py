"""Batched autoregressive generation: one prefill, then one `lax.while_loop` of decode steps.

Prompts are left padded, so every row's next token lands in the same cache slot and the decode
step is a single static-shape computation. The KV cache [layers, batch, prompt + new, kv_heads,
head_dim] is allocated once per call inside the jitted function and updated in place by the loop.
The loop stops as soon as every row has emitted EOS or `max_new_tokens` is reached.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.generation.kernels.decode_attention import decode_attention
from jaxrlhf.generation.sampling import sample_tokens, suppress_eos
from jaxrlhf.models.decoder import KVCache, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Static generation settings (a jit static argument: hashable)."""

    eos_id: int
    pad_id: int
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    greedy: bool = False
    attention: str = "reference"  # decode-step attention: "reference" (XLA) or "pallas"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    tokens: jax.Array  # [batch, prompt + new]: the left-padded prompt, then the answer, then pad
    attention_mask: jax.Array  # [batch, prompt + new]: 1 on real prompt and answer tokens (EOS included)
    logprobs: jax.Array  # [batch, new]: log p_model(token) of each sampled token (temperature 1), 0 on pad
    steps: jax.Array  # number of decode steps run (the loop may stop early)


def generate(model, prompt_ids, prompt_mask, key, settings: SamplingSettings) -> Generation:
    """Samples up to `settings.max_new_tokens` tokens after each left-padded prompt row.

    model: a CausalLM (call it inside jit on merged state); prompt_ids, prompt_mask: [batch, prompt].
    Each row draws from its own key stream, so a row's sample does not depend on its batch mates.
    """
    if settings.attention == "pallas" and model.config.sliding_window is not None:
        raise ValueError("attention=pallas does not apply a sliding window; use attention=reference for "
                         f"{model.config.model_type} with sliding_window={model.config.sliding_window}")
    batch, prompt_len = prompt_ids.shape
    new = settings.max_new_tokens
    total = prompt_len + new
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_lengths = prompt_mask.sum(-1)  # [batch]
    cache = KVCache.zeros(model.config, batch, total)
    key_valid = jnp.concatenate([prompt_mask, jnp.zeros((batch, new), jnp.int32)], axis=1)
    row_keys = jax.random.split(key, batch)

    hidden, cache = model.decoder(prompt_ids, prompt_mask, positions_from_mask(prompt_mask), cache=cache,
                                  write_index=0, key_valid=key_valid)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [batch, vocab]

    def pick(logits, step, done):
        """Samples one token per row; rows already finished emit pad with log-prob 0."""
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        allowed = suppress_eos(logits, settings.eos_id, step, settings.min_new_tokens)
        token = sample_tokens(allowed, step_keys, temperature=settings.temperature, top_k=settings.top_k,
                              top_p=settings.top_p, greedy=settings.greedy)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], -1)[:, 0]
        token = jnp.where(done, settings.pad_id, token)
        return token, jnp.where(done, 0.0, logprob), done | (token == settings.eos_id)

    no_row_done = jnp.zeros((batch,), bool)
    first, first_logprob, done = pick(logits, 0, no_row_done)
    tokens = jnp.full((batch, new), settings.pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((batch, new), jnp.float32).at[:, 0].set(first_logprob)
    answer_mask = jnp.zeros((batch, new), jnp.int32).at[:, 0].set(1)
    kv_start = prompt_len - prompt_lengths  # first real slot of each row

    def keep_going(carry):
        step, *_, done = carry
        return (step < new) & ~jnp.all(done)

    def decode_step(carry):
        step, tokens, logprobs, answer_mask, key_valid, cache, done = carry
        slot = prompt_len + step - 1  # where the previous token's keys and values go
        key_valid = key_valid.at[:, slot].set(1)
        positions = (prompt_lengths + step - 1)[:, None]
        attention_fn = None
        if settings.attention == "pallas":
            kv_end = jnp.full((batch,), slot + 1, jnp.int32)
            interpret = jax.default_backend() == "cpu"  # Pallas runs on CPU only in interpret mode
            attention_fn = lambda q, k, v, mask: decode_attention(
                q[:, 0], k, v, kv_start, kv_end, implementation="pallas", interpret=interpret)[:, None]
        hidden, cache = model.decoder(tokens[:, step - 1][:, None], None, positions, cache=cache, write_index=slot,
                                      key_valid=key_valid, attention_fn=attention_fn)
        token, logprob, now_done = pick(model.logits(hidden)[:, 0], step, done)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(logprob)
        answer_mask = answer_mask.at[:, step].set((~done).astype(jnp.int32))
        return step + 1, tokens, logprobs, answer_mask, key_valid, cache, now_done

    carry = (jnp.int32(1), tokens, logprobs, answer_mask, key_valid, cache, done)
    steps, tokens, logprobs, answer_mask, *_ = jax.lax.while_loop(keep_going, decode_step, carry)
    return Generation(
        tokens=jnp.concatenate([prompt_ids.astype(jnp.int32), tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask, answer_mask], axis=1),
        logprobs=logprobs,
        steps=steps,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def generate_from_state(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids, prompt_mask, key,
                        settings: SamplingSettings) -> Generation:
    """`generate` as one jitted pure function of the model's split state."""
    return generate(nnx.merge(graphdef, state), prompt_ids, prompt_mask, key, settings)
