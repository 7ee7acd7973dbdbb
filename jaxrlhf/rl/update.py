"""The whole step-3 update of one iteration as one jitted function, for every algorithm.

ppo_epochs passes, each over a fresh random split of the rollout batch into num_minibatches;
each minibatch takes one actor and (with a critic) one critic optimizer step, with its gradients
accumulated over grad_accum_steps microbatches, token-exact (the losses divide by the whole
minibatch's counts). Nested `lax.scan`s keep it one compiled program whose size
does not grow with the numbers of epochs or minibatches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.losses import language_model_loss, target_tokens
from jaxrlhf.rl.algorithms import ALGORITHMS
from jaxrlhf.rl.experience import Experience
from jaxrlhf.rl.policy_loss import aggregate, clipped_surrogate, kl_loss, loss_totals
from jaxrlhf.rl.ppo_math import value_loss
from jaxrlhf.rl.roles import uses_reference
from jaxrlhf.train_state import (
    TrainState,
    WholeBatchMean,
    accumulate_gradients,
    bad_step_counts,
    global_norm,
    poisoned_if_loss_not_finite,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PPOState:
    actor: TrainState
    critic: TrainState | None  # None: a critic-free algorithm
    ema: nnx.State | None  # moving average of the actor's trainable params (None when off)

    def checkpoint_tree(self) -> dict:
        tree = {"actor": self.actor.checkpoint_tree(), "ema": self.ema}
        if self.critic is not None:
            tree["critic"] = self.critic.checkpoint_tree()
        return tree

    def restored(self, tree: dict) -> PPOState:
        critic = None if self.critic is None else self.critic.restored(tree["critic"])
        return PPOState(self.actor.restored(tree["actor"]), critic, tree["ema"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateSettings:
    """The static part of the update: PPOConfig's fields of the same names, and the algorithm's."""

    ppo_epochs: int
    num_minibatches: int
    grad_accum_steps: int
    cliprange: float
    cliprange_high: float | None  # None: cliprange
    cliprange_value: float
    dual_clip: float | None
    entropy_coef: float
    unsup_coef: float
    ema_decay: float
    loss_aggregation: str
    kl_loss_estimator: str
    max_answer_seq_len: int  # the horizon of the "constant" aggregation
    kl_in_loss: bool = False  # GRPO: kl_coef * KL to the reference is a loss term

    @classmethod
    def from_config(cls, ppo) -> UpdateSettings:
        names = {field.name for field in dataclasses.fields(cls)} - {"kl_in_loss"}
        return cls(
            **{name: getattr(ppo, name) for name in names},
            kl_in_loss=ALGORITHMS[ppo.algorithm].kl_in == "loss" and uses_reference(ppo),
        )


def actor_totals(batch) -> dict:
    """The whole minibatch's denominators: answer tokens, answers, rows (and PTX target tokens)."""
    totals = loss_totals(batch["experience"].action_mask)
    if "ptx" in batch:
        totals["ptx_tokens"] = target_tokens(batch["ptx"])["tokens"]
    return totals


def actor_objective(settings: UpdateSettings, kl_coef) -> WholeBatchMean:
    """Clipped surrogate (weighted by the rollout correction), the KL loss term (GRPO), the entropy
    bonus and the PTX term, each over the whole minibatch's tokens (`actor_totals`)."""
    high = settings.cliprange if settings.cliprange_high is None else settings.cliprange_high

    def loss_fn(model, batch, totals):
        experience: Experience = batch["experience"]
        logprobs, token_entropy = model.token_logprobs(experience.tokens, experience.attention_mask)
        mask = experience.action_mask
        per_token, indicators = clipped_surrogate(
            logprobs,
            experience.old_logprobs,
            experience.advantages,
            mask,
            clip_low=settings.cliprange,
            clip_high=high,
            dual_clip=settings.dual_clip,
        )
        reduce = lambda x, mode=settings.loss_aggregation: aggregate(
            x, mask, mode, horizon=settings.max_answer_seq_len, totals=totals
        )
        surrogate = reduce(per_token * experience.correction)
        loss = surrogate
        names = {"ratio": "ratio_mean"}
        metrics = {"actor_loss": surrogate}
        metrics.update({names.get(k, k): reduce(v, "token_mean") for k, v in indicators.items()})
        if settings.entropy_coef:
            entropy = reduce(token_entropy, "token_mean")
            loss = loss - settings.entropy_coef * entropy
        else:  # a metric only: no gradient through the entropy
            entropy = reduce(jax.lax.stop_gradient(token_entropy), "token_mean")
        metrics["entropy"] = entropy
        if settings.kl_in_loss:
            kl = reduce(kl_loss(logprobs, experience.ref_logprobs, settings.kl_loss_estimator))
            loss = loss + kl_coef * kl
            metrics["kl_loss"] = kl
        if settings.unsup_coef > 0:
            ptx_loss, _ = language_model_loss.loss(model, batch["ptx"], {"tokens": totals["ptx_tokens"]})
            loss = loss + settings.unsup_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss
        return loss, metrics

    return WholeBatchMean(loss_fn, actor_totals)


def critic_objective(settings: UpdateSettings) -> WholeBatchMean:
    def loss_fn(model, batch, totals):
        experience: Experience = batch["experience"]
        values = model(experience.tokens, experience.attention_mask)[:, :-1]
        # over the answer's actions, as DeepSpeed-Chat: never the extra "after_last" score slot
        old, returns, mask = experience.old_values, experience.returns, experience.action_mask
        loss, stats = value_loss(
            values, old, returns, mask, cliprange_value=settings.cliprange_value, token_count=totals["tokens"]
        )
        return loss, {"critic_loss": loss, **stats}

    return WholeBatchMean(loss_fn, lambda batch: loss_totals(batch["experience"].action_mask))


def make_ppo_update(
    actor_graphdef, critic_graphdef, actor_optimizer, critic_optimizer, settings: UpdateSettings, state_shardings=None
):
    """A jitted `(state, experience, ptx, key, kl_coef) -> (state, metrics)`; `ptx` holds one
    pretraining batch per minibatch ([num_minibatches, rows, seq] arrays) or is None. Without a
    critic (`critic_graphdef` None) only the actor trains. The state is donated and, given
    `state_shardings`, comes out laid out as it went in (one compile)."""
    critic_loss_fn = critic_objective(settings)
    accumulate = settings.grad_accum_steps

    def minibatch_step(state: PPOState, batch, kl_coef):
        actor_loss, actor_grads, metrics = accumulate_gradients(
            actor_objective(settings, kl_coef),
            actor_graphdef,
            state.actor.params,
            state.actor.frozen,
            batch,
            accumulate,
        )
        # the non-finite guard skips a role's step whose loss or gradient is not finite
        actor = state.actor.apply_gradients(poisoned_if_loss_not_finite(actor_grads, actor_loss), actor_optimizer)
        metrics["actor_grad_norm"] = global_norm(actor_grads)
        critic = state.critic
        if critic is not None:
            critic_loss, critic_grads, critic_metrics = accumulate_gradients(
                critic_loss_fn, critic_graphdef, critic.params, critic.frozen, batch, accumulate
            )
            critic = critic.apply_gradients(poisoned_if_loss_not_finite(critic_grads, critic_loss), critic_optimizer)
            metrics.update(critic_metrics, critic_grad_norm=global_norm(critic_grads))
        ema = state.ema
        if ema is not None:
            decay = settings.ema_decay
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(e.dtype), ema, actor.params)
        return PPOState(actor, critic, ema), metrics

    def epoch(state: PPOState, inputs):
        key, experience, ptx, kl_coef = inputs
        rows = experience.tokens.shape[0]
        order = jax.random.permutation(key, rows)
        split = lambda x: x[order].reshape(settings.num_minibatches, rows // settings.num_minibatches, *x.shape[1:])
        minibatches = {"experience": jax.tree.map(split, experience)}
        if ptx is not None:
            minibatches["ptx"] = ptx
        return jax.lax.scan(lambda s, batch: minibatch_step(s, batch, kl_coef), state, minibatches)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_shardings, None) if state_shardings else None)
    def update(state: PPOState, experience: Experience, ptx, key, kl_coef):
        keys = jax.random.split(key, settings.ppo_epochs)
        state, metrics = jax.lax.scan(lambda s, k: epoch(s, (k, experience, ptx, kl_coef)), state, keys)
        metrics = jax.tree.map(jnp.mean, metrics)  # over epochs and minibatches
        for role in ("actor", "critic"):
            if getattr(state, role) is not None:
                counts = bad_step_counts(getattr(state, role).opt_state)
                metrics.update({f"{role}_{name}": count for name, count in counts.items()})
        return state, metrics

    return update
