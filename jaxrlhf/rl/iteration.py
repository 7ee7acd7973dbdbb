"""One step-3 iteration, for every algorithm: rollouts by the hybrid engine (n per prompt), the
reward functions on the host, experience by the roles, the one-jit update.

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
import numpy as np
from flax import nnx

from jaxrlhf.data.batches import BatchIterator
from jaxrlhf.generation.hybrid_engine import GenerationTimings, HybridEngine
from jaxrlhf.generation.prompting import decode_answers
from jaxrlhf.models.lora import adapters_off
from jaxrlhf.parallel.mesh import to_host
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.rl.roles import ModelStates, RoleStates
from jaxrlhf.rl.update import PPOState


@dataclasses.dataclass
class PPOLoop:
    """What every iteration of one step-3 run uses."""

    engine: HybridEngine  # generates with the actor in the tensor-parallel layout
    experience_fn: (
        Callable  # (RoleStates, tokens, mask, kl_coef, function_scores, rollout_logprobs) -> (Experience, stats)
    )
    update_fn: Callable  # (PPOState, Experience, ptx, key, kl_coef) -> (PPOState, metrics)
    reference: ModelStates | None  # None: the actor's own base with adapters off (LoRA), or no reference
    uses_reference: bool
    reward_model: ModelStates | None  # None: reward functions alone
    rewards: RewardMix  # the reward model's weight and the reward functions
    tokenizer: object  # decodes answers for the reward functions
    prompts: BatchIterator
    ptx_rows: BatchIterator | None  # pretraining rows for the PTX loss, or None
    device_batch: Callable[[dict], dict]  # this process's rows -> global arrays on the mesh
    global_batch: Callable[[dict], dict]  # whole-batch host arrays -> global arrays on the mesh
    key: jax.Array
    num_minibatches: int
    ppo_epochs: int
    prompt_len: int
    samples_per_prompt: int
    sizes: dict[str, int]  # parameters of the actor, the critic (0 without) and the trained ones, for TFLOP/s

    def role_states(self, state: PPOState) -> RoleStates:
        actor = ModelStates(state.actor.params, state.actor.frozen)
        reference = self.reference
        if reference is None and self.uses_reference:
            reference = ModelStates(adapters_off(state.actor.params), state.actor.frozen)
        critic = None if state.critic is None else ModelStates(state.critic.params, state.critic.frozen)
        return RoleStates(actor=actor, reference=reference, critic=critic, reward_model=self.reward_model)

    def function_scores(self, tokens, attention_mask, prompts: list[str] | None = None) -> tuple[jax.Array, dict]:
        """The reward functions' weighted scores of a batch of rollouts (zeros without functions),
        as a global array, and their metrics. Every process scores every row (the texts are small)."""
        rows = tokens.shape[0]
        if not self.rewards.uses_functions:
            return self.global_batch({"s": np.zeros(rows, np.float32)})["s"], {}
        tokens, attention_mask = to_host(tokens), to_host(attention_mask)
        if prompts is None:
            prompts = decode_prompts(self.tokenizer, tokens, attention_mask, self.prompt_len)
        answers = decode_answers(self.tokenizer, tokens, attention_mask, self.prompt_len)
        scores, metrics = self.rewards.function_scores(prompts, answers)
        return self.global_batch({"s": np.asarray(scores, np.float32)})["s"], metrics


def decode_prompts(tokenizer, tokens, attention_mask, prompt_len: int) -> list[str]:
    """The prompt texts of rollouts (left-padded prompt columns, read by the mask)."""
    ids = np.asarray(tokens)[:, :prompt_len]
    mask = np.asarray(attention_mask)[:, :prompt_len].astype(bool)
    return [tokenizer.decode(row[keep].tolist()) for row, keep in zip(ids, mask)]


def run_iteration(loop: PPOLoop, state: PPOState, iteration: int, kl_coef: float) -> tuple[PPOState, dict]:
    """Rollouts, rewards, experience and the update of iteration `iteration`.
    Returns the new state and the iteration's statistics (floats)."""
    key = jax.random.fold_in(loop.key, iteration)
    prompts = loop.device_batch(next(loop.prompts))
    states = loop.role_states(state)
    rollout, timings = loop.engine.generate(
        (states.actor.params, states.actor.frozen),
        prompts["prompt_ids"],
        prompts["prompt_mask"],
        key,
        samples_per_prompt=loop.samples_per_prompt,
    )
    function_scores, reward_metrics = loop.function_scores(rollout.tokens, rollout.attention_mask)
    clock = time.perf_counter()
    experience, stats = jax.block_until_ready(
        loop.experience_fn(
            states, rollout.tokens, rollout.attention_mask, jnp.float32(kl_coef), function_scores, rollout.logprobs
        )
    )
    experience_s = time.perf_counter() - clock
    ptx = None
    if loop.ptx_rows is not None:  # one pretraining batch per minibatch
        rows = loop.device_batch(next(loop.ptx_rows))
        ptx = jax.tree.map(lambda x: x.reshape(loop.num_minibatches, -1, *x.shape[1:]), rows)
    clock = time.perf_counter()
    state, metrics = jax.block_until_ready(
        loop.update_fn(state, experience, ptx, jax.random.fold_in(key, 1), jnp.float32(kl_coef))
    )
    train_s = time.perf_counter() - clock
    stats = {k: float(v) for k, v in jax.device_get({**stats, **metrics}).items()}
    stats.update(reward_metrics)
    phases = PhaseTimes(timings, reward_metrics.get("time/reward_fn_s", 0.0), experience_s, train_s)
    stats.update(iteration_timings(phases, rollout.tokens, rollout.attention_mask, loop))
    # How full the decode steps ran: static waits for the longest answer, refill keeps slots busy.
    stats["generation/decode_steps"] = float(rollout.steps)
    stats["generation/occupancy"] = float(rollout.occupancy)
    return state, stats


@dataclasses.dataclass
class PhaseTimes:
    generation: GenerationTimings
    reward_fn_s: float
    experience_s: float
    train_s: float


def iteration_timings(times: PhaseTimes, tokens, attention_mask, loop: PPOLoop) -> dict[str, float]:
    """Seconds per phase, samples/s and TFLOP/s per phase, as DeepSpeed-Chat reports them. The
    prompts are prefilled once for their n samples."""
    batch, total_len = tokens.shape
    prompt_len, prompts = loop.prompt_len, batch // loop.samples_per_prompt
    generated = float(jnp.sum(attention_mask[:, prompt_len:]))
    actor, critic = loop.sizes["actor"], loop.sizes["critic"]
    generation_flops = 2 * actor * (prompts * prompt_len + generated)
    experience_flops = 2 * (2 * actor + 2 * critic) * batch * total_len
    trained = loop.sizes["trained"]  # 6 FLOPs per trained weight and token, 4 per frozen one (LoRA's base)
    train_flops = (6 * trained + 4 * (actor + critic - trained)) * batch * total_len * loop.ppo_epochs
    timings = times.generation
    end_to_end = timings.reshard_s + timings.generate_s + times.reward_fn_s + times.experience_s + times.train_s
    return {
        "time/reshard_s": timings.reshard_s,
        "time/generation_s": timings.generate_s,
        "time/experience_s": times.experience_s,
        "time/train_s": times.train_s,
        "time/iteration_s": end_to_end,
        "samples_per_s": batch / end_to_end,
        "tflops/generation": generation_flops / max(timings.generate_s, 1e-9) / 1e12,
        "tflops/train": train_flops / max(times.train_s, 1e-9) / 1e12,
        "tflops/end_to_end": (generation_flops + experience_flops + train_flops) / end_to_end / 1e12,
    }


def merged_models(graphs, state: PPOState) -> dict[str, nnx.Module]:
    """The trained roles as modules: the actor, the EMA actor (if any) and the critic (if any)."""
    models = {"actor": nnx.merge(graphs.actor, state.actor.params, state.actor.frozen)}
    if state.critic is not None:
        models["critic"] = nnx.merge(graphs.critic, state.critic.params, state.critic.frozen)
    if state.ema is not None:
        models["actor_ema"] = nnx.merge(graphs.actor, state.ema, state.actor.frozen)
    return models
