"""Checks before any work: each refuses, in one line naming the key or file, an input that would
fail late, train on nothing, or quietly continue a different run.

- a resume from checkpoints made with other settings or other data (unless resume=force);
- batch sizes the data-parallel devices or the gradient accumulation do not divide, and eval sets
  smaller than the data-parallel devices;
- every step's data: read and split up front, so a bad file stops the run before a model loads;
- an empty model path (the earlier step's export) when that step is not in the run and has no export;
- sequences longer than a learned-position model's table (OPT), which would train on NaN;
- input models with integer or quantized tensors (from the safetensors headers), or a tokenizer
  with more ids than the embedding table (NaN from the first evaluation).
"""

from __future__ import annotations

import os

from jaxrlhf.config import PREVIOUS_STAGE, changed_settings
from jaxrlhf.data.fingerprint import FINGERPRINT_FILE, changed_files, read_fingerprint
from jaxrlhf.models import DecoderConfig, read_hf_config
from jaxrlhf.models.hf_io import check_model_dir
from jaxrlhf.rl.algorithms import ALGORITHMS
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.run_context import RunContext, previous_export


def preflight(ctx: RunContext) -> None:
    check_resumable(ctx)
    check_batch_sizes(ctx)
    for step in ctx.config.steps:
        data = ctx.step_data(step)
        if not data.train:
            raise ValueError(
                f"{step}: no training records in its data slice (data.data_split={ctx.config.data.data_split}): "
                f"0 records of {data.report.rows} rows read; {data.report.malformed()}"
            )
        check_eval_size(ctx, step, len(data.eval))
    checked = set()
    for path_key, key, path, previous, length in model_lengths(ctx):
        if path == PREVIOUS_STAGE and previous_export(ctx.config, previous, path_key) is None:
            continue  # this run makes that model: checked when the step starts
        model_path = ctx.model_path(path, previous)
        check_sequence_fits(model_path, length, key)
        resize = model_section(ctx.config, path_key).resize_embeddings
        if (model_path, resize) not in checked:  # the weights' finiteness is checked as they load
            check_model_dir(model_path, resize)
            checked.add((model_path, resize))


def model_section(config, path_key: str):
    """The ModelConfig a model path key belongs to: "ppo.actor_model.path" -> config.ppo.actor_model."""
    section = config
    for name in path_key.split(".")[:-1]:
        section = getattr(section, name)
    return section


def check_resumable(ctx: RunContext) -> None:
    """A step that would resume from checkpoints made with other settings (a changed learning
    rate, data, LoRA rank...) is refused, naming the keys, unless resume=force; so is one whose
    data files now hold other records (see `check_data_unchanged`)."""
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
        if changes:
            message = f"{step} would resume from {directory}, made with other settings: {'; '.join(changes)}"
            refuse_unless_forced(ctx, step, message)
        check_data_unchanged(ctx, step, directory)


def check_data_unchanged(ctx: RunContext, step: str, directory: str) -> None:
    """The records a resumed step reads must be those it started with: other records (a data file
    rewritten at the same path) are refused unless resume=force; a file touched or rewritten with
    the same content is only a warning. Checkpoints from before fingerprints resume unchecked."""
    saved = read_fingerprint(directory)
    if saved is None:
        print(f"note: {step}: {directory} has no {FINGERPRINT_FILE} (older checkpoints): data not checked", flush=True)
        return
    current = ctx.data_fingerprint(step)
    files = changed_files(saved, current)
    if saved["records_sha256"] == current["records_sha256"]:
        if files:
            print(f"warning: {step}: data files changed, the records it reads did not: {'; '.join(files)}", flush=True)
        return
    where = f"{'; '.join(files)}; " if files else ""
    refuse_unless_forced(
        ctx, step, f"{step} would resume from {directory}, but its data changed: {where}the records it reads differ"
    )


def refuse_unless_forced(ctx: RunContext, step: str, message: str) -> None:
    if ctx.config.resume != "force":
        raise ValueError(
            f"{message}. Use resume=force to continue anyway, resume=never to start {step} over, or another output_dir"
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


def check_eval_size(ctx: RunContext, step: str, rows: int) -> None:
    """A supervised step's eval batches (cut to what the eval set holds, any size: DPO's reference
    runs on them in one piece) need a row for each data-parallel device."""
    replicas = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    if step in ("sft", "rm", "dpo") and rows < replicas:
        data = ctx.config.data
        raise ValueError(
            f"{step}: {rows} eval records (data.eval_fraction={data.eval_fraction}, data.eval_sources: "
            f"{len(data.eval_sources)}) are fewer than the {replicas} data-parallel devices (mesh data x fsdp)"
        )


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


def model_lengths(ctx: RunContext) -> list[tuple[str, str, str, str | None, int]]:
    """(path key, length key, model path, step it may come from, longest sequence) for every model
    of the run."""
    config, rows = ctx.config, []
    for step in ("sft", "rm", "dpo"):
        if step in config.steps:
            stage = getattr(config, step)
            previous = None if step == "sft" else "sft"
            rows.append((f"{step}.model.path", f"{step}.max_seq_len", stage.model.path, previous, stage.max_seq_len))
    if "ppo" in config.steps:
        length = config.ppo.max_prompt_seq_len + config.ppo.max_answer_seq_len
        key = "ppo.max_prompt_seq_len + max_answer_seq_len"
        rows.append(("ppo.actor_model.path", key, config.ppo.actor_model.path, "sft", length))
        needs_critic = ALGORITHMS[config.ppo.algorithm].needs_critic
        uses_model = RewardMix.from_config(config.ppo.reward, config.ppo.reward_weights).uses_model
        if needs_critic or uses_model:
            rows.append(("ppo.critic_model.path", key, config.ppo.critic_model.path, "rm", length))
        if uses_model and config.ppo.reward_model.path != PREVIOUS_STAGE:  # "" is the critic's path
            rows.append(("ppo.reward_model.path", key, config.ppo.reward_model.path, "rm", length))
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
