"""The whole PPO update of one iteration as one jitted function.

ppo_epochs passes, each over a fresh random split of the rollout batch into num_minibatches;
each minibatch takes one actor and one critic optimizer step, with its gradients accumulated
over grad_accum_steps microbatches. Nested `lax.scan`s keep it one compiled program whose size
does not grow with the numbers of epochs or minibatches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.rl.experience import Experience
from jaxrlhf.rl.ppo_math import actor_loss, masked_mean, value_loss
from jaxrlhf.steps.losses import language_model_loss
from jaxrlhf.train_state import (
    TrainState,
    accumulate_gradients,
    bad_step_counts,
    global_norm,
    poisoned_if_loss_not_finite,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PPOState:
    actor: TrainState
    critic: TrainState
    ema: nnx.State | None  # moving average of the actor's trainable params (None when off)

    def checkpoint_tree(self) -> dict:
        return {"actor": self.actor.checkpoint_tree(), "critic": self.critic.checkpoint_tree(), "ema": self.ema}

    def restored(self, tree: dict) -> PPOState:
        return PPOState(self.actor.restored(tree["actor"]), self.critic.restored(tree["critic"]), tree["ema"])


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateSettings:
    """The static part of the update."""

    ppo_epochs: int
    num_minibatches: int
    grad_accum_steps: int
    cliprange: float
    cliprange_value: float
    dual_clip: float | None
    entropy_coef: float
    unsup_coef: float
    ema_decay: float

    @classmethod
    def from_config(cls, ppo) -> UpdateSettings:
        """The fields of the same names in a PPOConfig."""
        return cls(**{field.name: getattr(ppo, field.name) for field in dataclasses.fields(cls)})


def actor_objective(settings: UpdateSettings):
    """(model, minibatch) -> (loss, metrics): clipped surrogate, entropy bonus, PTX term."""

    def loss_fn(model, batch):
        experience: Experience = batch["experience"]
        logprobs, token_entropy = model.token_logprobs(experience.tokens, experience.attention_mask)
        old, advantages, mask = experience.old_logprobs, experience.advantages, experience.action_mask
        surrogate, stats = actor_loss(
            logprobs, old, advantages, mask, cliprange=settings.cliprange, dual_clip=settings.dual_clip
        )
        loss = surrogate
        if settings.entropy_coef:
            entropy = masked_mean(token_entropy, mask)
            loss = loss - settings.entropy_coef * entropy
        else:  # a metric only: no gradient through the entropy
            entropy = masked_mean(jax.lax.stop_gradient(token_entropy), mask)
        metrics = {"actor_loss": surrogate, "entropy": entropy, **stats}
        if settings.unsup_coef > 0:
            ptx_loss, _ = language_model_loss(model, batch["ptx"])
            loss = loss + settings.unsup_coef * ptx_loss
            metrics["ptx_loss"] = ptx_loss
        return loss, metrics

    return loss_fn


def critic_objective(settings: UpdateSettings):
    def loss_fn(model, batch):
        experience: Experience = batch["experience"]
        values = model(experience.tokens, experience.attention_mask)[:, :-1]
        # over the answer's actions, as DeepSpeed-Chat: never the extra "after_last" score slot
        old, returns, mask = experience.old_values, experience.returns, experience.action_mask
        loss, stats = value_loss(values, old, returns, mask, cliprange_value=settings.cliprange_value)
        return loss, {"critic_loss": loss, **stats}

    return loss_fn


def make_ppo_update(
    actor_graphdef, critic_graphdef, actor_optimizer, critic_optimizer, settings: UpdateSettings, state_shardings=None
):
    """A jitted `(state, experience, ptx, key) -> (state, metrics)`; `ptx` holds one pretraining
    batch per minibatch ([num_minibatches, rows, seq] arrays) or is None. The state is donated and,
    given `state_shardings`, comes out laid out as it went in (one compile)."""
    actor_loss_fn, critic_loss_fn = actor_objective(settings), critic_objective(settings)
    accumulate = settings.grad_accum_steps

    def minibatch_step(state: PPOState, batch):
        actor_loss, actor_grads, actor_metrics = accumulate_gradients(
            actor_loss_fn, actor_graphdef, state.actor.params, state.actor.frozen, batch, accumulate
        )
        critic_loss, critic_grads, critic_metrics = accumulate_gradients(
            critic_loss_fn, critic_graphdef, state.critic.params, state.critic.frozen, batch, accumulate
        )
        # the non-finite guard skips a role's step whose loss or gradient is not finite
        actor = state.actor.apply_gradients(poisoned_if_loss_not_finite(actor_grads, actor_loss), actor_optimizer)
        critic = state.critic.apply_gradients(poisoned_if_loss_not_finite(critic_grads, critic_loss), critic_optimizer)
        ema = state.ema
        if ema is not None:
            decay = settings.ema_decay
            ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p.astype(e.dtype), ema, actor.params)
        metrics = {
            **actor_metrics,
            **critic_metrics,
            "actor_grad_norm": global_norm(actor_grads),
            "critic_grad_norm": global_norm(critic_grads),
        }
        return PPOState(actor, critic, ema), metrics

    def epoch(state: PPOState, inputs):
        key, experience, ptx = inputs
        rows = experience.tokens.shape[0]
        order = jax.random.permutation(key, rows)
        split = lambda x: x[order].reshape(settings.num_minibatches, rows // settings.num_minibatches, *x.shape[1:])
        minibatches = {"experience": jax.tree.map(split, experience)}
        if ptx is not None:
            minibatches["ptx"] = ptx
        return jax.lax.scan(minibatch_step, state, minibatches)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_shardings, None) if state_shardings else None)
    def update(state: PPOState, experience: Experience, ptx, key):
        keys = jax.random.split(key, settings.ppo_epochs)
        state, metrics = jax.lax.scan(lambda s, k: epoch(s, (k, experience, ptx)), state, keys)
        metrics = jax.tree.map(jnp.mean, metrics)  # over epochs and minibatches
        for role in ("actor", "critic"):
            counts = bad_step_counts(getattr(state, role).opt_state)
            metrics.update({f"{role}_{name}": count for name, count in counts.items()})
        return state, metrics

    return update
