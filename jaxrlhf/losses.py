"""The supervised losses as pure JAX functions: the language-model loss (step 1, and PPO's
pretraining term) and the reward model's pairwise losses (step 2).

Two reward losses over a batch of (chosen, rejected) pairs scored per token by the
reward model's value head:

* `pairwise_loss_final_token`: Bradley-Terry on one score per sequence (the
  value at its last real token, see `sequence_scores`); our default.
* `pairwise_loss_deepspeed_chat`: DeepSpeed-Chat's RewardModel.forward loss
  (dschat/utils/model/reward_model.py), which averages the per-token
  Bradley-Terry loss over the span where the two answers differ.

All inputs are cast to fp32; shapes are static, so everything jit-compiles.
"""

import jax
import jax.numpy as jnp

from jaxrlhf.models.outputs import last_token_index
from jaxrlhf.train_state import WholeBatchMean


def _language_model_loss(model, batch, totals):
    """Next-token negative log-likelihood summed over the tokens `loss_mask` marks (prompt tokens
    excluded unless the data says otherwise), over the whole batch's count of them; packed rows
    carry positions and segment ids. Returns (loss, metrics)."""
    logprobs, _ = model.token_logprobs(
        batch["input_ids"], batch["attention_mask"], batch.get("positions"), batch.get("segment_ids")
    )
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    loss = -(logprobs * mask).sum() / jnp.maximum(totals["tokens"], 1.0)
    return loss, {"tokens": mask.sum()}


def target_tokens(batch) -> dict:
    return {"tokens": batch["loss_mask"][:, 1:].astype(jnp.float32).sum()}


# The mean over every target token of the batch, however it is split into microbatches.
language_model_loss = WholeBatchMean(_language_model_loss, target_tokens)


def pairwise_loss_final_token(chosen_scores, rejected_scores, *, centering_coef=0.0):
    """Bradley-Terry loss mean(-log sigmoid(c - r)) plus optional reward centering.

    centering_coef * mean((c + r)^2) pulls the scores of each pair towards
    zero sum (Eisenstein et al. 2023, "Helping or Herding?"), which keeps the
    otherwise shift-invariant scores anchored. chosen/rejected_scores [B] -> scalar.
    """
    chosen = jnp.asarray(chosen_scores, jnp.float32)
    rejected = jnp.asarray(rejected_scores, jnp.float32)
    loss = jnp.mean(-jax.nn.log_sigmoid(chosen - rejected))
    return loss + centering_coef * jnp.mean(jnp.square(chosen + rejected))


def pairwise_loss_deepspeed_chat(chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask):
    """DeepSpeed-Chat's reward loss: per pair, mean of -log sigmoid(c_t - r_t) over the divergent span.

    All inputs [B, T]. For each pair the span runs from the first position where
    the ids differ up to the end of the longer sequence; then the loss is the
    mean over pairs. Returns (loss, chosen_scores, rejected_scores), the scores
    being each sequence's value at its own last real token (DeepSpeed-Chat's
    `chosen_mean_scores[c_ind - 1]`), used for its accuracy metric.

    DeepSpeed-Chat finds a sequence's end as its first pad id (with
    num_padding_at_beginning=0); we take it from the mask (last 1 + 1), which is
    the same for right-padded inputs and needs no pad id. Positions are compared
    index by index, so a shared prefix is only skipped when it sits at the same
    indices: always with right padding (DeepSpeed-Chat's step-2 data), with left
    padding only when both rows have the same amount of padding. A pair with
    identical ids is scored, as in DeepSpeed-Chat, on the last position T - 1
    alone (so it contributes log 2 when the values agree).
    """
    chosen_values = jnp.asarray(chosen_values, jnp.float32)
    rejected_values = jnp.asarray(rejected_values, jnp.float32)
    seq_len = chosen_ids.shape[-1]
    positions = jnp.arange(seq_len)[None, :]  # [1, T]

    differs = chosen_ids != rejected_ids  # [B, T]
    diverges = jnp.any(differs, axis=-1)  # [B]
    chosen_end = last_token_index(chosen_mask) + 1  # [B], exclusive
    rejected_end = last_token_index(rejected_mask) + 1
    span_start = jnp.where(diverges, jnp.argmax(differs, axis=-1), seq_len - 1)
    span_end = jnp.where(diverges, jnp.maximum(chosen_end, rejected_end), seq_len)
    span = (positions >= span_start[:, None]) & (positions < span_end[:, None])  # [B, T]

    token_losses = -jax.nn.log_sigmoid(chosen_values - rejected_values)  # [B, T]
    pair_losses = jnp.sum(jnp.where(span, token_losses, 0.0), axis=-1) / jnp.sum(span, axis=-1)
    chosen_scores = jnp.take_along_axis(chosen_values, chosen_end[:, None] - 1, axis=-1)[:, 0]
    rejected_score_end = jnp.where(diverges, rejected_end, chosen_end)  # DeepSpeed-Chat: r_ind = c_ind
    rejected_scores = jnp.take_along_axis(rejected_values, rejected_score_end[:, None] - 1, axis=-1)[:, 0]
    return jnp.mean(pair_losses), chosen_scores, rejected_scores


def pairwise_accuracy(chosen_scores, rejected_scores):
    """Share of pairs where the chosen score is strictly higher (DeepSpeed-Chat's eval accuracy)."""
    return jnp.mean((jnp.asarray(chosen_scores) > jnp.asarray(rejected_scores)).astype(jnp.float32))
