"""Pick the next token from the logits: greedy, or temperature / top-k / top-p sampling.

Every row draws with its own PRNG key (`keys` is a batch of keys, e.g. `jax.random.split(key, batch)`),
so a row's token depends only on its logits and its key, never on which other rows share the batch.
All shapes are static and the filters are masks, so the functions jit; the sampling settings are
Python constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to filtered-out tokens: finite, so no -inf arithmetic can make a NaN.
MASKED_LOGIT = -1e9


def _check_settings(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a one-line error naming the first out-of-range sampling setting."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 turns top-k off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 turns top-p off)")


def filtered_logits(logits, *, temperature: float, top_k: int, top_p: float):
    """Temperature-scaled float32 logits with everything outside top-k and the nucleus masked.

    logits: [batch, vocab]. Top-p keeps the smallest set of highest-probability tokens whose mass
    (after top-k) reaches top_p, so the top token always stays. Ties at a cut-off are all kept.
    """
    _check_settings(temperature, top_k, top_p)
    logits = logits.astype(jnp.float32)
    # Shift so the row maximum is 0 before dividing: huge bf16 logits cannot overflow to +inf,
    # and anything that underflows is clamped to the finite mask value.
    logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    logits = jnp.maximum(logits, MASKED_LOGIT)  # [batch, vocab]

    vocab = logits.shape[-1]
    if 0 < top_k < vocab or top_p < 1:
        sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [batch, vocab], descending
    if 0 < top_k < vocab:
        kth_largest = sorted_logits[:, top_k - 1 : top_k]  # [batch, 1]
        logits = jnp.where(logits < kth_largest, MASKED_LOGIT, logits)
        sorted_logits = sorted_logits.at[:, top_k:].set(MASKED_LOGIT)
    if top_p < 1:
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of strictly higher ranks
        nucleus_size = (mass_above < top_p).sum(axis=-1, keepdims=True)  # [batch, 1], >= 1
        smallest_kept = jnp.take_along_axis(sorted_logits, nucleus_size - 1, axis=-1)  # [batch, 1]
        logits = jnp.where(logits < smallest_kept, MASKED_LOGIT, logits)
    return logits


def sample_tokens(logits, keys, *, temperature: float, top_k: int = 0, top_p: float = 1.0, greedy: bool = False):
    """Next token per row: argmax when greedy or temperature == 0, else a draw from the filtered softmax.

    logits: [batch, vocab], any float dtype; keys: [batch] PRNG keys, one per row.
    Returns int32 [batch].
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {logits.shape}")
    if greedy or temperature == 0:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    if keys.shape[0] != logits.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but logits has {logits.shape[0]}: pass one key per row")
    logits = filtered_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def suppress_eos(logits, eos_id: int, step, min_new_tokens: int):
    """Make EOS unpickable while step < min_new_tokens, so every answer gets at least that many tokens.

    logits: [batch, vocab]; step: the number of tokens generated so far (may be traced).
    """
    vocab = logits.shape[-1]
    if not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab})")
    very_negative = jnp.finfo(logits.dtype).min  # finite in the logits' own dtype, even float16
    eos_logit = jnp.where(step < min_new_tokens, very_negative, logits[:, eos_id])
    return logits.at[:, eos_id].set(eos_logit)
