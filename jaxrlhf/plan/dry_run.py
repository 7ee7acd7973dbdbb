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
from jaxrlhf.evaluation import sampling_settings
from jaxrlhf.generation.generate import generate_from_state
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.losses import language_model_loss
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.parallel.rules import Rules, activation_sharding, batch_sharding, state_shardings
from jaxrlhf.plan.estimate import Job, abstract_model
from jaxrlhf.plan.step3 import generated_prompts, rollout_rows
from jaxrlhf.rl.experience import RewardSettings, make_experience_fn
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.rl.roles import ModelStates, RoleGraphs, RoleStates, uses_reference
from jaxrlhf.rl.update import PPOState, UpdateSettings, make_ppo_update
from jaxrlhf.steps.dpo import make_dpo_loss
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


@dataclasses.dataclass
class Step3Shapes:
    """Step 3's states as sharded shapes: the training state, the roles the experience pass reads
    (only those the run holds), their graphs, the optimizers, and the frozen models that are not
    part of the training state (the reward model, a reference of its own)."""

    state: PPOState
    roles: RoleStates
    graphs: RoleGraphs
    optimizers: tuple  # (actor's, critic's or None)
    frozen: tuple


def step3_shapes(ppo, configs: dict[str, DecoderConfig], rules: Rules, mesh: Mesh) -> Step3Shapes:
    """The models of `configs` (the actor; the critic and the reward model where the run has them)
    and the reference where `uses_reference`, as the run builds them (`rl.ppo.prepare_run`)."""
    role = lambda name, value_head, lora: abstract_role(configs[name], value_head, lora, rules, mesh)
    actor_graph, actor_params, actor_frozen = role("actor", False, ppo.actor_lora.rank)
    critic = role("critic", True, ppo.critic_lora.rank) if "critic" in configs else None
    reward_graph, reward = None, None
    if "reward model" in configs:
        reward_graph, params, frozen = role("reward model", True, 0)
        reward = ModelStates(params, frozen)
    updates = max(ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, 1)
    optimizers = (make_optimizer(ADAMW, updates), make_optimizer(ADAMW, updates) if critic else None)
    state = PPOState(
        abstract_train_state(optimizers[0], actor_params, actor_frozen),
        abstract_train_state(optimizers[1], *critic[1:]) if critic else None,
        actor_params if ppo.ema_decay > 0 else None,
    )
    actor = ModelStates(state.actor.params, state.actor.frozen)
    reference, reference_graph, own_reference = None, None, None
    if uses_reference(ppo) and ppo.actor_lora.rank:  # the actor's base with adapters off: the same shapes
        reference, reference_graph = actor, actor_graph
    elif uses_reference(ppo):
        reference_graph, params, frozen = role("actor", False, 0)
        reference = own_reference = ModelStates(params, frozen)
    roles = RoleStates(
        actor, reference, ModelStates(state.critic.params, state.critic.frozen) if critic else None, reward
    )
    graphs = RoleGraphs(actor_graph, reference_graph, critic[0] if critic else None, reward_graph)
    return Step3Shapes(state, roles, graphs, optimizers, (reward, own_reference))


def ppo_phase_bytes(
    ppo, generation, configs: dict[str, DecoderConfig], rules: Rules, generation_rules: Rules, mesh: Mesh
) -> dict[str, int]:
    """Per-device peak of each phase of step 3 from XLA: the compiled program (generate,
    experience, update) plus the states that stay resident while it runs without being its
    arguments. `configs` carry each role's remat and name the models the run holds (`ppo_models`)."""
    shapes = step3_shapes(ppo, configs, rules, mesh)
    state, graphs = shapes.state, shapes.graphs
    rows, seq = rollout_rows(ppo), ppo.max_prompt_seq_len + ppo.max_answer_seq_len
    batch = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), rules))
    tokens = batch((rows, seq), jnp.int32)
    scores, rollout_logprobs = batch((rows,), jnp.float32), batch((rows, ppo.max_answer_seq_len), jnp.float32)
    model_weight = RewardMix.from_config(ppo.reward, ppo.reward_weights, "ppo.reward").model_weight
    experience_fn = make_experience_fn(graphs, RewardSettings.from_config(ppo, model_weight), ppo.max_prompt_seq_len)
    kl_coef = jax.ShapeDtypeStruct((), jnp.float32)
    update = make_ppo_update(
        graphs.actor, graphs.critic, *shapes.optimizers, UpdateSettings.from_config(ppo), shardings_of(state)
    )
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    inputs = (shapes.roles, tokens, tokens, kl_coef, scores, rollout_logprobs)
    with activation_sharding(mesh, rules):
        experience_program = experience_fn.lower(*inputs).compile()
        experience, _ = jax.eval_shape(experience_fn, *inputs)
        experience = placed(experience, jax.tree.map(lambda x: batch_sharding(mesh, x.ndim, rules), experience))
        update_program = update.lower(state, experience, ptx_shapes(ppo, mesh, rules), key, kl_coef).compile()
    generate_bytes = generation_phase_bytes(graphs.actor, state, ppo, generation, generation_rules, mesh)
    frozen = local_bytes(shapes.frozen)
    critic_optimizer = None if state.critic is None else state.critic.opt_state
    optimizers_and_ema = local_bytes((state.actor.opt_state, critic_optimizer, state.ema))
    return {
        "generate": generate_bytes + local_bytes(state) + frozen,
        "experience": compiled_bytes(experience_program) + optimizers_and_ema,
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
    argument), the prefill of the prompts, the KV cache of their samples and the decode loop, per
    device."""
    # the run's sampling settings; the ids do not change the program's shapes
    tokens = types.SimpleNamespace(eos_token_id=0, pad_token_id=1)
    settings = sampling_settings(types.SimpleNamespace(generation=generation, ppo=ppo), tokens)
    engine = HybridEngine(
        actor_graphdef, (state.actor.params, state.actor.frozen), mesh, generation.tensor_parallel, settings, rules
    )
    abstract = jax.eval_shape(engine.generation_state, (state.actor.params, state.actor.frozen))
    generation_state = placed(abstract, engine.shardings)
    rows = batch_sharding(engine.mesh, 2, rules)
    prompts = jax.ShapeDtypeStruct((generated_prompts(ppo), ppo.max_prompt_seq_len), jnp.int32, sharding=rows)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    program = generate_from_state.lower(
        engine.graphdef,
        generation_state,
        prompts,
        prompts,
        key,
        settings,
        engine.cache_sharding,
        samples_per_prompt=ppo.samples_per_prompt,
        activations=(engine.mesh, rules),
    ).compile()
    return compiled_bytes(program)
