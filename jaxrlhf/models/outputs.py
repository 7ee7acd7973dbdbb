"""Reading a model's outputs: next-token log-probs from logits, one score per sequence from values."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_logprobs(logits, input_ids):
    """log p(input_ids[:, t+1] | ... t) in float32: [batch, seq, vocab], [batch, seq] -> [batch, seq - 1].

    The gathered logit minus logsumexp: no [batch, seq, vocab] log-probabilities are materialized.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def last_token_index(mask):
    """Index of the last 1 in each row, whatever the padding side. [batch, T] -> [batch] int32.

    A row with no 1 at all gives T - 1.
    """
    seq_len = mask.shape[-1]
    return seq_len - 1 - jnp.argmax(jnp.asarray(mask)[:, ::-1] > 0, axis=-1)


def sequence_scores(values, attention_mask):
    """Per-sequence score: the value at the last real token. values, attention_mask [batch, T] -> [batch]."""
    index = last_token_index(attention_mask)
    return jnp.take_along_axis(jnp.asarray(values, jnp.float32), index[:, None], axis=-1)[:, 0]
