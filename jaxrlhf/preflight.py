"""Checks before any work: each refuses, in one line naming the key or file, an input that would
fail late, train on nothing, or quietly continue a different run.

- a resume from checkpoints made with other settings (unless resume=force);
- batch sizes the data-parallel devices or the gradient accumulation do not divide;
- every step's data: read and split up front, so a bad file stops the run before a model loads;
- sequences longer than a learned-position model's table (OPT), which would train on NaN.
"""

from __future__ import annotations

import os

from jaxrlhf.config import PREVIOUS_STAGE, changed_settings
from jaxrlhf.models import DecoderConfig, read_hf_config
from jaxrlhf.rl.algorithms import ALGORITHMS
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.run_context import RunContext


def preflight(ctx: RunContext) -> None:
    check_resumable(ctx)
    check_batch_sizes(ctx)
    for step in ctx.config.steps:
        data = ctx.step_data(step)
        if not data.train:
            raise ValueError(
                f"{step}: no training records in its data slice (data.data_split={ctx.config.data.data_split})"
            )
    for key, path, previous, length in model_lengths(ctx):
        if path == PREVIOUS_STAGE and previous in ctx.config.steps:
            continue  # this run makes that model: checked when the step starts
        check_sequence_fits(ctx.model_path(path, previous), length, key)


def check_resumable(ctx: RunContext) -> None:
    """A step that would resume from checkpoints made with other settings (a changed learning
    rate, data, LoRA rank...) is refused, naming the keys, unless resume=force."""
    config = ctx.config
    if config.resume == "never":
        return
    for step in config.steps:
        directory = ctx.step_dir(step, "checkpoints")
        saved = os.path.join(directory, "config.yaml")
        has_checkpoints = os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
        if not (has_checkpoints and os.path.exists(saved)):
            continue
        with open(saved) as f:
            changes = changed_settings(f.read(), config, step)
        if not changes:
            continue
        message = f"{step} would resume from {directory}, made with other settings: {'; '.join(changes)}"
        if config.resume != "force":
            raise ValueError(
                f"{message}. Use resume=force to continue anyway, resume=never to start {step} "
                "over, or another output_dir"
            )
        print(f"warning: {message} (resume=force)", flush=True)


def check_batch_sizes(ctx: RunContext) -> None:
    """Every batch, minibatch and microbatch must split evenly over the data-parallel devices."""
    config, replicas = ctx.config, ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    where = f"the {replicas} data-parallel devices (mesh data x fsdp)"
    for step in ("sft", "rm", "dpo"):
        if step in config.steps:
            stage = getattr(config, step)
            micro = stage.batch_size // stage.grad_accum_steps
            if micro % replicas:
                raise ValueError(
                    f"{step}.batch_size={stage.batch_size} / grad_accum_steps={stage.grad_accum_steps} "
                    f"= {micro} rows per microbatch do not divide over {where}"
                )
    if "ppo" in config.steps:
        check_rollout_sizes(ctx, where)


def check_rollout_sizes(ctx: RunContext, where: str) -> None:
    """Step 3's prompts split over the generation layout's replicas (devices / tensor_parallel),
    its answers into minibatches and microbatches over the training layout's."""
    config, ppo, replicas = ctx.config, ctx.config.ppo, ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    generation_replicas = ctx.mesh.devices.size // config.generation.tensor_parallel
    prompts = ppo.prompts_per_iteration + ppo.oversample_prompts
    if prompts % generation_replicas:
        raise ValueError(
            f"ppo.prompts_per_iteration={ppo.prompts_per_iteration} (+ oversample_prompts={ppo.oversample_prompts}) "
            f"prompts do not divide over the {generation_replicas} generation replicas (devices / "
            f"generation.tensor_parallel={config.generation.tensor_parallel})"
        )
    answers = ppo.prompts_per_iteration * ppo.samples_per_prompt
    minibatch = answers // ppo.num_minibatches
    if minibatch % ppo.grad_accum_steps or (minibatch // ppo.grad_accum_steps) % replicas:
        raise ValueError(
            f"ppo: {answers} answers (prompts_per_iteration x samples_per_prompt) / num_minibatches="
            f"{ppo.num_minibatches} / grad_accum_steps={ppo.grad_accum_steps} does not give whole "
            f"microbatches that divide over {where}"
        )


def model_lengths(ctx: RunContext) -> list[tuple[str, str, str | None, int]]:
    """(config key, model path, step it may come from, longest sequence) for every model of the run."""
    config, rows = ctx.config, []
    if "sft" in config.steps:
        rows.append(("sft.max_seq_len", config.sft.model.path, None, config.sft.max_seq_len))
    if "rm" in config.steps:
        rows.append(("rm.max_seq_len", config.rm.model.path, "sft", config.rm.max_seq_len))
    if "dpo" in config.steps:
        rows.append(("dpo.max_seq_len", config.dpo.model.path, "sft", config.dpo.max_seq_len))
    if "ppo" in config.steps:
        length = config.ppo.max_prompt_seq_len + config.ppo.max_answer_seq_len
        key = "ppo.max_prompt_seq_len + max_answer_seq_len"
        rows.append((key, config.ppo.actor_model.path, "sft", length))
        needs_critic = ALGORITHMS[config.ppo.algorithm].needs_critic
        uses_model = RewardMix.from_config(config.ppo.reward, config.ppo.reward_weights).uses_model
        if needs_critic or uses_model:
            rows.append((key, config.ppo.critic_model.path, "rm", length))
        if uses_model and config.ppo.reward_model.path != PREVIOUS_STAGE:  # "" is the critic's path
            rows.append((key, config.ppo.reward_model.path, "rm", length))
    return rows


def check_sequence_fits(model_path: str, length: int, key: str) -> None:
    """A learned-position model (OPT) has no position beyond its table: a longer sequence would
    read past it (NaN from the first step). Rotary models extrapolate, so only those are checked."""
    model = DecoderConfig.from_hf(read_hf_config(model_path))
    if model.positions == "learned" and length > model.max_position_embeddings:
        raise ValueError(
            f"{key}={length} exceeds the max_position_embeddings={model.max_position_embeddings} of "
            f"{model_path} (learned positions); lower it"
        )
