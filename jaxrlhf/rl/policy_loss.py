"""Token-level policy-loss pieces shared by every step-3 algorithm (PPO, GRPO, DAPO, RLOO, REINFORCE++).

Arrays follow `ppo_math`'s action layout: [batch, L], L = T - 1, `mask` 1 on answer actions. The
pieces return per-token values; `aggregate` turns them into the scalar loss, and with `totals`
from `loss_totals` of the whole batch a microbatch's loss is its exact share of the batch's, so
gradient accumulation by summing microbatch losses equals one step on the whole batch.

Everything is fp32 inside and jit-safe: string options are static Python values.
"""

import jax
import jax.numpy as jnp

from jaxrlhf.rl.ppo_math import kl_penalty

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")
ROLLOUT_CORRECTIONS = ("none", "tis", "mask")


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip=None):
    """PPO's clipped surrogate per token, with DAPO's asymmetric clip ("clip-higher", clip_high > clip_low).

    loss_t = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)); with dual_clip (Ye et
    al. 2020) tokens with A < 0 are further bounded: min(loss_t, dual_clip * |A|). The log-ratio is
    masked before exp, as `ppo_math.actor_loss`, so padding can't overflow.
    logprobs, old_logprobs, advantages, mask [B, L] -> (per_token [B, L], indicators): "clipfrac"
    (the clipped term wins), "approx_kl" ((ratio - 1) - log ratio), "ratio", and "dual_clipfrac"
    when dual_clip is set; each [B, L] float, neutral off the mask (ratio 1, the rest 0).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = jnp.asarray(mask, jnp.float32)
    advantages = jnp.asarray(advantages, jnp.float32)
    log_ratio = mask * (jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32))
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    indicators = {
        "clipfrac": (clipped > unclipped).astype(jnp.float32),
        "approx_kl": jnp.expm1(log_ratio) - log_ratio,
        "ratio": ratio,
    }
    if dual_clip is not None:
        dual_bound = -dual_clip * advantages  # = dual_clip * |A| where A < 0
        dual_active = (advantages < 0) & (per_token > dual_bound)
        per_token = jnp.where(dual_active, dual_bound, per_token)
        indicators["dual_clipfrac"] = dual_active.astype(jnp.float32)
    return per_token, indicators


def loss_totals(mask):
    """The denominators `aggregate` needs, for a whole batch: masked tokens, rows with any, and rows.

    mask [B, L] -> {"tokens", "sequences", "rows"}, float32 scalars.
    """
    mask = jnp.asarray(mask, jnp.float32)
    return {
        "tokens": jnp.sum(mask),
        "sequences": jnp.sum(jnp.sum(mask, axis=-1) > 0).astype(jnp.float32),
        "rows": jnp.asarray(mask.shape[0], jnp.float32),
    }


def aggregate(per_token, mask, mode, *, horizon, totals=None):
    """Reduce a per-token loss [B, L] to a scalar, with the named normalisation.

    "token_mean": sum over masked tokens / their number (DAPO; every token weighs the same).
    "sequence_mean": mean over rows with any masked token of that row's token mean (GRPO's original).
    "constant": sum over masked tokens / (rows * horizon), horizon = the maximum answer length
    (Dr. GRPO: no length bias). `totals` (from `loss_totals` of the whole batch) replaces this
    batch's denominators, so the losses of a batch's microbatches sum to the whole batch's loss.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation {mode!r} is not one of {AGGREGATIONS}")
    mask = jnp.asarray(mask, jnp.float32)
    totals = loss_totals(mask) if totals is None else totals
    masked = jnp.where(mask > 0, jnp.asarray(per_token, jnp.float32), 0.0) * mask  # [B, L]
    if mode == "token_mean":
        return jnp.sum(masked) / jnp.maximum(totals["tokens"], 1.0)
    if mode == "sequence_mean":
        row_means = jnp.sum(masked, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)  # [B], 0 for empty rows
        return jnp.sum(row_means) / jnp.maximum(totals["sequences"], 1.0)
    return jnp.sum(masked) / (jnp.maximum(totals["rows"], 1.0) * horizon)


def kl_loss(logprobs, ref_logprobs, estimator="k3"):
    """Per-token KL(policy || reference) as a loss term (GRPO adds beta * this; k3 is its default).

    logprobs, ref_logprobs [B, L] -> [B, L]; reduce it with `aggregate` and the mask.
    """
    return kl_penalty(logprobs, ref_logprobs, estimator=estimator)


def rollout_correction(train_logprobs, rollout_logprobs, mask, *, mode, cap):
    """Importance weights for the gap between the generation copy (e.g. bf16) and the training forward.

    ratio = exp(train - rollout) on masked tokens. "tis": weight = min(ratio, cap) (truncated
    importance sampling), touched where ratio > cap; "mask": weight 1 where 1/cap <= ratio <= cap,
    else 0 (touched); "none": weight 1. Weights carry no gradient and are 0 off the mask; the
    caller multiplies the per-token policy loss by them.
    train_logprobs, rollout_logprobs, mask [B, L] -> (weights [B, L], touched [B, L] float).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction {mode!r} is not one of {ROLLOUT_CORRECTIONS}")
    if mode != "none" and cap < 1.0:
        raise ValueError(f"rollout correction cap must be >= 1, got {cap}")
    mask = jnp.asarray(mask, jnp.float32)
    log_ratio = mask * (jnp.asarray(train_logprobs, jnp.float32) - jnp.asarray(rollout_logprobs, jnp.float32))
    ratio = jnp.exp(log_ratio)
    if mode == "tis":
        weights, touched = jnp.minimum(ratio, cap), ratio > cap
    elif mode == "mask":
        kept = (ratio >= 1.0 / cap) & (ratio <= cap)
        weights, touched = kept.astype(jnp.float32), ~kept
    else:
        weights, touched = jnp.ones_like(ratio), jnp.zeros_like(ratio, dtype=bool)
    weights = jax.lax.stop_gradient(weights * mask)
    return weights, touched.astype(jnp.float32) * mask
