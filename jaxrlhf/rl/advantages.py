"""Critic-free advantage estimators for step 3: GRPO (and Dr. GRPO), RLOO and REINFORCE++.

Sequence-level arrays are [batch] with rows grouped prompt-major: rows g*n ... g*n+n-1 are the
n samples of prompt g (batch = groups * n). `valid` [batch] (float 0/1) marks the rows that take
part; an invalid row (e.g. a dropped answer) is left out of every group or batch statistic and
gets advantage 0. Token-level arrays follow `ppo_math`'s action layout: [batch, L], L = T - 1,
with `mask` 1 on answer actions.

Everything is fp32 inside and jit-safe: string options are static Python values.
"""

import jax
import jax.numpy as jnp

from jaxrlhf.rl.ppo_math import masked_whiten

SCALE_REWARDS = ("group", "batch", "none")


def _grouped(x, n):
    """[batch] -> [groups, n] float32, checking that batch is a multiple of n."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 1 or x.shape[0] % n:
        raise ValueError(f"expected [groups * n] rows with n={n}, got shape {x.shape}")
    return x.reshape(-1, n)


def _group_stats(scores, valid):
    """Per-group valid count, mean and whether all valid scores are equal. [G, n] -> three [G, 1]."""
    count = jnp.sum(valid, axis=-1, keepdims=True)
    mean = jnp.sum(scores * valid, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    highest = jnp.max(jnp.where(valid > 0, scores, -jnp.inf), axis=-1, keepdims=True)
    lowest = jnp.min(jnp.where(valid > 0, scores, jnp.inf), axis=-1, keepdims=True)
    return count, mean, highest == lowest


def _unbiased_std(deviations, valid, count):
    """sqrt(sum(valid * deviation^2) / (count - 1)), ddof=1 as torch.std; 0 when count < 2."""
    squares = jnp.sum(valid * jnp.square(deviations), axis=-1, keepdims=True)
    return jnp.sqrt(squares / jnp.maximum(count - 1.0, 1.0))


def group_advantages(scores, valid, n, *, scale_rewards="group", eps=1e-6):
    """GRPO advantages: each score minus its group's valid mean, scaled by a std.

    scale_rewards: "group" divides by the group's std + eps (GRPO, Shao et al. 2024), "batch" by
    the std of all valid scores of the batch + eps (TRL's scale_rewards="batch"), "none" not at
    all (Dr. GRPO, Liu et al. 2025). Stds are unbiased (ddof=1) as torch.std in TRL. A group with
    fewer than 2 valid rows, or whose valid scores are all equal, gives 0: it carries no signal.
    scores, valid [batch] -> advantages [batch].
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of {SCALE_REWARDS}")
    scores, valid = _grouped(scores, n), _grouped(valid, n)  # [G, n]
    count, mean, all_equal = _group_stats(scores, valid)  # [G, 1] each
    deviations = scores - mean  # [G, n]
    if scale_rewards == "group":
        deviations = deviations / (_unbiased_std(deviations, valid, count) + eps)
    elif scale_rewards == "batch":
        flat_valid = valid.reshape(1, -1)
        flat_count = jnp.sum(flat_valid, keepdims=True)
        batch_mean = jnp.sum(scores * valid) / jnp.maximum(flat_count, 1.0)
        batch_std = _unbiased_std(scores.reshape(1, -1) - batch_mean, flat_valid, flat_count)  # [1, 1]
        deviations = deviations / (batch_std + eps)
    has_signal = (valid > 0) & (count >= 2) & ~all_equal  # [G, n]
    return jnp.where(has_signal, deviations, 0.0).reshape(-1)


def leave_one_out_advantages(rewards, valid, n):
    """RLOO advantages (Ahmadian et al. 2024): reward minus the mean of the other valid rows of its group.

    A group with fewer than 2 valid rows gives 0 (no baseline to compare with).
    rewards, valid [batch] -> advantages [batch].
    """
    rewards, valid = _grouped(rewards, n), _grouped(valid, n)  # [G, n]
    count = jnp.sum(valid, axis=-1, keepdims=True)  # [G, 1]
    total = jnp.sum(rewards * valid, axis=-1, keepdims=True)  # [G, 1]
    others_mean = (total - rewards) / jnp.maximum(count - 1.0, 1.0)  # [G, n]
    has_baseline = (valid > 0) & (count >= 2)
    return jnp.where(has_baseline, rewards - others_mean, 0.0).reshape(-1)


def group_mean_baseline(scores, valid, n):
    """Scores minus their group's valid mean, 0 for invalid rows.

    REINFORCE++ with a group baseline (OpenRLHF's "reinforce_baseline"): unlike GRPO, no std
    scaling here; the token-level batch normalisation comes later.
    scores, valid [batch] -> [batch].
    """
    scores, valid = _grouped(scores, n), _grouped(valid, n)  # [G, n]
    _, mean, _ = _group_stats(scores, valid)  # [G, 1]
    return jnp.where(valid > 0, scores - mean, 0.0).reshape(-1)


def reverse_cumulative_returns(token_rewards, mask, gamma=1.0):
    """Discounted return-to-go over the answer: return_t = sum_{s >= t, mask_s = 1} gamma^(s-t) r_s.

    A reverse scan over time (as `ppo_math.gae_advantages`), with rewards off the mask ignored and
    returns off the mask 0. As OpenRLHF's get_cumulative_returns, for the contiguous answer masks
    of a rollout. token_rewards, mask [B, L] -> returns [B, L].
    """
    rewards = jnp.asarray(token_rewards, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)

    def step(next_return, inputs):  # next_return [B]
        reward, valid = inputs
        running = valid * reward + gamma * next_return
        return running, valid * running

    init = jnp.zeros(rewards.shape[0], jnp.float32)
    _, returns = jax.lax.scan(step, init, (rewards.T, mask.T), reverse=True)  # [L, B]
    return returns.T


def batch_normalized_advantages(returns, mask):
    """REINFORCE++'s global normalisation: whiten over every masked token of the batch (mean 0, std 1).

    returns, mask [B, L] -> advantages [B, L], 0 off the mask.
    """
    return masked_whiten(returns, mask)


def broadcast_to_tokens(sequence_values, mask):
    """Give each row's value to every masked action of that row, 0 elsewhere. [B], [B, L] -> [B, L]."""
    values = jnp.asarray(sequence_values, jnp.float32)
    return jnp.where(jnp.asarray(mask) > 0, values[:, None], 0.0)
