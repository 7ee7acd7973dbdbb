"""The planner on this run's devices, and the dry runs that check it: one row per program."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrlhf.models.builtin import builtin_model_dir
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.plan.dry_run import compile_training_step, compiled_bytes, ppo_phase_bytes
from jaxrlhf.plan.estimate import Job
from jaxrlhf.plan.planner import StepPlan, decoder_config, model_sources, plan_run, resolved, target_for
from jaxrlhf.plan.step3 import ppo_models


def device_memory(devices) -> int | None:
    """What the accelerator's allocator may hand out (None on CPU, where nothing is reported): the
    least over this process's devices and, in a multi-process run, over every process (so that
    all of them make the same plan and compile the same programs)."""
    local = [device for device in devices if device.process_index == jax.process_index()] or jax.local_devices()
    limits = [(d.memory_stats() or {}).get("bytes_limit", 0) if d.platform != "cpu" else 0 for d in local]
    least = min(limits) if all(limits) else 0
    if jax.process_count() > 1:
        least = int(np.min(multihost_utils.process_allgather(np.asarray(least, np.int64))))
    return least or None


def builtin_dir(config):
    cache_dir = config.data.cache_dir or f"{config.output_dir}/cache"
    return lambda: builtin_model_dir(cache_dir, seed=config.seed)


def plan_for_devices(config, devices, platform: str = "gpu") -> list[StepPlan]:
    """The plan of every step on `devices` (their count and memory) under the run's mesh."""
    target = target_for(config, len(devices), device_memory(devices), platform)
    return plan_run(config, target, builtin_dir(config))


def dry_run_rows(config, plans: list[StepPlan], devices):
    """(step, phase, XLA bytes, planner bytes) for each compiled program, per device; the
    planner priced for the platform compiled on, at the choice the plan made."""
    chosen = resolved(config, plans)
    platform = "cpu" if devices[0].platform == "cpu" else "gpu"
    same_platform = {plan.step: plan for plan in plan_for_devices(chosen, devices, platform)}
    target = target_for(chosen, len(devices), None)
    mesh = make_mesh(**target.mesh_shape, devices=devices)
    sources = model_sources(chosen, builtin_dir(chosen))
    for step in chosen.steps:
        if step in ("sft", "rm", "dpo"):
            settings = getattr(chosen, step)
            model = decoder_config(sources[step], settings.model)
            rows = settings.batch_size * (1 if step == "sft" else 2)
            job = Job(
                step, model, step == "rm", settings.lora.rank, rows, settings.grad_accum_steps, settings.max_seq_len
            )
            compiled = compile_training_step(job, settings.model.remat, target.training_rules, mesh, step, settings)
            # beside the program: DPO's frozen reference (a resident copy unless LoRA)
            resident = sum(line.weights for line in same_platform[step].lines[1:])
            yield step, "train", compiled_bytes(compiled) + resident, same_platform[step].phases["train"]
        else:
            ppo = chosen.ppo
            models = {"actor": ppo.actor_model, "critic": ppo.critic_model, "reward model": ppo.reward_model}
            configs = {  # the models the run holds (no critic, reward model where it has none)
                role: dataclasses.replace(decoder_config(sources[role], models[role]), remat=models[role].remat)
                for role in ppo_models(ppo)
            }
            phases = ppo_phase_bytes(
                ppo, chosen.generation, configs, target.training_rules, target.generation_rules, mesh
            )
            for phase, xla in phases.items():
                yield step, phase, xla, same_platform[step].phases[phase]
        jax.clear_caches()
