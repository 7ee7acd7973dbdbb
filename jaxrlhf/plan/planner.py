"""The memory plan of a run: bytes per device of every role of every configured step, the remat
policy and gradient accumulation that fit the device, or a refusal before any work.

Each step is priced phase by phase, because the roles of step 3 do not all peak together:
generation holds the training states plus the actor's generation copy and the KV cache;
experience holds them plus one forward pass of the largest model; the update holds them plus
both trained roles' gradients and the larger of their backward passes. `remat: auto` takes the
first policy of none -> dots -> block that fits, then raises gradient accumulation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types

import jax.numpy as jnp
from flax import nnx

from jaxrlhf.config import PREVIOUS_STAGE
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.generation.layout import generation_config
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.models.hf_io import read_hf_config
from jaxrlhf.models.outputs import LOGITS_CHUNK_ELEMENTS
from jaxrlhf.parallel.mesh import MESH_AXES
from jaxrlhf.parallel.rules import GENERATION_RULES, TRAINING_RULES, Rules, with_overrides
from jaxrlhf.plan.estimate import (
    POLICIES,
    Estimate,
    Job,
    abstract_model,
    block_residual_bytes,
    device_bytes,
    layer_weight_elements,
    tensor_local,
)
from jaxrlhf.plan.estimate import estimate as estimate_job

GIB = 2**30
STEP_MODELS = {
    "sft": ("sft",),
    "rm": ("rm",),
    "dpo": ("dpo",),
    "ppo": ("actor", "critic", "reward model"),
}  # whose config.json


class PlanError(ValueError):
    """Nothing fits the device: the message is one line, `table` the whole plan."""

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


@dataclasses.dataclass
class Line:
    """One role's bytes per device; a trained role also has gradients, optimizer state and activations."""

    role: str
    weights: int  # trained parameters (float32 master weights, or adapters) and the frozen rest
    grads: int = 0
    optimizer: int = 0
    working: int = 0  # compute-dtype copy of the weights, one block gathered whole (FSDP)
    activations: dict[str, int] = dataclasses.field(default_factory=dict)  # per remat policy
    logits: int = 0  # the LM head's float32 logits (one chunk) and their gradient
    cache: int = 0  # generation: the KV cache


@dataclasses.dataclass
class StepPlan:
    """One step under one choice of remat and accumulation: its roles and each phase's peak."""

    step: str
    mesh_shape: dict[str, int]
    lines: list[Line]
    phases: dict[str, int]  # peak bytes per device of each phase
    remat: dict[str, str]  # trained role -> policy
    grad_accum: int
    budget: int | None  # usable bytes per device; None = unknown (no constraint)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def choice(self) -> str:
        policies = ", ".join(f"{role} remat={policy}" for role, policy in self.remat.items())
        return f"{policies}, grad_accum_steps={self.grad_accum}"

    def table(self) -> str:
        gib = lambda n: f"{n / GIB:9.2f}" if n else f"{'-':>9}"
        devices = math.prod(self.mesh_shape.values())
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh_shape.items())
        budget = f"{self.budget / GIB:.1f} GiB usable" if self.budget else "device memory unknown"
        columns = ("weights", "grads", "optimizer", "working", *(f"act {p}" for p in POLICIES), "logits", "kv cache")
        rows = [
            f"[{self.step}] GiB per device on {devices} device(s) ({mesh}); {budget}",
            f"  {'role':<16}" + "".join(f"{c:>10}" for c in columns),
        ]
        for line in self.lines:
            activations = [line.activations.get(p, 0) for p in POLICIES]
            values = (line.weights, line.grads, line.optimizer, line.working, *activations, line.logits, line.cache)
            rows.append(f"  {line.role:<16}" + "".join(f" {gib(v)}" for v in values))
        phases = ", ".join(f"{phase} {peak / GIB:.2f}" for phase, peak in self.phases.items())
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"  peak by phase (GiB): {phases} -> {verdict} with {self.choice()}")
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the plan runs: the mesh's axis sizes, the rules, the usable bytes per device."""

    mesh_shape: dict[str, int]
    training_rules: Rules
    generation_rules: Rules
    budget: int | None
    platform: str = "gpu"  # "cpu" adds what XLA:CPU alone allocates (to compare with a CPU dry run)

    @property
    def mesh(self):  # what the estimate reads of a mesh: its shape
        return types.SimpleNamespace(shape=self.mesh_shape)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def replicas(self) -> int:
        return self.mesh_shape["data"] * self.mesh_shape["fsdp"]

    def generation_mesh(self, tensor_parallel: int):
        if self.devices % tensor_parallel:
            raise ValueError(f"generation.tensor_parallel={tensor_parallel} does not divide the {self.devices} devices")
        return types.SimpleNamespace(
            shape={"data": 1, "fsdp": self.devices // tensor_parallel, "tensor": tensor_parallel}
        )


def mesh_shape(mesh_config, devices: int) -> dict[str, int]:
    """The configured axis sizes with the -1 axis resolved against `devices`."""
    sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
    fixed = math.prod(size for size in sizes.values() if size != -1)
    shape = {axis: devices // fixed if size == -1 else size for axis, size in sizes.items()}
    if devices % fixed or math.prod(shape.values()) != devices:
        raise ValueError(f"mesh {sizes} does not fit {devices} devices (the sizes must multiply to the device count)")
    return shape


def target_for(config, devices: int, device_memory_bytes: int | None, platform: str = "gpu") -> Target:
    """The run's mesh and rules on `devices`, and its budget: `plan.device_memory_gib`, else what
    the device reports (`device_memory_bytes`, None on CPU), times `plan.usable_fraction`."""
    memory = config.plan.device_memory_gib * GIB if config.plan.device_memory_gib else device_memory_bytes
    return Target(
        mesh_shape=mesh_shape(config.mesh, devices),
        training_rules=with_overrides(TRAINING_RULES, config.mesh.training_rules),
        generation_rules=with_overrides(GENERATION_RULES, config.mesh.generation_rules),
        budget=int(memory * config.plan.usable_fraction) if memory else None,
        platform=platform,
    )


def model_sources(config, builtin_dir) -> dict[str, str]:
    """The directory whose config.json gives each role's architecture: its path, or for "" the
    model the previous step starts from (its export has the same shapes). `builtin_dir()` is the
    built-in model's directory."""
    exported = lambda step: os.path.join(config.output_dir, step, "model")

    def source(path: str, previous_step: str, previous_source: str) -> str:
        if path != PREVIOUS_STAGE:
            return path
        if previous_step in config.steps:
            return previous_source
        return (
            exported(previous_step) if os.path.exists(os.path.join(exported(previous_step), "config.json")) else BUILTIN
        )

    sources = {"sft": config.sft.model.path}
    sources["rm"] = source(config.rm.model.path, "sft", sources["sft"])
    sources["dpo"] = source(config.dpo.model.path, "sft", sources["sft"])
    sources["actor"] = source(config.ppo.actor_model.path, "sft", sources["sft"])
    sources["critic"] = source(config.ppo.critic_model.path, "rm", sources["rm"])
    reward = config.ppo.reward_model.path
    sources["reward model"] = sources["critic"] if reward == PREVIOUS_STAGE else source(reward, "rm", sources["rm"])
    built_in = {}  # the built-in model is built (once) only if a role of a configured step uses it
    used = {role for step in config.steps for role in STEP_MODELS[step]}
    return {
        role: (built_in.setdefault(BUILTIN, builtin_dir()) if path == BUILTIN else path)
        for role, path in sources.items()
        if role in used
    }


def decoder_config(path: str, model_config) -> DecoderConfig:
    """A role's architecture (its config.json only: no weights) in the configured precision."""
    return DecoderConfig.from_hf(
        read_hf_config(path),
        dtype=model_config.dtype,
        param_dtype=model_config.param_dtype,
        attention=model_config.attention,
    )


def trained_line(role: str, estimate: Estimate) -> Line:
    return Line(
        role,
        estimate.params + estimate.frozen,
        estimate.grads,
        estimate.optimizer,
        estimate.working,
        estimate.activations,
        estimate.logits,
    )


def plan_supervised(step: str, settings, config: DecoderConfig, target: Target, remat: dict, accum: int) -> StepPlan:
    """SFT (a causal LM on `batch_size` rows), the reward model (a value model on both sides of
    `batch_size` pairs) or DPO (a causal LM on both sides, beside a frozen copy of its starting
    weights unless LoRA makes the base the reference)."""
    rows = settings.batch_size * (1 if step == "sft" else 2)
    job = Job(step, config, step == "rm", settings.lora.rank, rows, accum, settings.max_seq_len)
    estimate = estimate_job(job, target.training_rules, target.mesh, target.platform)
    lines = [trained_line(step, estimate)]
    if step == "dpo" and not settings.lora.rank:
        lines.append(Line("reference", estimate.params + estimate.frozen))
    train = estimate.total(remat[step]) + sum(line.weights for line in lines[1:])
    return StepPlan(step, target.mesh_shape, lines, {"train": train}, remat, accum, target.budget)


def plan_ppo(ppo, generation, configs: dict[str, DecoderConfig], target: Target, remat: dict, accum: int) -> StepPlan:
    """Step 3: four models resident, then generate / experience / update, each at its own peak."""
    rules, mesh = target.training_rules, target.mesh
    seq, rows = ppo.max_prompt_seq_len + ppo.max_answer_seq_len, ppo.prompts_per_iteration // ppo.num_minibatches
    actor = estimate_job(
        Job("actor", configs["actor"], False, ppo.actor_lora.rank, rows, accum, seq), rules, mesh, target.platform
    )
    critic = estimate_job(
        Job("critic", configs["critic"], True, ppo.critic_lora.rank, rows, accum, seq), rules, mesh, target.platform
    )
    frozen_bytes = lambda config, value_head: device_bytes(
        nnx.state(abstract_model(config, value_head, 0)), rules, mesh
    )
    lines = [trained_line("actor", actor), trained_line("critic", critic)]
    if not ppo.actor_lora.rank:  # under LoRA the reference is the actor's base with adapters off
        lines.append(Line("reference", frozen_bytes(configs["actor"], False)))
    lines.append(Line("reward model", frozen_bytes(configs["reward model"], True)))
    if ppo.ema_decay > 0:
        lines.append(Line("actor EMA", actor.params))
    resident = sum(line.weights + line.optimizer for line in lines)
    generation_line = generation_copy(configs["actor"], ppo, generation.tensor_parallel, target)
    if target.platform == "cpu":
        generation_line.working += cpu_upcast(configs["actor"], generation_line.weights)
    lines.append(generation_line)
    # experience: one forward of each model over the whole rollout batch, the largest at a time
    local_rows = max(1, ppo.prompts_per_iteration // target.replicas)
    tensor = target.mesh_shape["tensor"]
    forward = max(
        block_residual_bytes(tensor_local(configs[role], tensor), local_rows, seq, "none")
        for role in ("actor", "critic", "reward model")
    )
    forward += 4 * min(local_rows * seq * configs["actor"].vocab_size // tensor, LOGITS_CHUNK_ELEMENTS)
    if target.mesh_shape["fsdp"] > 1:  # FSDP: the largest model's block gathered whole, stored dtype and cast
        forward += max(gathered_block_bytes(configs[role], tensor) for role in ("actor", "critic", "reward model"))
    if target.platform == "cpu":  # every model stored in bf16 is upcast whole, the actor's base twice (reference)
        stored = [(configs["actor"], lines[0].weights)] * 2 + [(configs["critic"], lines[1].weights)]
        stored.append((configs["reward model"], next(line.weights for line in lines if line.role == "reward model")))
        forward += sum(
            cpu_upcast(config, weights) for config, weights in stored if jnp.dtype(config.param_dtype).itemsize < 4
        )
    both = lambda field: getattr(actor, field) + getattr(critic, field)
    # XLA overlaps the two roles' passes in the one update program: both sets of residuals live
    # (and the actor's PTX pass on pretraining rows of the same size beside its PPO pass)
    actor_pass = actor.activations[remat["actor"]] + actor.logits
    backward = actor_pass * (2 if ppo.unsup_coef > 0 else 1) + critic.activations[remat["critic"]] + critic.logits
    phases = {
        "generate": resident + generation_line.weights + generation_line.cache + generation_line.working,
        "experience": resident + forward,
        "update": resident + both("grads") + both("working") + backward,
    }
    return StepPlan("ppo", target.mesh_shape, lines, phases, remat, accum, target.budget)


def gathered_block_bytes(config: DecoderConfig, tensor: int) -> int:
    itemsize = jnp.dtype(config.param_dtype).itemsize + jnp.dtype(config.compute_dtype).itemsize
    return layer_weight_elements(config) // tensor * itemsize


def cpu_upcast(config: DecoderConfig, weight_bytes: int) -> int:
    """XLA:CPU has no bf16 matmul: it converts bf16 weights to a float32 copy of the whole model
    (what a CPU dry run shows, and a GPU never allocates)."""
    return 2 * weight_bytes if jnp.dtype(config.compute_dtype).itemsize < 4 else 0


def generation_copy(config: DecoderConfig, ppo, tensor_parallel: int, target: Target) -> Line:
    """The actor's generation copy (compute dtype, tensor-parallel), its KV cache, and one prefill
    layer's working set."""
    mesh = target.generation_mesh(tensor_parallel)
    gen = generation_config(config)
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(gen, nnx.Rngs(0))))
    weights = device_bytes(state, target.generation_rules, mesh)
    rows = -(-ppo.prompts_per_iteration // mesh.shape["fsdp"])
    kv_heads = gen.num_kv_heads // tensor_parallel if gen.num_kv_heads % tensor_parallel == 0 else gen.num_kv_heads
    seq = ppo.max_prompt_seq_len + ppo.max_answer_seq_len
    cache = 2 * gen.num_layers * rows * kv_heads * seq * gen.head_dim * jnp.dtype(gen.compute_dtype).itemsize
    prefill = block_residual_bytes(tensor_local(gen, tensor_parallel), rows, ppo.max_prompt_seq_len, "none")
    return Line("generation copy", weights, working=prefill, cache=cache)


def choose(build, configured: dict[str, str], accum: int, rows: int, replicas: int, budget: int | None) -> StepPlan:
    """The cheapest plan that fits: configured policies kept, "auto" ones tried none -> dots ->
    block, then the same at each larger gradient accumulation (each micro-batch still split
    evenly over the replicas). Without a budget "auto" is none. The plan returned may not fit
    (the one of lowest peak): the caller refuses it."""
    with_level = lambda level: {role: POLICIES[level] if r == "auto" else r for role, r in configured.items()}
    if "auto" not in configured.values() or budget is None:
        return build(with_level(0), accum)
    larger = [a for a in range(accum + 1, rows + 1) if rows % a == 0 and (rows // a) % replicas == 0]
    best = None
    for steps in [accum, *larger]:
        for level in range(len(POLICIES)):
            plan = build(with_level(level), steps)
            if plan.fits:
                return plan
            best = plan if best is None or plan.peak < best.peak else best
    return best


def plan_run(config, target: Target, builtin_dir) -> list[StepPlan]:
    """The plan of every configured step, each with its choice of remat and accumulation."""
    sources = model_sources(config, builtin_dir)
    plans = []
    for step in config.steps:
        if step in ("sft", "rm", "dpo"):
            settings = getattr(config, step)
            model = decoder_config(sources[step], settings.model)
            build = lambda remat, accum, step=step, settings=settings, model=model: plan_supervised(
                step, settings, model, target, remat, accum
            )
            configured, accum, rows = {step: settings.model.remat}, settings.grad_accum_steps, settings.batch_size
        else:
            ppo = config.ppo
            models = {"actor": ppo.actor_model, "critic": ppo.critic_model, "reward model": ppo.reward_model}
            configs = {role: decoder_config(sources[role], model) for role, model in models.items()}
            build = lambda remat, accum, configs=configs, ppo=ppo: plan_ppo(
                ppo, config.generation, configs, target, remat, accum
            )
            configured = {"actor": ppo.actor_model.remat, "critic": ppo.critic_model.remat}
            accum, rows = ppo.grad_accum_steps, ppo.prompts_per_iteration // ppo.num_minibatches
        plans.append(choose(build, configured, accum, rows, target.replicas, target.budget))
    return plans


def refuse_unfit(plans: list[StepPlan]) -> None:
    """Raises PlanError (one line, the tables attached) when a step does not fit."""
    unfit = [plan for plan in plans if not plan.fits]
    if unfit:
        plan = unfit[0]
        raise PlanError(
            f"step {plan.step} needs {plan.peak / GIB:.1f} GiB per device at best ({plan.choice()}), more than the "
            f"{plan.budget / GIB:.1f} GiB usable: add devices, use LoRA, shorten batch_size/max_seq_len, or set "
            "plan.device_memory_gib if the device has more",
            "\n".join(p.table() for p in plans),
        )


def resolved(config, plans: list[StepPlan]):
    """A copy of `config` with each step's remat and gradient accumulation as planned."""
    config = copy.deepcopy(config)
    for plan in plans:
        if plan.step == "ppo":
            config.ppo.actor_model.remat, config.ppo.critic_model.remat = plan.remat["actor"], plan.remat["critic"]
            config.ppo.grad_accum_steps = plan.grad_accum
        else:
            section = getattr(config, plan.step)
            section.model.remat, section.grad_accum_steps = plan.remat[plan.step], plan.grad_accum
    return config
