"""The training loop shared by step 1 (SFT) and step 2 (reward model).

Batches come from a resumable iterator, go through one jitted update in the FSDP layout, and
every `checkpoint.every_steps` the parameters, optimizer state, step and data position are
saved, so a killed run resumes with exactly the batches and state it would have had.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.checkpoint import maybe_kill_after_checkpoint
from jaxrlhf.data.batches import BatchIterator, BatchPosition
from jaxrlhf.metrics import count_params, progress, throughput, training_flops_per_token
from jaxrlhf.models import export_model, load_tokenizer
from jaxrlhf.models.lora import adapters_off
from jaxrlhf.preflight import check_sequence_fits
from jaxrlhf.run_context import RunContext
from jaxrlhf.train_state import (
    LossFn,
    check_bad_steps,
    check_trained,
    init_train_state,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    shardings_of,
    split_for_training,
)


@dataclasses.dataclass
class SupervisedJob:
    """What makes step 1 or step 2 itself; everything else is this module's."""

    name: str  # "sft" or "rm": the log prefix, the output subdirectory, the data slice
    stage: object  # SFTConfig or RMConfig
    previous_step: str | None  # whose export an empty model path means
    value_head: bool  # a reward model (value head) instead of a causal LM
    tokenize: Callable  # (records, tokenizer) -> arrays of the step's batches
    loss_fn: LossFn  # (model, batch) -> (loss, metrics); also used for evaluation
    count_tokens: Callable[[dict[str, np.ndarray]], int]  # real tokens in a batch, for throughput
    data_seed: int
    # DPO: graphdef -> a jitted (params, frozen, batch, microbatches) -> arrays added to each batch,
    # run on the frozen reference (the starting weights, or under LoRA the base with adapters off)
    reference: Callable | None = None


def run_supervised(ctx: RunContext, job: SupervisedJob) -> tuple[dict, dict]:
    """Loads the model and the step's data, trains, exports <output_dir>/<name>/model (HF format
    with the tokenizer); returns the eval metrics before and after training."""
    model_path = ctx.model_path(job.stage.model.path, previous_step=job.previous_step)
    tokenizer = load_tokenizer(model_path)
    data = ctx.step_data(job.name)
    print(f"[{job.name}] {len(data.train)} train / {len(data.eval)} eval records; {data.report}", flush=True)
    train_arrays, eval_arrays = job.tokenize(data.train, tokenizer), job.tokenize(data.eval, tokenizer)
    check_sequence_fits(model_path, job.stage.max_seq_len, f"{job.name}.max_seq_len")
    model = ctx.load_model(
        model_path, job.stage.model, job.stage.lora, value_head=job.value_head, new_head=job.value_head
    )
    model, first, last = train_supervised(ctx, job, model, train_arrays, eval_arrays)
    export_model(model, ctx.step_dir(job.name, "model"), model_path, max_shard_size=ctx.config.export_max_shard_size)
    return first, last


def total_steps(stage, rows: int) -> int:
    return stage.max_steps if stage.max_steps > 0 else stage.num_epochs * (rows // stage.batch_size)


def evaluate(
    ctx: RunContext,
    eval_step,
    params,
    frozen,
    arrays: dict[str, np.ndarray],
    batch_size: int,
    max_batches: int,
    prepare: Callable = lambda batch: batch,
) -> dict[str, float]:
    """Mean metrics over the first `max_batches` full batches of the eval set, in order."""
    rows = len(next(iter(arrays.values())))
    replicas = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    batch_size = min(batch_size, rows - rows % replicas)
    if batch_size <= 0:
        raise ValueError(f"the eval set has {rows} rows, fewer than the {replicas} data-parallel devices")
    iterator = BatchIterator(
        arrays, batch_size, seed=0, shuffle=False, process_index=jax.process_index(), process_count=jax.process_count()
    )
    totals: dict[str, float] = {}
    batches = min(max_batches, iterator.batches_per_epoch)
    for _ in range(batches):
        metrics = jax.device_get(eval_step(params, frozen, prepare(ctx.device_batch(next(iterator)))))
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value) / batches
    return totals


def train_supervised(ctx: RunContext, job: SupervisedJob, model: nnx.Module, train_arrays, eval_arrays):
    """Trains `model` on `job`; returns (trained model, first eval metrics, last eval metrics)."""
    config, stage = ctx.config, job.stage
    model_config = model.config
    graphdef, params, frozen = split_for_training(model, stage.lora.rank)
    rows = len(next(iter(train_arrays.values())))
    steps = total_steps(stage, rows)
    optimizer = make_optimizer(stage.optimizer, steps)
    schedule = learning_rate_schedule(stage.optimizer, steps)
    prepare = reference_inputs(job, graphdef, params, frozen, stage.lora.rank)
    state = init_train_state(params, frozen, optimizer)
    train_step = make_train_step(graphdef, job.loss_fn, optimizer, stage.grad_accum_steps, shardings_of(state))
    eval_step = make_eval_step(graphdef, job.loss_fn)
    iterator = BatchIterator(
        train_arrays,
        stage.batch_size,
        seed=job.data_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    checkpointer, latest = ctx.open_checkpoints(job.name)

    evaluate_now = lambda: evaluate(
        ctx,
        eval_step,
        state.params,
        state.frozen,
        eval_arrays,
        stage.batch_size,
        stage.eval_batches,
        lambda batch: prepare(state, batch, 1),  # in one piece, like the eval step: any eval batch size
    )
    state, start, first_eval = restore_or_start(ctx, job.name, checkpointer, latest, state, iterator, steps)
    if first_eval is None:
        first_eval = evaluate_now()  # before any training: kept in every checkpoint for the summary
        ctx.logger.log(0, first_eval, prefix=f"{job.name}/eval")
        check_trained(job.name, state, f"{job.name}.model.path", first_eval)
    flops_per_token = step_flops_per_token(state, model_config, stage.max_seq_len)
    tokens, clock = 0, time.perf_counter()
    bar = progress(steps - start, f"{job.name}")
    for step in range(start, steps):
        local_rows = next(iterator)
        tokens += job.count_tokens(local_rows) * jax.process_count()
        state, metrics = train_step(state, prepare(state, ctx.device_batch(local_rows), stage.grad_accum_steps))
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - clock
            metrics.update(throughput(tokens, elapsed, flops_per_token))
            metrics["learning_rate"] = float(schedule(step))
            ctx.logger.log(done, metrics, prefix=job.name)
            check_bad_steps(metrics, config.max_bad_steps, f"[{job.name}] step {done}", checkpointer.describe_latest())
            tokens, clock = 0, time.perf_counter()
        if stage.eval_every and done % stage.eval_every == 0 and done != steps:
            ctx.logger.log(done, evaluate_now(), prefix=f"{job.name}/eval")
        position, seconds = dataclasses.asdict(iterator.position), ctx.step_seconds(job.name)
        metadata = {"position": position, "first_eval": first_eval, "seconds": seconds}
        if checkpointer.save(done, state.checkpoint_tree(), metadata, force=done == steps):
            maybe_kill_after_checkpoint(done)
    bar.close()
    last_eval = evaluate_now()
    ctx.logger.log(steps, last_eval, prefix=f"{job.name}/eval")
    checkpointer.close()
    check_trained(job.name, state, f"{job.name}.model.path", first_eval, last_eval, stage.optimizer.learning_rate)
    return nnx.merge(graphdef, state.params, state.frozen), first_eval, last_eval


def step_flops_per_token(state, model_config, seq_len: int) -> float:
    """The training FLOPs of one token, for TFLOP/s and MFU: the trainable parameters (all, or the
    adapters and a value head under LoRA) at 6 per token, the frozen rest (LoRA's base) at 4."""
    trainable, frozen = count_params(state.params), count_params(state.frozen)
    return training_flops_per_token(trainable, frozen, model_config.num_layers, model_config.hidden_size, seq_len)


def restore_or_start(ctx: RunContext, name: str, checkpointer, latest: int | None, state, iterator, steps: int):
    """(state, first step, first eval metrics or None): restored from the latest checkpoint (with the
    data position and the seconds run so far), or as given at step 0. The step's records in
    metrics.jsonl that this run logs again are dropped: those after the checkpoint (the final eval
    too, once the last one is written), or all of them when the step starts over."""
    if latest is None:
        ctx.logger.rewind({name: -1, f"{name}/eval": -1})
        return state, 0, None
    _, restored, metadata = checkpointer.restore_latest(state.checkpoint_tree())
    iterator.position = BatchPosition(**metadata["position"])
    start = int(restored["step"])
    ctx.add_earlier_seconds(name, metadata.get("seconds", 0.0))
    ctx.logger.rewind({name: start, f"{name}/eval": start - 1 if start == steps else start})
    print(f"[{name}] resumed from step {start} ({checkpointer.directory})", flush=True)
    return state.restored(restored), start, metadata["first_eval"]


def reference_inputs(job: SupervisedJob, graphdef, params, frozen, lora_rank: int) -> Callable:
    """`(state, batch, microbatches) -> batch` with the job's reference arrays added, computed in
    that many pieces (the batch unchanged without a reference). The reference is a copy of the
    starting weights (taken before the train state takes them over), or under LoRA the live base
    with adapters off (no copy)."""
    if job.reference is None:
        return lambda state, batch, microbatches: batch
    run_reference = job.reference(graphdef)
    if lora_rank:
        return lambda state, batch, microbatches: {
            **batch,
            **run_reference(adapters_off(state.params), state.frozen, batch, microbatches),
        }
    start = jax.tree.map(jnp.copy, (params, frozen))
    return lambda state, batch, microbatches: {**batch, **run_reference(*start, batch, microbatches)}
