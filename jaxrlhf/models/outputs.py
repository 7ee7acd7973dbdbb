"""Reading a model's outputs: next-token log-probs (and entropies) from logits, one score per sequence from values.

The language-model head is the largest activation of a training step: float32 logits are
[batch, seq, vocab] (a 128k vocabulary at 4 x 8192 tokens: 16 GiB). `chunked_token_logprobs`
never holds more than one chunk of them: the sequence is walked in chunks whose logits are
made, reduced to log-probs and entropies, and dropped, and remade in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Float32 logit elements one chunk may hold (256 MiB); a sequence that fits is one chunk.
LOGITS_CHUNK_ELEMENTS = 2**26


def logprobs_and_entropy(logits, targets):
    """log p(target) and the entropy of softmax(logits), float32: [..., vocab], [...] -> [...], [...].

    The gathered logit minus logsumexp: no [..., vocab] log-probabilities are materialized."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - log_normalizer[..., None])
    entropy = log_normalizer - jnp.sum(probs * logits, axis=-1)
    return picked - log_normalizer, entropy


def next_token_logprobs(logits, input_ids):
    """log p(input_ids[:, t+1] | ... t) in float32: [batch, seq, vocab], [batch, seq] -> [batch, seq - 1]."""
    return logprobs_and_entropy(logits[:, :-1], input_ids[:, 1:])[0]


def chunked_token_logprobs(logits_fn, hidden, targets, chunk_elements: int = LOGITS_CHUNK_ELEMENTS):
    """(log-probs, entropies) [batch, seq] of `targets` under `logits_fn(hidden)`, one sequence chunk
    at a time. hidden: [batch, seq, embed]; targets: [batch, seq] (the next tokens)."""
    batch, seq = targets.shape
    vocab = jax.eval_shape(logits_fn, hidden[:, :1]).shape[-1]
    chunk = max(1, min(seq, chunk_elements // max(batch * vocab, 1)))
    if chunk >= seq:  # it fits: one pass, as plain as it gets
        return logprobs_and_entropy(logits_fn(hidden), targets)
    chunks = -(-seq // chunk)
    pad = chunks * chunk - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, chunks, chunk, -1).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward pass remakes a chunk's logits instead of keeping them all
    def one_chunk(inputs):
        hidden_chunk, target_chunk = inputs
        return logprobs_and_entropy(logits_fn(hidden_chunk), target_chunk)

    logprobs, entropy = jax.lax.map(one_chunk, (hidden, targets))  # [chunks, batch, chunk] each
    unchunk = lambda x: x.swapaxes(0, 1).reshape(batch, chunks * chunk)[:, :seq]
    return unchunk(logprobs), unchunk(entropy)


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
