"""Turning rollouts into PPO experience: log-probs, values, scores, rewards and advantages.

One jitted pure function over the four roles' states, in the training layout. Array convention
as in `jaxrlhf.rl.ppo_math`: per-token arrays have length T - 1 and index t is the action that
emits token t + 1; the answer starts at action P - 1 for a prompt of (padded) length P.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.models.outputs import sequence_scores
from jaxrlhf.rl.ppo_math import gae_advantages, kl_penalty, masked_mean, masked_whiten, reward_span_mask, token_rewards
from jaxrlhf.rl.roles import RoleGraphs, RoleStates


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Experience:
    tokens: jax.Array  # [batch, T] prompt + answer
    attention_mask: jax.Array  # [batch, T]
    action_mask: jax.Array  # [batch, T-1] 1 on answer actions of kept rows
    span_mask: jax.Array  # [batch, T-1] actions that carry reward (the answer, plus DS-Chat's extra slot)
    old_logprobs: jax.Array  # [batch, T-1] actor log-probs at rollout time
    ref_logprobs: jax.Array  # [batch, T-1]
    old_values: jax.Array  # [batch, T-1] critic values at rollout time
    advantages: jax.Array  # [batch, T-1]
    returns: jax.Array  # [batch, T-1]
    scores: jax.Array  # [batch] reward-model score of each answer (before clipping)
    kept: jax.Array  # [batch] 1 for rows that take part (answers longer than one token, by default)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardSettings:
    """The static part of the reward and advantage computation."""

    kl_estimator: str
    clip_reward_value: float
    score_position: str
    gamma: float
    lam: float
    whiten_advantages: bool
    short_answer: str  # "drop" or "penalize"
    short_answer_penalty: float

    @classmethod
    def from_config(cls, ppo) -> RewardSettings:
        """The fields of the same names in a PPOConfig."""
        return cls(**{field.name: getattr(ppo, field.name) for field in dataclasses.fields(cls)})


def answer_action_mask(attention_mask, prompt_len: int):
    """[batch, T] -> [batch, T-1]: 1 on the actions that emit answer tokens."""
    actions = attention_mask[:, 1:]
    return actions * (jnp.arange(actions.shape[1]) >= prompt_len - 1)


def make_experience(
    actor, reference, critic, reward_model, tokens, attention_mask, prompt_len: int, kl_coef, settings: RewardSettings
) -> tuple[Experience, dict]:
    """Scores a batch of rollouts with the four models (NNX modules, merged inside jit)."""
    action_mask = answer_action_mask(attention_mask, prompt_len).astype(jnp.float32)
    answer_lengths = action_mask.sum(-1)
    long_enough = answer_lengths > 1  # DeepSpeed-Chat drops answers of one token or less

    old_logprobs, _ = actor.token_logprobs(tokens, attention_mask)
    ref_logprobs, _ = reference.token_logprobs(tokens, attention_mask)
    old_values = critic(tokens, attention_mask)[:, :-1]
    scores = sequence_scores(reward_model(tokens, attention_mask), attention_mask)

    if settings.short_answer == "drop":
        kept = long_enough.astype(jnp.float32)
    else:
        kept = jnp.ones_like(answer_lengths)
        scores = jnp.where(long_enough, scores, settings.short_answer_penalty)
    action_mask = action_mask * kept[:, None]
    # a dropped row has no answer actions, and no score slot either
    span_mask = reward_span_mask(action_mask, score_position=settings.score_position) * kept[:, None]
    kl = kl_penalty(old_logprobs, ref_logprobs, settings.kl_estimator)
    rewards = token_rewards(
        kl,
        scores,
        action_mask,
        kl_coef=kl_coef,
        clip_reward_value=settings.clip_reward_value,
        score_position=settings.score_position,
    )
    advantages, returns = gae_advantages(rewards, old_values, span_mask, gamma=settings.gamma, lam=settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, action_mask)

    sequence_kl = ((old_logprobs - ref_logprobs) * action_mask).sum(-1)  # k1 summed over the answer
    rows = jnp.maximum(kept.sum(), 1.0)
    stats = {
        "score": (scores * kept).sum() / rows,
        "reward": ((rewards * span_mask).sum(-1) * kept).sum() / rows,
        "kl": (sequence_kl * kept).sum() / rows,
        "kl_coef": kl_coef,
        "answer_length": (answer_lengths * kept).sum() / rows,
        "kept_fraction": kept.mean(),
        "advantage_mean": masked_mean(advantages, action_mask),
        "value_mean": masked_mean(old_values, action_mask),
        "return_mean": masked_mean(returns, action_mask),
    }
    experience = Experience(
        tokens=tokens,
        attention_mask=attention_mask,
        action_mask=action_mask,
        span_mask=span_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        old_values=old_values,
        advantages=advantages,
        returns=returns,
        scores=scores,
        kept=kept,
    )
    return experience, stats


def make_experience_fn(graphs: RoleGraphs, settings: RewardSettings, prompt_len: int):
    """A jitted `(states: RoleStates, tokens, attention_mask, kl_coef) -> (Experience, stats)`."""

    @jax.jit
    def experience_fn(states: RoleStates, tokens, attention_mask, kl_coef):
        return make_experience(
            states.actor.model(graphs.actor),
            states.reference.model(graphs.reference),
            states.critic.model(graphs.critic),
            states.reward_model.model(graphs.reward_model),
            tokens,
            attention_mask,
            prompt_len,
            kl_coef,
            settings,
        )

    return experience_fn
