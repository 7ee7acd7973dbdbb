"""Turning rollouts into experience: log-probs, scores, rewards and advantages, for every algorithm.

One jitted pure function over the roles' states, in the training layout. Array convention as in
`jaxrlhf.rl.ppo_math`: per-token arrays have length T - 1 and index t is the action that emits
token t + 1; the answer starts at action P - 1 for a prompt of (padded) length P. Rows are grouped
prompt-major (rows g*n .. g*n+n-1 answer prompt g). Roles an algorithm does without (the critic,
the reference when kl_coef is 0, the reward model under reward functions alone) are None.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf.models.outputs import sequence_scores
from jaxrlhf.rl.algorithms import ALGORITHMS, ESTIMATORS, EstimatorInputs, EstimatorSettings
from jaxrlhf.rl.policy_loss import rollout_correction
from jaxrlhf.rl.ppo_math import kl_penalty, logprob_agreement, masked_mean, reward_span_mask
from jaxrlhf.rl.roles import RoleGraphs, RoleStates


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Experience:
    tokens: jax.Array  # [batch, T] prompt + answer
    attention_mask: jax.Array  # [batch, T]
    action_mask: jax.Array  # [batch, T-1] 1 on answer actions of kept rows
    span_mask: jax.Array  # [batch, T-1] actions that carry reward (the answer, plus DS-Chat's extra slot)
    old_logprobs: jax.Array  # [batch, T-1] actor log-probs at rollout time (the training forward)
    ref_logprobs: jax.Array  # [batch, T-1] (= old_logprobs without a reference)
    correction: jax.Array  # [batch, T-1] rollout-correction weight of each action (the action mask when off)
    advantages: jax.Array  # [batch, T-1]
    scores: jax.Array  # [batch] the training reward of each answer (model and/or functions), before shaping
    kept: jax.Array  # [batch] 1 for rows that take part
    old_values: jax.Array | None = None  # [batch, T-1] critic values at rollout time (None without a critic)
    returns: jax.Array | None = None  # [batch, T-1] the critic's targets


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardSettings:
    """The static part of the reward and advantage computation (PPOConfig's fields, and derived)."""

    algorithm: str
    kl_estimator: str
    clip_reward_value: float
    short_answer: str  # "drop" or "penalize"
    short_answer_penalty: float
    max_answer_seq_len: int
    overlong_buffer: int
    overlong_penalty: float
    drop_uniform_groups: bool
    prompts_per_iteration: int  # the groups the update trains on
    oversample_prompts: int  # extra groups generated, to replace uniform ones
    rollout_correction: str
    rollout_correction_cap: float
    model_weight: float  # the reward model's weight in the training reward (0: not used)
    estimator: EstimatorSettings

    @classmethod
    def from_config(cls, ppo, model_weight: float = 1.0) -> RewardSettings:
        names = {field.name for field in dataclasses.fields(cls)} - {"estimator", "model_weight"}
        return cls(
            **{name: getattr(ppo, name) for name in names},
            model_weight=model_weight,
            estimator=EstimatorSettings.from_config(ppo),
        )


def answer_action_mask(attention_mask, prompt_len: int):
    """[batch, T] -> [batch, T-1]: 1 on the actions that emit answer tokens."""
    actions = attention_mask[:, 1:]
    return actions * (jnp.arange(actions.shape[1]) >= prompt_len - 1)


def training_scores(reward_model, tokens, attention_mask, function_scores, model_weight: float):
    """[batch]: the weighted reward-model score plus the reward functions' (computed on the host)."""
    scores = jnp.asarray(function_scores, jnp.float32)
    if reward_model is not None and model_weight:
        scores = scores + model_weight * sequence_scores(reward_model(tokens, attention_mask), attention_mask)
    return scores


def overlong_penalty(answer_lengths, settings: RewardSettings):
    """DAPO's soft overlong punishment: 0 up to max - buffer tokens, then falling linearly to
    -overlong_penalty at the length limit. [batch] -> [batch]."""
    if settings.overlong_buffer == 0:
        return jnp.zeros_like(answer_lengths)
    free = settings.max_answer_seq_len - settings.overlong_buffer
    return -settings.overlong_penalty * jnp.clip((answer_lengths - free) / settings.overlong_buffer, 0.0, 1.0)


def uniform_groups(scores, kept, n: int):
    """[batch] 1 for rows of a group whose kept rows' scores are all equal (no signal to learn from)."""
    grouped, valid = scores.reshape(-1, n), kept.reshape(-1, n) > 0
    high = jnp.where(valid, grouped, -jnp.inf).max(-1)
    low = jnp.where(valid, grouped, jnp.inf).min(-1)
    return jnp.repeat((high <= low).astype(jnp.float32), n)


def make_experience(
    models: dict, tokens, attention_mask, prompt_len, kl_coef, function_scores, rollout_logprobs, settings
):
    """Scores a batch of rollouts with the roles (NNX modules, merged inside jit; absent ones None)
    and turns the scores into advantages with the algorithm's estimator."""
    action_mask = answer_action_mask(attention_mask, prompt_len).astype(jnp.float32)
    answer_lengths = action_mask.sum(-1)
    long_enough = answer_lengths > 1  # DeepSpeed-Chat drops answers of one token or less

    old_logprobs, _ = models["actor"].token_logprobs(tokens, attention_mask)
    ref_logprobs = old_logprobs
    if models["reference"] is not None:
        ref_logprobs, _ = models["reference"].token_logprobs(tokens, attention_mask)
    old_values = None if models["critic"] is None else models["critic"](tokens, attention_mask)[:, :-1]
    scores = training_scores(models["reward_model"], tokens, attention_mask, function_scores, settings.model_weight)

    kept = jnp.ones_like(answer_lengths)
    shaped = scores + overlong_penalty(answer_lengths, settings)
    if settings.short_answer == "drop":
        kept = long_enough.astype(jnp.float32)
    else:
        shaped = jnp.where(long_enough, shaped, settings.short_answer_penalty)
    shaped = jnp.clip(shaped, -settings.clip_reward_value, settings.clip_reward_value)
    uniform = jnp.zeros_like(kept)
    if settings.drop_uniform_groups:
        uniform = uniform_groups(shaped, kept, settings.estimator.samples_per_prompt)
        kept = kept * (1.0 - uniform)
    action_mask = action_mask * kept[:, None]
    # a dropped row has no answer actions, and no score slot either
    span_mask = reward_span_mask(action_mask, score_position=settings.estimator.score_position) * kept[:, None]
    kl = kl_penalty(old_logprobs, ref_logprobs, settings.kl_estimator)
    inputs = EstimatorInputs(shaped, kl, action_mask, span_mask, old_values, kept, kl_coef)
    estimator = ESTIMATORS[ALGORITHMS[settings.algorithm].estimator]
    advantages, returns = estimator(inputs, settings.estimator)

    rollout_actions = jnp.zeros_like(old_logprobs).at[:, prompt_len - 1 :].set(rollout_logprobs)
    correction, touched = rollout_correction(
        old_logprobs,
        rollout_actions,
        action_mask,
        mode=settings.rollout_correction,
        cap=settings.rollout_correction_cap,
    )
    sequence_kl = ((old_logprobs - ref_logprobs) * action_mask).sum(-1)  # k1 summed over the answer
    rows = jnp.maximum(kept.sum(), 1.0)
    stats = {
        "score": (scores * kept).sum() / rows,
        "kl": (sequence_kl * kept).sum() / rows,
        "kl_coef": kl_coef,
        "answer_length": (answer_lengths * kept).sum() / rows,
        "kept_fraction": kept.mean(),
        "uniform_group_share": uniform.mean(),
        "overlong_share": (answer_lengths >= settings.max_answer_seq_len).mean(),
        "rollout_correction_share": masked_mean(touched, action_mask),
        "advantage_mean": masked_mean(advantages, action_mask),
    }
    if old_values is not None:
        stats.update(value_mean=masked_mean(old_values, action_mask), return_mean=masked_mean(returns, action_mask))
    experience = Experience(
        tokens=tokens,
        attention_mask=attention_mask,
        action_mask=action_mask,
        span_mask=span_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        correction=correction,
        advantages=advantages,
        scores=scores,
        kept=kept,
        old_values=old_values,
        returns=returns,
    )
    return experience, stats


def informative_groups_first(experience: Experience, groups: int, n: int) -> tuple[Experience, dict]:
    """The first `groups` groups that still train (a kept row: not dropped as uniform or short), in
    generation order, then the others masked: DAPO's dynamic sampling with fixed shapes, so the
    update never recompiles; when too few groups are informative the batch is topped up with
    masked ones."""
    informative = experience.kept.reshape(-1, n).max(-1)  # [generated groups]
    order = jnp.argsort(1.0 - informative, stable=True)[:groups]
    rows = (order[:, None] * n + jnp.arange(n)).reshape(-1)  # prompt-major rows of the chosen groups
    return jax.tree.map(lambda x: x[rows], experience), {"informative_group_share": informative[order].mean()}


def role_models(graphs: RoleGraphs, states: RoleStates) -> dict:
    """Each role's module (None for a role the run does without)."""
    return {
        role: None if getattr(states, role) is None else getattr(states, role).model(getattr(graphs, role))
        for role in ("actor", "reference", "critic", "reward_model")
    }


def make_experience_fn(graphs: RoleGraphs, settings: RewardSettings, prompt_len: int):
    """A jitted `(states, tokens, attention_mask, kl_coef, function_scores [batch], rollout_logprobs
    [batch, new]) -> (Experience, stats)`; with oversampling, the experience keeps
    prompts_per_iteration groups of the batch's (`informative_groups_first`)."""

    @jax.jit
    def experience_fn(states: RoleStates, tokens, attention_mask, kl_coef, function_scores, rollout_logprobs):
        models = role_models(graphs, states)
        experience, stats = make_experience(
            models, tokens, attention_mask, prompt_len, kl_coef, function_scores, rollout_logprobs, settings
        )
        stats.update(logprob_agreement(rollout_logprobs, experience.old_logprobs, attention_mask, prompt_len))
        if settings.oversample_prompts:
            n = settings.estimator.samples_per_prompt
            experience, chosen = informative_groups_first(experience, settings.prompts_per_iteration, n)
            stats.update(chosen)
        return experience, stats

    return experience_fn


def make_evaluation_fn(graphs: RoleGraphs, model_weight: float, prompt_len: int):
    """A jitted `(states, tokens, attention_mask, function_scores) -> per answer: the training
    reward, the KL to the reference (k1 summed; 0 without one) and the length`, for held-out prompts."""

    @jax.jit
    def evaluation_fn(states: RoleStates, tokens, attention_mask, function_scores):
        models = role_models(graphs, states)
        action_mask = answer_action_mask(attention_mask, prompt_len).astype(jnp.float32)
        scores = training_scores(models["reward_model"], tokens, attention_mask, function_scores, model_weight)
        kl = jnp.zeros_like(scores)
        if models["reference"] is not None:
            logprobs, _ = models["actor"].token_logprobs(tokens, attention_mask)
            ref_logprobs, _ = models["reference"].token_logprobs(tokens, attention_mask)
            kl = ((logprobs - ref_logprobs) * action_mask).sum(-1)
        return {"score": scores, "kl": kl, "answer_length": action_mask.sum(-1)}

    return evaluation_fn
