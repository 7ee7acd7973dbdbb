"""Step-3 algorithms as data: what each needs (a critic? KL in the reward or in the loss?) and how
it turns rewards into advantages. One rollout, experience and update code serves them all; an
algorithm is a row of `ALGORITHMS` and an estimator of `ESTIMATORS`.

Estimators take the experience's arrays in `ppo_math`'s action layout ([batch, L], rows grouped
prompt-major: rows g*n .. g*n+n-1 answer prompt g) and return (advantages, returns); returns are
what a critic regresses on, None without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrlhf.rl.advantages import (
    batch_normalized_advantages,
    broadcast_to_tokens,
    group_advantages,
    group_mean_baseline,
    leave_one_out_advantages,
    reverse_cumulative_returns,
)
from jaxrlhf.rl.ppo_math import gae_advantages, masked_whiten, token_rewards


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    needs_critic: bool
    kl_in: str  # "reward": -kl_coef * KL per token in the reward; "loss": kl_coef * KL as a loss term
    estimator: str  # a key of ESTIMATORS
    min_samples_per_prompt: int
    paper: str


ALGORITHMS = {
    "ppo": Algorithm("ppo", True, "reward", "gae", 1, "Ouyang et al. 2022 (InstructGPT); DeepSpeed-Chat"),
    "grpo": Algorithm("grpo", False, "loss", "group", 2, "Shao et al. 2024 (DeepSeekMath); DAPO; Dr. GRPO"),
    "rloo": Algorithm("rloo", False, "reward", "leave_one_out", 2, "Ahmadian et al. 2024"),
    "reinforce_pp": Algorithm("reinforce_pp", False, "reward", "batch_normalized", 1, "Hu 2025 (REINFORCE++)"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EstimatorInputs:
    """What an estimator may read of one batch of experience."""

    scores: jax.Array  # [batch] the answers' scores (reward model and/or functions), shaped and clipped
    kl: jax.Array  # [batch, L] per-token KL estimate to the reference (0 without one)
    action_mask: jax.Array  # [batch, L] answer actions of kept rows
    span_mask: jax.Array  # [batch, L] actions that carry reward (answer, plus DS-Chat's extra slot)
    values: jax.Array | None  # [batch, L] critic values at rollout time, None without a critic
    kept: jax.Array  # [batch] rows that take part
    kl_coef: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class EstimatorSettings:
    """The static part: PPOConfig's fields of the same names."""

    samples_per_prompt: int
    score_position: str
    gamma: float
    lam: float
    whiten_advantages: bool
    scale_rewards: str
    group_baseline: bool

    @classmethod
    def from_config(cls, ppo) -> EstimatorSettings:
        return cls(**{field.name: getattr(ppo, field.name) for field in dataclasses.fields(cls)})


def kl_shaped_rewards(inputs: EstimatorInputs, scores, settings: EstimatorSettings):
    """Per-token rewards: the KL penalty on every answer action plus the score at one position."""
    return token_rewards(
        inputs.kl,
        scores,
        inputs.action_mask,
        kl_coef=inputs.kl_coef,
        clip_reward_value=jnp.inf,  # scores arrive clipped
        score_position=settings.score_position,
    )


def gae(inputs: EstimatorInputs, settings: EstimatorSettings):
    """PPO: KL-shaped token rewards, GAE against the critic, optionally whitened."""
    rewards = kl_shaped_rewards(inputs, inputs.scores, settings)
    advantages, returns = gae_advantages(
        rewards, inputs.values, inputs.span_mask, gamma=settings.gamma, lam=settings.lam
    )
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, inputs.action_mask)
    return advantages, returns


def group(inputs: EstimatorInputs, settings: EstimatorSettings):
    """GRPO: each answer's score against its group's, scaled by the group's (or batch's) std."""
    advantage = group_advantages(
        inputs.scores, inputs.kept, settings.samples_per_prompt, scale_rewards=settings.scale_rewards
    )
    return broadcast_to_tokens(advantage, inputs.action_mask), None


def leave_one_out(inputs: EstimatorInputs, settings: EstimatorSettings):
    """RLOO: the sequence reward (score - kl_coef * summed KL) against the mean of the group's others."""
    sequence_kl = (inputs.kl * inputs.action_mask).sum(-1)
    rewards = inputs.scores - inputs.kl_coef * sequence_kl
    advantage = leave_one_out_advantages(rewards, inputs.kept, settings.samples_per_prompt)
    return broadcast_to_tokens(advantage, inputs.action_mask), None


def batch_normalized(inputs: EstimatorInputs, settings: EstimatorSettings):
    """REINFORCE++: KL-shaped token rewards summed to go, normalised over the whole batch; with a
    group baseline, each prompt's mean score is subtracted first."""
    scores = inputs.scores
    if settings.group_baseline:
        scores = group_mean_baseline(scores, inputs.kept, settings.samples_per_prompt)
    rewards = kl_shaped_rewards(inputs, scores, settings)
    returns = reverse_cumulative_returns(rewards, inputs.span_mask, gamma=settings.gamma)
    return batch_normalized_advantages(returns, inputs.action_mask), None


ESTIMATORS: dict[str, Callable] = {
    "gae": gae,
    "group": group,
    "leave_one_out": leave_one_out,
    "batch_normalized": batch_normalized,
}
