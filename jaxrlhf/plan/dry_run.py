"""Ahead-of-time dry runs: the real jitted training step compiled from shapes on a mesh, no weights.

XLA's `memory_analysis()` of the compiled program is the ground truth the planner's estimate is
checked against: arguments + outputs - what the donated state aliases + temporaries, per device.
On simulated CPU devices (`--xla_force_host_platform_device_count`) a 70B-class model compiles on
a laptop: only the per-device program exists.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.config import OptimizerConfig
from jaxrlhf.generation.generate import generate_from_state
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.parallel.rules import Rules, activation_sharding, batch_sharding, state_shardings
from jaxrlhf.plan.estimate import Job, abstract_model
from jaxrlhf.rl.experience import RewardSettings, make_experience_fn
from jaxrlhf.rl.ppo import sampling_settings
from jaxrlhf.rl.roles import ModelStates, RoleGraphs, RoleStates
from jaxrlhf.rl.update import PPOState, UpdateSettings, make_ppo_update
from jaxrlhf.steps.dpo import make_dpo_loss
from jaxrlhf.steps.losses import language_model_loss
from jaxrlhf.steps.reward_model import make_reward_loss
from jaxrlhf.train_state import (
    TrainState,
    make_optimizer,
    make_train_step,
    shardings_of,
    split_for_training,
    train_state_initializer,
)

ADAMW = OptimizerConfig()  # the optimizer state's shapes are all the dry run needs of it


def compiled_bytes(compiled) -> int:
    """Per-device peak of a compiled program: arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def step_inputs(step: str, settings, job: Job) -> tuple[Callable, dict[str, jax.ShapeDtypeStruct]]:
    """The loss and the batch (shapes) of the SFT step (`packing`: positions and segment ids), the
    reward model's (both sides of `job.batch // 2` pairs, rm.loss) or DPO's (both sides with
    answer masks, and the reference's log-probs of each)."""
    rows, seq = job.batch, job.seq
    if step == "sft":
        names = ("input_ids", "attention_mask", "loss_mask")
        names += ("positions", "segment_ids") if getattr(settings, "packing", False) else ()
        return language_model_loss, {name: jax.ShapeDtypeStruct((rows, seq), jnp.int32) for name in names}
    suffixes = ("ids", "mask", "loss_mask") if step == "dpo" else ("ids", "mask")
    batch = {
        f"{side}_{s}": jax.ShapeDtypeStruct((rows // 2, seq), jnp.int32)
        for side in ("chosen", "rejected")
        for s in suffixes
    }
    if step == "rm":
        return make_reward_loss(settings.loss, settings.centering_coef), batch
    batch.update(
        {f"reference_{side}": jax.ShapeDtypeStruct((rows // 2,), jnp.float32) for side in ("chosen", "rejected")}
    )
    return make_dpo_loss(settings), batch


def compile_training_step(job: Job, remat: str, rules: Rules, mesh: Mesh, step: str | None = None, settings=None):
    """The jitted train step of `step` ("sft", "rm" or "dpo"; by default SFT, or the reward model
    for a value-head job with the final-token loss), compiled from shapes with its state sharded
    by `rules` and its batch rows over the data-parallel axes."""
    config = dataclasses.replace(job.config, remat=remat)
    graphdef, params, frozen = split_for_training(abstract_model(config, job.value_head, job.lora_rank), job.lora_rank)
    optimizer = make_optimizer(ADAMW, total_steps=100)
    params = placed(params, state_shardings(params, rules, mesh))
    frozen = placed(frozen, state_shardings(frozen, rules, mesh))
    init = train_state_initializer(optimizer, params)
    init_compiled = init.lower(params, frozen).compile()
    state = placed(jax.eval_shape(init, params, frozen), init_compiled.output_shardings)
    step = step or ("rm" if job.value_head else "sft")
    settings = settings or types.SimpleNamespace(loss="final_token", centering_coef=0.0)
    loss_fn, batch = step_inputs(step, settings, job)
    batch = {
        name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim, rules))
        for name, x in batch.items()
    }
    train_step = make_train_step(graphdef, loss_fn, optimizer, job.grad_accum, shardings_of(state))
    with activation_sharding(mesh, rules):
        return train_step.lower(state, batch).compile()


def placed(tree, shardings):
    """Shapes of `tree` carrying `shardings` (what jit lowers against)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def local_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded shapes."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def abstract_role(config: DecoderConfig, value_head: bool, lora_rank: int, rules: Rules, mesh: Mesh):
    """(graphdef, params, frozen) of a role as sharded shapes in the training layout."""
    graphdef, params, frozen = split_for_training(abstract_model(config, value_head, lora_rank), lora_rank)
    return (
        graphdef,
        placed(params, state_shardings(params, rules, mesh)),
        placed(frozen, state_shardings(frozen, rules, mesh)),
    )


def abstract_train_state(optimizer, params, frozen) -> TrainState:
    init = train_state_initializer(optimizer, params)
    return placed(jax.eval_shape(init, params, frozen), init.lower(params, frozen).compile().output_shardings)


def ppo_phase_bytes(
    ppo, generation, configs: dict[str, DecoderConfig], rules: Rules, generation_rules: Rules, mesh: Mesh
) -> dict[str, int]:
    """Per-device peak of each phase of step 3 from XLA: the compiled program (generate,
    experience, update) plus the states that stay resident while it runs without being its
    arguments. `configs` carry each role's remat."""
    graph = {}
    graph["actor"], actor_params, actor_frozen = abstract_role(
        configs["actor"], False, ppo.actor_lora.rank, rules, mesh
    )
    graph["critic"], critic_params, critic_frozen = abstract_role(
        configs["critic"], True, ppo.critic_lora.rank, rules, mesh
    )
    graph["reward"], reward_params, reward_frozen = abstract_role(configs["reward model"], True, 0, rules, mesh)
    reference = ModelStates(actor_params, actor_frozen)  # the same shapes (or, under LoRA, the actor's own)
    if not ppo.actor_lora.rank:
        graph["reference"], params, frozen = abstract_role(configs["actor"], False, 0, rules, mesh)
        reference = ModelStates(params, frozen)
    updates = ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches
    optimizers = [make_optimizer(ADAMW, max(updates, 1)) for _ in range(2)]
    state = PPOState(
        abstract_train_state(optimizers[0], actor_params, actor_frozen),
        abstract_train_state(optimizers[1], critic_params, critic_frozen),
        actor_params if ppo.ema_decay > 0 else None,
    )
    graphs = RoleGraphs(graph["actor"], graph.get("reference", graph["actor"]), graph["critic"], graph["reward"])
    frozen_roles = ModelStates(reward_params, reward_frozen), (reference if not ppo.actor_lora.rank else None)
    rows = batch_sharding(mesh, 2, rules)
    seq = ppo.max_prompt_seq_len + ppo.max_answer_seq_len
    tokens = jax.ShapeDtypeStruct((ppo.prompts_per_iteration, seq), jnp.int32, sharding=rows)
    roles = RoleStates(
        ModelStates(state.actor.params, state.actor.frozen),
        reference,
        ModelStates(state.critic.params, state.critic.frozen),
        frozen_roles[0],
    )
    experience_fn = make_experience_fn(graphs, RewardSettings.from_config(ppo), ppo.max_prompt_seq_len)
    kl_coef = jax.ShapeDtypeStruct((), jnp.float32)
    update = make_ppo_update(
        graph["actor"], graph["critic"], *optimizers, UpdateSettings.from_config(ppo), shardings_of(state)
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with activation_sharding(mesh, rules):
        experience_program = experience_fn.lower(roles, tokens, tokens, kl_coef).compile()
        experience, _ = jax.eval_shape(experience_fn, roles, tokens, tokens, kl_coef)
        experience = placed(experience, jax.tree.map(lambda x: batch_sharding(mesh, x.ndim, rules), experience))
        update_program = update.lower(state, experience, ptx_shapes(ppo, mesh, rules), key).compile()
    generate_bytes = generation_phase_bytes(graph["actor"], state, ppo, generation, generation_rules, mesh)
    frozen = local_bytes(frozen_roles)
    optimizer_and_ema = local_bytes((state.actor.opt_state, state.critic.opt_state, state.ema))
    return {
        "generate": generate_bytes + local_bytes(state) + frozen,
        "experience": compiled_bytes(experience_program) + optimizer_and_ema,
        "update": compiled_bytes(update_program) + frozen,
    }


def ptx_shapes(ppo, mesh: Mesh, rules: Rules) -> dict | None:
    """One pretraining batch per minibatch for the PTX loss, as the iteration passes it (or None)."""
    if ppo.unsup_coef <= 0:
        return None
    shape = (
        ppo.num_minibatches,
        ppo.prompts_per_iteration // ppo.num_minibatches,
        ppo.max_prompt_seq_len + ppo.max_answer_seq_len,
    )
    rows = batch_sharding(mesh, 2, rules).spec[0]
    sharding = NamedSharding(mesh, PartitionSpec(None, rows))
    names = ("input_ids", "attention_mask", "loss_mask")
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for name in names}


def generation_phase_bytes(actor_graphdef, state: PPOState, ppo, generation, rules: Rules, mesh: Mesh) -> int:
    """The hybrid engine's generate program for one rollout batch: the generation copy (its
    argument), the KV cache and the decode loop, per device."""
    # the run's sampling settings; the ids do not change the program's shapes
    tokens = types.SimpleNamespace(eos_token_id=0, pad_token_id=1)
    settings = sampling_settings(types.SimpleNamespace(generation=generation, ppo=ppo), tokens)
    engine = HybridEngine(
        actor_graphdef, (state.actor.params, state.actor.frozen), mesh, generation.tensor_parallel, settings, rules
    )
    abstract = jax.eval_shape(engine.generation_state, (state.actor.params, state.actor.frozen))
    generation_state = placed(abstract, engine.shardings)
    rows = batch_sharding(engine.mesh, 2, rules)
    prompts = jax.ShapeDtypeStruct((ppo.prompts_per_iteration, ppo.max_prompt_seq_len), jnp.int32, sharding=rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with activation_sharding(engine.mesh, rules):
        program = generate_from_state.lower(
            engine.graphdef, generation_state, prompts, prompts, key, settings, engine.cache_sharding
        ).compile()
    return compiled_bytes(program)
