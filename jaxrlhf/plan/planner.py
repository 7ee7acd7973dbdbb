"""The memory plan of a run: bytes per device of every role of every configured step, the remat
policy and gradient accumulation that fit the device, or a refusal before any work.

Each step is priced phase by phase, because the roles of step 3 do not all peak together:
generation holds the training states plus the actor's generation copy and the KV cache;
experience holds them plus one forward pass of the largest model; the update holds them plus
the trained roles' gradients and their backward passes (`plan.step3`: only the roles the
algorithm and the reward use). `remat: auto` takes the first policy of none -> dots -> block
that fits, then raises gradient accumulation.
"""

from __future__ import annotations

import copy
import math

from jaxrlhf.config import PREVIOUS_STAGE
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.hf_io import read_hf_config
from jaxrlhf.parallel.mesh import MESH_AXES
from jaxrlhf.parallel.rules import GENERATION_RULES, TRAINING_RULES, with_overrides
from jaxrlhf.plan.estimate import POLICIES, Job
from jaxrlhf.plan.estimate import estimate as estimate_job
from jaxrlhf.plan.plans import GIB, Line, StepPlan, Target, trained_line
from jaxrlhf.plan.step3 import TRAINED, plan_ppo, ppo_models, rollout_rows
from jaxrlhf.run_context import previous_export


def step_models(config, step: str) -> tuple[str, ...]:
    """The models whose config.json a step reads: step 3's are those its algorithm and reward use."""
    return ppo_models(config.ppo) if step == "ppo" else (step,)


class PlanError(ValueError):
    """Nothing fits the device: the message is one line, `table` the whole plan."""

    def __init__(self, message: str, table: str):
        super().__init__(message)
        self.table = table


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
    model the previous step starts from (its export has the same shapes); a used role's "" with
    neither is refused (`previous_export`). `builtin_dir()` is the built-in model's directory."""
    used = {role for step in config.steps for role in step_models(config, step)}

    def source(key: str, path: str, previous_step: str, previous_source: str, needed: bool) -> str:
        if path != PREVIOUS_STAGE or not needed:
            return path
        return previous_export(config, previous_step, key) or previous_source

    ppo, reward = config.ppo, config.ppo.reward_model.path
    critic_needed = "critic" in used or ("reward model" in used and reward == PREVIOUS_STAGE)
    sources = {"sft": config.sft.model.path}
    sources["rm"] = source("rm.model.path", config.rm.model.path, "sft", sources["sft"], "rm" in used)
    sources["dpo"] = source("dpo.model.path", config.dpo.model.path, "sft", sources["sft"], "dpo" in used)
    sources["actor"] = source("ppo.actor_model.path", ppo.actor_model.path, "sft", sources["sft"], "actor" in used)
    sources["critic"] = source("ppo.critic_model.path", ppo.critic_model.path, "rm", sources["rm"], critic_needed)
    sources["reward model"] = (
        sources["critic"]
        if reward == PREVIOUS_STAGE
        else source("ppo.reward_model.path", reward, "rm", sources["rm"], "reward model" in used)
    )
    built_in = {}  # the built-in model is built (once) only if a role of a configured step uses it
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
            configs = {role: decoder_config(sources[role], models[role]) for role in ppo_models(ppo)}
            build = lambda remat, accum, configs=configs, ppo=ppo: plan_ppo(
                ppo, config.generation, configs, target, remat, accum
            )
            configured = {role: models[role].remat for role in TRAINED if role in configs}
            accum, rows = ppo.grad_accum_steps, rollout_rows(ppo) // ppo.num_minibatches
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
            for role, policy in plan.remat.items():  # the actor's, and the critic's where there is one
                getattr(config.ppo, f"{role}_model").remat = policy
            config.ppo.grad_accum_steps = plan.grad_accum
            config.generation.slots = plan.slots
        else:
            section = getattr(config, plan.step)
            section.model.remat, section.grad_accum_steps = plan.remat[plan.step], plan.grad_accum
    return config
