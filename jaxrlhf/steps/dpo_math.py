"""Direct preference optimization: the loss on sequence log-probs of a preference pair.

Rafailov et al. 2023 (DPO): with the implicit reward r(y) = beta * (log pi(y|x) - log ref(y|x)),
the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)); label smoothing eps (conservative
DPO, Mitchell 2023) mixes in the flipped pair: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z).
Azar et al. 2023 (IPO): the squared distance of the log-ratio margin to 1 / (2 beta), on log-probs
averaged over each answer's tokens (as the IPO paper and TRL do), which does not saturate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSSES = ("sigmoid", "ipo")


def preference_loss(
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """Sequence log-probs [pairs] of each side under the policy and the frozen reference ->
    (mean loss, metrics). For kind="ipo" pass log-probs averaged over the answer's tokens."""
    if kind not in DPO_LOSSES:
        raise ValueError(f"dpo loss must be one of {DPO_LOSSES}, got {kind!r}")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    margin = chosen_ratio - rejected_ratio  # the log-ratio margin h
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * margin) - label_smoothing * jax.nn.log_sigmoid(
            -beta * margin
        )
    else:
        losses = jnp.square(margin - 1 / (2 * beta))
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    return losses.mean(), {
        # a tie (as at the start, where the policy is its reference) counts half
        "accuracy": jnp.where(chosen_reward == rejected_reward, 0.5, chosen_reward > rejected_reward).mean(),
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
        "margin": (chosen_reward - rejected_reward).mean(),
    }
