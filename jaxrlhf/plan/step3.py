"""Step 3 priced phase by phase: the models the algorithm and the reward hold, then generate /
experience / update, each at its own peak.

A run holds only the roles it uses (`ppo_models`, `uses_reference`): the critic-free algorithms
(grpo, rloo, reinforce_pp) no critic, reward functions alone no reward model, kl_coef 0 no
reference. Each of `prompts_per_iteration` prompts is answered `samples_per_prompt` (n) times:
experience and the update run over prompts x n rows. Static generation prefills the prompts once
and decodes prompts x n rows with a KV cache of as many; the refill engine decodes `slots` rows
with a cache of as many, and where the rows' cache would not fit the planner gives it fewer slots.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxrlhf.evaluation import decode_engine
from jaxrlhf.generation.layout import generation_config
from jaxrlhf.generation.refill import Admission
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.outputs import LOGITS_CHUNK_ELEMENTS
from jaxrlhf.plan.estimate import (
    Estimate,
    Job,
    abstract_model,
    block_residual_bytes,
    device_bytes,
    layer_weight_elements,
    tensor_local,
)
from jaxrlhf.plan.estimate import estimate as estimate_job
from jaxrlhf.plan.plans import Line, StepPlan, Target, trained_line
from jaxrlhf.rl.algorithms import ALGORITHMS
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.rl.roles import uses_reference

TRAINED = ("actor", "critic")  # the roles with an optimizer (and a remat choice)


def ppo_models(ppo) -> tuple[str, ...]:
    """The step-3 models whose config.json the plan reads: the actor, the critic unless the
    algorithm does without one, the reward model unless the reward is functions alone."""
    models = ["actor"]
    if ALGORITHMS[ppo.algorithm].needs_critic:
        models.append("critic")
    if RewardMix.from_config(ppo.reward, ppo.reward_weights, "ppo.reward").uses_model:
        models.append("reward model")
    return tuple(models)


def rollout_rows(ppo) -> int:
    """The answers generated and scored in one iteration: every prompt (the extra ones of dynamic
    sampling too) answered samples_per_prompt times."""
    return generated_prompts(ppo) * ppo.samples_per_prompt


def generated_prompts(ppo) -> int:
    return ppo.prompts_per_iteration + ppo.oversample_prompts


def update_rows(ppo) -> int:
    """The answers the update trains on: prompts_per_iteration groups of samples_per_prompt."""
    return ppo.prompts_per_iteration * ppo.samples_per_prompt


def plan_ppo(ppo, generation, configs: dict[str, DecoderConfig], target: Target, remat: dict, accum: int) -> StepPlan:
    """Step 3 with the models of `configs` (those of `ppo_models`) resident, then generate,
    experience and update, each at its own peak."""
    rules, mesh = target.training_rules, target.mesh
    seq, minibatch = ppo.max_prompt_seq_len + ppo.max_answer_seq_len, update_rows(ppo) // ppo.num_minibatches
    lora = {"actor": ppo.actor_lora.rank, "critic": ppo.critic_lora.rank}
    trained = {
        role: estimate_job(
            Job(role, configs[role], role == "critic", lora[role], minibatch, accum, seq), rules, mesh, target.platform
        )
        for role in TRAINED
        if role in configs
    }
    frozen_bytes = lambda config, value_head: device_bytes(
        nnx.state(abstract_model(config, value_head, 0)), rules, mesh
    )
    lines = [trained_line(role, estimate) for role, estimate in trained.items()]
    if uses_reference(ppo) and not ppo.actor_lora.rank:  # under LoRA: the actor's base, adapters off
        lines.append(Line("reference", frozen_bytes(configs["actor"], False)))
    if "reward model" in configs:
        lines.append(Line("reward model", frozen_bytes(configs["reward model"], True)))
    if ppo.ema_decay > 0:
        lines.append(Line("actor EMA", trained["actor"].params))
    resident = sum(line.weights + line.optimizer for line in lines)
    weights = generation_weights(configs["actor"], generation.tensor_parallel, target)
    slots = planned_slots(configs["actor"], ppo, generation, target, resident, weights)
    generation_line = generation_copy(configs["actor"], ppo, generation, target, slots, weights)
    lines.append(generation_line)
    phases = {
        "generate": resident + generation_line.weights + generation_line.cache + generation_line.working,
        "experience": resident + experience_bytes(ppo, configs, lines, target),
        "update": resident + update_bytes(ppo, trained, remat),
    }
    return StepPlan("ppo", target.mesh_shape, lines, phases, remat, accum, target.budget, slots)


def planned_slots(config: DecoderConfig, ppo, generation, target: Target, resident: int, weights: int) -> int:
    """The configured decode slots; for "auto" without a count (0), the most that let the generate
    phase fit beside the `resident` bytes, halving from one per row (0 where all rows fit)."""
    if generation.slots or generation.engine == "static" or target.budget is None:
        return generation.slots
    shards = target.generation_mesh(generation.tensor_parallel).shape["fsdp"]
    slots = rollout_rows(ppo)
    while slots > shards:
        line = generation_copy(config, ppo, generation, target, slots, weights)
        if resident + line.weights + line.cache + line.working <= target.budget:
            break
        slots = max(shards, slots // 2 // shards * shards)
    return 0 if slots >= rollout_rows(ppo) else slots


def experience_bytes(ppo, configs: dict[str, DecoderConfig], lines: list[Line], target: Target) -> int:
    """One forward of each model over the whole rollout batch, the largest at a time."""
    seq = ppo.max_prompt_seq_len + ppo.max_answer_seq_len
    local_rows = max(1, rollout_rows(ppo) // target.replicas)
    tensor = target.mesh_shape["tensor"]
    forward = max(
        block_residual_bytes(tensor_local(config, tensor), local_rows, seq, "none") for config in configs.values()
    )
    forward += 4 * min(local_rows * seq * configs["actor"].vocab_size // tensor, LOGITS_CHUNK_ELEMENTS)
    if target.mesh_shape["fsdp"] > 1:  # FSDP: the largest model's block gathered whole, stored dtype and cast
        forward += max(gathered_block_bytes(config, tensor) for config in configs.values())
    if target.platform == "cpu":  # every model stored in bf16 is upcast whole, the actor's base twice (reference)
        weights = {line.role: line.weights for line in lines}
        stored = [(configs["actor"], weights["actor"])] * (2 if uses_reference(ppo) else 1)
        stored += [(configs[role], weights[role]) for role in ("critic", "reward model") if role in configs]
        forward += sum(
            cpu_upcast(config, size) for config, size in stored if jnp.dtype(config.param_dtype).itemsize < 4
        )
    return forward


def update_bytes(ppo, trained: dict[str, Estimate], remat: dict[str, str]) -> int:
    """The trained roles' gradients and working copies, and their backward passes: XLA overlaps
    the roles' passes in the one update program, so both sets of residuals live, and the actor's
    PTX pass beside its own (on prompts_per_iteration / num_minibatches pretraining rows: 1/n of
    a minibatch of answers)."""
    passes = {role: estimate.activations[remat[role]] + estimate.logits for role, estimate in trained.items()}
    ptx = passes["actor"] // ppo.samples_per_prompt if ppo.unsup_coef > 0 else 0
    return sum(estimate.grads + estimate.working for estimate in trained.values()) + sum(passes.values()) + ptx


def gathered_block_bytes(config: DecoderConfig, tensor: int) -> int:
    itemsize = jnp.dtype(config.param_dtype).itemsize + jnp.dtype(config.compute_dtype).itemsize
    return layer_weight_elements(config) // tensor * itemsize


def cpu_upcast(config: DecoderConfig, weight_bytes: int) -> int:
    """XLA:CPU has no bf16 matmul: it converts bf16 weights to a float32 copy of the whole model
    (what a CPU dry run shows, and a GPU never allocates)."""
    return 2 * weight_bytes if jnp.dtype(config.compute_dtype).itemsize < 4 else 0


def generation_weights(config: DecoderConfig, tensor_parallel: int, target: Target) -> int:
    """Bytes per device of the actor's generation copy (compute dtype, generation layout)."""
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(generation_config(config), nnx.Rngs(0))))
    return device_bytes(state, target.generation_rules, target.generation_mesh(tensor_parallel))


def generation_copy(config: DecoderConfig, ppo, generation, target: Target, slots: int, weights: int) -> Line:
    """The actor's generation copy (compute dtype, tensor-parallel), its KV cache, and one prefill
    layer's working set, for the engine `decode_engine` picks with `slots`.

    Static: the prompts are prefilled once into a cache of their own rows; with n samples per
    prompt it is repeated into prompts x n rows, both alive while it is copied. Refill: a cache of
    `slots` rows, and the largest admission's prompts (the first fill of every slot) prefilled into
    a prompt-length cache that is copied into the slots."""
    tensor_parallel = generation.tensor_parallel
    mesh = target.generation_mesh(tensor_parallel)
    gen = generation_config(config)
    local = lambda rows: -(-rows // mesh.shape["fsdp"])
    rows = rollout_rows(ppo)
    engine, slots = decode_engine(dataclasses.replace(generation, slots=slots), rows)
    kv_heads = gen.num_kv_heads // tensor_parallel if gen.num_kv_heads % tensor_parallel == 0 else gen.num_kv_heads
    seq = ppo.max_prompt_seq_len + ppo.max_answer_seq_len
    token_bytes = 2 * gen.num_layers * kv_heads * gen.head_dim * jnp.dtype(gen.compute_dtype).itemsize
    if engine == "refill":
        first_fill = Admission.of(min(slots, rows), ppo.samples_per_prompt, generated_prompts(ppo))
        prompts = first_fill.prompts  # prefilled whole on every device (a small chunk)
        cache = token_bytes * (local(min(slots, rows)) * seq + (prompts + first_fill.rows) * ppo.max_prompt_seq_len)
    else:
        prompts = local(generated_prompts(ppo))
        cache = token_bytes * seq * (local(rows) + (prompts if ppo.samples_per_prompt > 1 else 0))
    prefill = block_residual_bytes(tensor_local(gen, tensor_parallel), prompts, ppo.max_prompt_seq_len, "none")
    if target.platform == "cpu":
        prefill += cpu_upcast(config, weights)
    return Line("generation copy", weights, working=prefill, cache=cache)
