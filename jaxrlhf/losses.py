"""Language-model losses shared by SFT and PPO's pretraining term (PTX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_logprobs(logits, input_ids):
    """log p(input_ids[:, t+1] | ... t) in float32: [batch, seq, vocab], [batch, seq] -> [batch, seq - 1]."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = input_ids[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def language_model_loss(model, batch):
    """Mean next-token negative log-likelihood over the tokens `loss_mask` marks (prompt tokens
    excluded unless the data says otherwise); packed rows carry positions and segment ids.
    Returns (loss, metrics)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("positions"), batch.get("segment_ids"))
    logprobs = next_token_logprobs(logits, batch["input_ids"])
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    tokens = mask.sum()
    loss = -(logprobs * mask).sum() / jnp.maximum(tokens, 1.0)
    return loss, {"tokens": tokens}
