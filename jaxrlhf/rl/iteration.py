"""One PPO iteration: rollouts by the hybrid engine, experience by the four roles, the one-jit update.

`PPOLoop` holds what stays fixed across iterations (the jitted functions, the frozen roles, the
batch iterators); `run_iteration` is a function of it, the training state and the iteration
number, so it can be run and tested on its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.data.batches import BatchIterator
from jaxrlhf.generation.hybrid_engine import GenerationTimings, HybridEngine
from jaxrlhf.models.lora import adapters_off
from jaxrlhf.rl.ppo_math import logprob_agreement
from jaxrlhf.rl.roles import ModelStates, RoleStates
from jaxrlhf.rl.update import PPOState


@dataclasses.dataclass
class PPOLoop:
    """What every iteration of one PPO run uses."""

    engine: HybridEngine  # generates with the actor in the tensor-parallel layout
    experience_fn: Callable  # (RoleStates, tokens, attention_mask, kl_coef) -> (Experience, stats)
    update_fn: Callable  # (PPOState, Experience, ptx, key) -> (PPOState, metrics)
    reference: ModelStates | None  # None: the actor's own base with adapters off (LoRA)
    reward_model: ModelStates
    prompts: BatchIterator
    ptx_rows: BatchIterator | None  # pretraining rows for the PTX loss, or None
    device_batch: Callable[[dict], dict]  # this process's rows -> global arrays on the mesh
    key: jax.Array
    num_minibatches: int
    ppo_epochs: int
    prompt_len: int
    sizes: dict[str, int]  # parameter counts of the actor and the critic, for TFLOP/s

    def role_states(self, state: PPOState) -> RoleStates:
        actor = ModelStates(state.actor.params, state.actor.frozen)
        reference = self.reference or ModelStates(adapters_off(state.actor.params), state.actor.frozen)
        return RoleStates(
            actor=actor,
            reference=reference,
            critic=ModelStates(state.critic.params, state.critic.frozen),
            reward_model=self.reward_model,
        )


def run_iteration(loop: PPOLoop, state: PPOState, iteration: int, kl_coef: float) -> tuple[PPOState, dict]:
    """Rollouts, experience and the PPO update of iteration `iteration`: three jitted calls.
    Returns the new state and the iteration's statistics (floats)."""
    key = jax.random.fold_in(loop.key, iteration)
    prompts = loop.device_batch(next(loop.prompts))
    states = loop.role_states(state)
    rollout, timings = loop.engine.generate(
        (states.actor.params, states.actor.frozen), prompts["prompt_ids"], prompts["prompt_mask"], key
    )
    clock = time.perf_counter()
    experience, stats = jax.block_until_ready(
        loop.experience_fn(states, rollout.tokens, rollout.attention_mask, jnp.float32(kl_coef))
    )
    experience_s = time.perf_counter() - clock
    agreement = logprob_agreement(rollout.logprobs, experience.old_logprobs, rollout.attention_mask, loop.prompt_len)
    ptx = None
    if loop.ptx_rows is not None:  # one pretraining batch per minibatch
        rows = loop.device_batch(next(loop.ptx_rows))
        ptx = jax.tree.map(lambda x: x.reshape(loop.num_minibatches, -1, *x.shape[1:]), rows)
    clock = time.perf_counter()
    state, metrics = jax.block_until_ready(loop.update_fn(state, experience, ptx, jax.random.fold_in(key, 1)))
    train_s = time.perf_counter() - clock
    stats = {k: float(v) for k, v in jax.device_get({**stats, **agreement, **metrics}).items()}
    stats.update(
        iteration_timings(
            timings,
            experience_s,
            train_s,
            rollout.tokens,
            rollout.attention_mask,
            loop.prompt_len,
            loop.sizes,
            loop.ppo_epochs,
        )
    )
    return state, stats


def iteration_timings(
    timings: GenerationTimings,
    experience_s: float,
    train_s: float,
    tokens,
    attention_mask,
    prompt_len: int,
    sizes: dict[str, int],
    ppo_epochs: int,
) -> dict[str, float]:
    """Seconds per phase, samples/s and TFLOP/s per phase, as DeepSpeed-Chat reports them."""
    batch, total_len = tokens.shape
    generated = float(jnp.sum(attention_mask[:, prompt_len:]))
    actor, critic = sizes["actor"], sizes["critic"]
    generation_flops = 2 * actor * (batch * prompt_len + generated)
    experience_flops = 2 * (2 * actor + 2 * critic) * batch * total_len
    train_flops = 6 * (actor + critic) * batch * total_len * ppo_epochs
    end_to_end = timings.reshard_s + timings.generate_s + experience_s + train_s
    return {
        "time/reshard_s": timings.reshard_s,
        "time/generation_s": timings.generate_s,
        "time/experience_s": experience_s,
        "time/train_s": train_s,
        "time/iteration_s": end_to_end,
        "samples_per_s": batch / end_to_end,
        "tflops/generation": generation_flops / max(timings.generate_s, 1e-9) / 1e12,
        "tflops/train": train_flops / max(train_s, 1e-9) / 1e12,
        "tflops/end_to_end": (generation_flops + experience_flops + train_flops) / end_to_end / 1e12,
    }


def merged_models(graphs, state: PPOState) -> dict[str, nnx.Module]:
    """The trained roles as modules: the actor, the EMA actor (if any) and the critic."""
    models = {
        "actor": nnx.merge(graphs.actor, state.actor.params, state.actor.frozen),
        "critic": nnx.merge(graphs.critic, state.critic.params, state.critic.frozen),
    }
    if state.ema is not None:
        models["actor_ema"] = nnx.merge(graphs.actor, state.ema, state.actor.frozen)
    return models
