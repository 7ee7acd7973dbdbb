"""PPO math for RLHF step 3 as small pure JAX functions: KL, rewards, GAE, losses.

Array convention ("action" arrays, aligned with log-probs)
----------------------------------------------------------
A rollout is a full sequence of length T: a left-padded prompt of length P
followed by the generated answer (right-padded). Every per-token array here has
length L = T - 1 and index t describes the action "emit token t+1":

    logprobs[:, t]    = log p(tokens[:, t+1] | tokens[:, :t+1])   # [batch, T-1]
    values[:, t]      = critic value at position t                # [batch, T-1]
    action_mask[:, t] = attention_mask[:, t+1] if t >= P-1 else 0  # [batch, T-1]

So the first answer token is action P-1. Build log-probs with
`jaxrlhf.models.outputs.next_token_logprobs(logits, tokens)`.

Everything is fp32 inside, takes hyper-parameters as keyword arguments, and is
safe to call under `jax.jit` (string options are Python-level and static).

DeepSpeed-Chat (dschat/rlhf/ppo_trainer.py) differences, all documented where
they matter: its KL term is never masked (prompt positions carry KL too, but its
GAE starts at the first answer action so they are never read), and it adds the
score one position after the last answer token (`score_position="after_last"`).
"""

import jax
import jax.numpy as jnp

from jaxrlhf.models.outputs import last_token_index

KL_ESTIMATORS = ("k1", "k2", "k3")
SCORE_POSITIONS = ("last_token", "after_last")


def masked_mean(x, mask, axis=None):
    """Mean of `x` over entries where mask is 1: sum(x * mask) / sum(mask).

    This is DeepSpeed-Chat's reduction; an all-zero mask gives 0, not NaN.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask):
    """Population (biased, divide by N) variance of `x` over masked entries."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(jnp.asarray(x, jnp.float32) - mean), mask)


def masked_whiten(x, mask, shift_mean=True):
    """Normalise masked entries to std 1 (and mean 0 when shift_mean); masked-out entries become 0.

    Uses the population variance, so the whitened masked entries have exactly
    mean 0 and std 1 under `masked_mean` / `masked_var`. With shift_mean=False
    the original mean is kept and only the scale changes (as TRL does).
    """
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(jnp.asarray(mask) > 0, whitened, 0.0)


def kl_penalty(logprobs, ref_logprobs, estimator="k1"):
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    k1 = logp - ref (unbiased, can be negative; DeepSpeed-Chat's),
    k2 = 0.5 * (logp - ref)^2, k3 = (r - 1) - log r with r = exp(ref - logp)
    (unbiased and non-negative; Schulman's "Approximating KL divergence").
    """
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * jnp.square(log_ratio)
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def _score_index(action_mask, score_position):
    """Action index that receives the sequence score, per row. [B, L] -> [B] int32."""
    length = action_mask.shape[-1]
    is_action = jnp.asarray(action_mask) > 0
    if score_position == "last_token":
        return last_token_index(is_action)
    if score_position == "after_last":
        # DeepSpeed-Chat: ends = start + mask[:, start:].sum(1) + 1 and the score
        # goes to rewards[start:ends][-1]; the slice clamps at the array end.
        start = jnp.argmax(is_action, axis=-1)
        return jnp.minimum(start + jnp.sum(is_action, axis=-1), length - 1)
    raise ValueError(f"score_position {score_position!r} is not one of {SCORE_POSITIONS}")


def reward_span_mask(action_mask, *, score_position):
    """Positions that carry reward and advantage: the answer actions plus the score position.

    For "last_token" this is the action mask itself. For "after_last" it also
    covers the position after the answer, as DeepSpeed-Chat's GAE does (it
    zeroes rewards and values only from `ends` on). Pass it to `gae_advantages`.
    """
    length = action_mask.shape[-1]
    score_at = jax.nn.one_hot(_score_index(action_mask, score_position), length)
    return jnp.maximum(jnp.asarray(action_mask, jnp.float32), score_at)


def token_rewards(kl, score, action_mask, *, kl_coef, clip_reward_value, score_position="last_token"):
    """Per-token rewards: -kl_coef * kl on the reward span plus the clipped score at one position.

    kl, action_mask [B, L]; score [B] -> rewards [B, L], zero outside
    `reward_span_mask`. With score_position="after_last" and kl from
    `kl_penalty(..., "k1")` this equals DeepSpeed-Chat's `compute_rewards` after
    its `old_rewards[i, ends[i]:] = 0`, on every position its GAE reads (from the
    first answer action on): the score sits one past the last answer token (or on
    the last position when the answer fills the sequence) and that position keeps
    its own KL term. DeepSpeed-Chat also leaves KL on prompt positions; we zero it,
    which changes nothing it uses. Older DeepSpeed-Chat (training/step3_...)
    used `ends = start + mask.sum()`, i.e. score_position="last_token".
    """
    length = action_mask.shape[-1]
    span = reward_span_mask(action_mask, score_position=score_position)
    clipped_score = jnp.clip(jnp.asarray(score, jnp.float32), -clip_reward_value, clip_reward_value)
    score_at = jax.nn.one_hot(_score_index(action_mask, score_position), length)  # [B, L]
    rewards = -kl_coef * jnp.asarray(kl, jnp.float32) + clipped_score[:, None] * score_at
    return jnp.where(span > 0, rewards, 0.0)


def gae_advantages(rewards, values, mask, *, gamma, lam):
    """Generalised advantage estimation as a reverse scan over time.

    rewards, values, mask [B, L] -> (advantages, returns), both [B, L].
    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1},
    where a masked-out position (mask 0) ends the episode: it has A = 0, and the
    position before it bootstraps from neither its value nor its advantage.
    returns = advantages + values on the mask, 0 elsewhere.

    With mask = `reward_span_mask(action_mask, score_position="after_last")` this
    is exactly DeepSpeed-Chat's `get_advantages_and_returns` (which loops over all
    positions from the first answer action with no mask, after zeroing rewards
    and values from `ends` on): beyond the span both give 0.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)

    def step(carry, inputs):
        next_value, next_advantage = carry  # [B] each, already 0 past the episode end
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = valid * (delta + gamma * lam * next_advantage)
        return (valid * value, advantage), advantage

    batch = rewards.shape[0]
    init = (jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.float32))
    time_major = (rewards.T, values.T, mask.T)  # [L, B] each
    _, advantages = jax.lax.scan(step, init, time_major, reverse=True)
    advantages = advantages.T  # [B, L]
    returns = mask * (advantages + values)
    return advantages, returns


def actor_loss(logprobs, old_logprobs, advantages, mask, *, cliprange, dual_clip=None):
    """PPO clipped surrogate loss, masked mean over tokens, optional dual clip.

    loss_t = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); with dual_clip
    (Ye et al. 2020) tokens with A < 0 are further bounded: min(loss_t, dual_clip * |A|).
    As in DeepSpeed-Chat the log-ratio is masked before exp, so padding can't overflow.
    Returns (loss, stats): clipfrac (share of tokens where the clipped term wins),
    approx_kl (k3 estimate of KL(old || new), i.e. mean of (ratio - 1) - log ratio),
    ratio_mean; plus dual_clipfrac when dual_clip is set.
    """
    from jaxrlhf.rl.policy_loss import clipped_surrogate  # the one implementation (it imports this module)

    mask = jnp.asarray(mask, jnp.float32)
    per_token, indicators = clipped_surrogate(
        logprobs, old_logprobs, advantages, mask, clip_low=cliprange, clip_high=cliprange, dual_clip=dual_clip
    )
    names = {"clipfrac": "clipfrac", "approx_kl": "approx_kl", "ratio": "ratio_mean", "dual_clipfrac": "dual_clipfrac"}
    stats = {names[name]: masked_mean(value, mask) for name, value in indicators.items()}
    return masked_mean(per_token, mask), stats


def value_loss(values, old_values, returns, mask, *, cliprange_value, token_count=None):
    """Clipped critic loss exactly as DeepSpeed-Chat: 0.5 * masked_mean(max((v-R)^2, (clip(v)-R)^2)).

    clip(v) keeps v within old_values +- cliprange_value. Returns (loss, stats):
    value_clipfrac (share of tokens where the clipped term wins) and
    explained_variance = 1 - Var(R - v) / Var(R) over masked tokens. `token_count`, the whole
    batch's number of masked tokens, makes a microbatch's loss and stats its share of the batch's
    (they then add up over microbatches; explained_variance as a token-weighted mean).
    """
    values = jnp.asarray(values, jnp.float32)
    old_values = jnp.asarray(old_values, jnp.float32)
    returns = jnp.asarray(returns, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    clipped_values = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    share = 1.0 if token_count is None else mask.sum() / jnp.maximum(token_count, 1.0)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask) * share
    explained = 1.0 - masked_var(returns - values, mask) / (masked_var(returns, mask) + 1e-8)
    stats = {
        "value_clipfrac": masked_mean(clipped_error > unclipped_error, mask) * share,
        "explained_variance": explained * share,
    }
    return loss, stats


def adaptive_kl_update(kl_coef, observed_kl, n_steps, *, target, horizon):
    """Ziegler et al. 2019 proportional KL controller, as a pure state update.

    error = clip(observed_kl / target - 1, -0.2, 0.2); returns
    kl_coef * (1 + error * n_steps / horizon). observed_kl is the batch mean of
    the per-sequence (summed over tokens) KL; n_steps is the number of rollouts
    since the last update (Ziegler: the batch size).
    """
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(kl_coef, jnp.float32) * (1.0 + error * n_steps / horizon)


def logprob_agreement(rollout_logprobs, old_logprobs, attention_mask, prompt_len: int, *, tolerance: float = 1e-3):
    """How far the log-probs recorded while generating ([batch, new], the generation layout) are
    from the training forward's for the same tokens before any update (`old_logprobs`
    [batch, T-1]: token t + 1 given tokens <= t): mean and max absolute difference over the answer
    tokens, and the share above `tolerance`. One model code for both: expected at rounding level."""
    new = rollout_logprobs.shape[1]
    answer = attention_mask[:, prompt_len : prompt_len + new].astype(jnp.float32)  # answer tokens, EOS included
    training = old_logprobs[:, prompt_len - 1 : prompt_len - 1 + new]
    gap = jnp.abs(rollout_logprobs - training) * answer
    return {
        "logprob_gap_mean": masked_mean(gap, answer),
        "logprob_gap_max": gap.max(),
        "logprob_gap_share_over_1e-3": masked_mean((gap > tolerance).astype(jnp.float32), answer),
    }
