"""What every trained model shares: the optimizer, the sharded train state, one jitted update.

The model is split into a static graph, the trainable parameters (all of them, or only the LoRA
adapters) and the frozen rest. The update is a pure function of that state and a batch:
microbatches are scanned inside the jit (gradient accumulation), the optimizer state is created
already sharded like the parameters (one compile), and the state is donated, so the update runs
in place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.models.lora import trainable_filter

LossFn = Callable[[nnx.Module, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class WholeBatchMean:
    """A loss whose terms are means over the tokens (or rows) of the whole batch, so that gradient
    accumulation gives exactly the one-batch result: `loss(model, microbatch, totals)` divides its
    sums by the WHOLE batch's denominators `totals = count(batch)`, so the microbatches' losses,
    metrics and gradients add up to the one-batch values, whatever the memory plan chose. Called
    as a plain `LossFn` it is the one-batch loss."""

    loss: Callable[[nnx.Module, dict, dict], tuple[jax.Array, dict]]
    count: Callable[[dict], dict]  # batch -> {name: denominator over the whole batch}

    def __call__(self, model, batch):
        return self.loss(model, batch, self.count(batch))


def learning_rate_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio * lr, or constant."""
    peak = optimizer_config.learning_rate
    warmup = min(optimizer_config.warmup_steps, max(total_steps - 1, 0))
    floor = peak * optimizer_config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optimizer_config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optimizer_config.min_lr_ratio)
    elif optimizer_config.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stops (exit code 3)."""


# apply_if_finite gives up and applies a non-finite update after this many in a row: never.
NEVER_APPLY_NON_FINITE = 2**31 - 1


def make_optimizer(optimizer_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (norm computed in float32), behind a non-finite guard: an
    update whose gradients hold a NaN or an inf is not applied (the parameters and the optimizer
    state stay as they were) and is counted in the state (`bad_step_counts`)."""
    clip = optimizer_config.max_grad_norm
    adamw = optax.adamw(
        learning_rate_schedule(optimizer_config, total_steps),
        b1=optimizer_config.b1,
        b2=optimizer_config.b2,
        eps=optimizer_config.eps,
        weight_decay=optimizer_config.weight_decay,
    )
    clipped = optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), adamw)  # 0 = no clip
    return optax.apply_if_finite(clipped, max_consecutive_errors=NEVER_APPLY_NON_FINITE)


def bad_step_counts(opt_state) -> dict[str, jax.Array]:
    """Steps skipped by the non-finite guard: in a row up to now, and in all."""
    return {"consecutive_bad_steps": opt_state.notfinite_count, "bad_steps": opt_state.total_notfinite}


def poisoned_if_loss_not_finite(grads, loss):
    """The gradients, made NaN when the loss is not finite, so the guard skips that step too."""
    return jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)


def check_bad_steps(metrics: dict, max_bad_steps: int, where: str, last_checkpoint: str) -> None:
    """Raises TrainingDiverged once `max_bad_steps` optimizer steps in a row were skipped."""
    counts = {key: value for key, value in metrics.items() if key.endswith("consecutive_bad_steps")}
    for key, value in counts.items():
        if value >= max_bad_steps:
            raise TrainingDiverged(
                f"{where}: {int(value)} optimizer steps in a row had a non-finite loss or gradient ({key}) and were "
                f"skipped; stopping (max_bad_steps={max_bad_steps}). Lower the learning rate or check the data; "
                f"the last good checkpoint is {last_checkpoint}"
            )


def finite_numbers(metrics: dict) -> bool:
    """Every number among `metrics` is finite (None and text are not numbers)."""
    return all(math.isfinite(value) for value in metrics.values() if isinstance(value, (int, float)))


def tree_is_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def check_trained(
    step: str, state: TrainState, model_key: str, first_eval: dict, last_eval: dict | None = None, lr: float = 0.0
) -> None:
    """Raises TrainingDiverged (exit 3, before any export) for a step that took no good optimizer
    step: its first evaluation not finite, every update skipped as non-finite, or (given the last
    evaluation) training that made it non-finite. Names the first cause in view: the input model
    (non-finite weights, seen while no update was applied), the data batches, the learning rate."""
    updates, bad = (int(x) for x in jax.device_get((state.step, state.opt_state.total_notfinite)))
    untouched = updates == bad  # no update applied: the weights are still the input model's
    if not finite_numbers(first_eval):
        problem = "the first evaluation is not finite"
    elif updates and untouched:
        problem = f"all {updates} optimizer steps were skipped (non-finite loss or gradient)"
    elif last_eval is not None and not finite_numbers(last_eval):
        problem = f"the last evaluation is not finite ({bad} of {updates} optimizer steps skipped)"
    else:
        return
    if untouched and not tree_is_finite((state.params, state.frozen)):
        cause = f"the input model ({model_key}) has non-finite weights"
    elif untouched or not finite_numbers(first_eval):
        cause = (
            f"the data batches give a non-finite loss or gradient on the input model ({model_key}), whose weights "
            "are finite; check the data and the model's scale"
        )
    else:
        cause = f"training made the evaluation non-finite; lower the learning rate ({lr})"
    raise TrainingDiverged(f"[{step}] {problem}: {cause}; nothing exported")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # what the optimizer updates (float32 master weights)
    frozen: nnx.State  # everything else of the model (e.g. the base weights under LoRA)
    opt_state: Any

    def checkpoint_tree(self) -> dict:
        """What a checkpoint holds of this state (the frozen weights come from the model files)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    def restored(self, tree: dict) -> TrainState:
        """This state with the values of a restored `checkpoint_tree`."""
        return dataclasses.replace(self, **tree)

    def apply_gradients(self, grads, optimizer: optax.GradientTransformation) -> TrainState:
        """One optimizer step."""
        updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
        return dataclasses.replace(
            self, step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
        )


def split_for_training(model: nnx.Module, lora_rank: int):
    """(graphdef, trainable params, frozen rest) of a model."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(lora_rank), ...)
    return graphdef, params, frozen


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: nnx.State):
    """Where each leaf of the optimizer state lives: a leaf shaped like a parameter (Adam's two
    moments) is sharded like that parameter, the counters are replicated. Left to propagation,
    `zeros_like` of a sharded parameter comes out replicated: every device would hold all of
    Adam's state, and FSDP would save nothing on it."""
    shardings = jax.tree.map(lambda p: p.sharding, params)
    first = jax.tree.leaves(shardings)[0]
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    abstract = jax.eval_shape(optimizer.init, params)
    return optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract, shardings, transform_non_params=lambda _: replicated
    )


def train_state_initializer(optimizer: optax.GradientTransformation, params: nnx.State):
    """A jitted `(params, frozen) -> TrainState`: the optimizer state is created under jit from the
    sharded params, sharded like them (`optimizer_state_shardings`), never materialized whole.
    `params` may be arrays or `jax.ShapeDtypeStruct`s with shardings (the planner's dry run)."""
    opt_shardings = optimizer_state_shardings(optimizer, params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def init(params, frozen):
        opt_state = jax.lax.with_sharding_constraint(optimizer.init(params), opt_shardings)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=opt_state)

    return init


def init_train_state(params: nnx.State, frozen: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
    """The train state of sharded params. Every leaf comes out committed to its devices, as the
    train step's outputs will be, so the step compiles once; `params` and `frozen` are donated
    (moved into the state, not copied)."""
    return train_state_initializer(optimizer, params)(params, frozen)


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[batch, ...] -> [microbatches, batch / microbatches, ...] for each array."""

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_microbatches} microbatches")
        return x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:])

    return jax.tree.map(split, batch)


# Tables read by a gather (and reused by a tied LM head) keep their dtype: their gradient sums many
# rows' contributions, which bf16 would round.
KEEP_DTYPE = ("embed_tokens", "embed_positions")


def compute_copy(tree, dtype):
    """The weight matrices of `tree` in the compute dtype (vectors such as norm scales, and the
    embedding tables, stay as they are): made once per step, so microbatches and recomputation do
    not cast the master weights again."""

    def cast(path, x):
        names = {getattr(key, "key", None) for key in path}
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 and not names & set(KEEP_DTYPE):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, tree)


def accumulate_gradients(loss_fn: LossFn, graphdef, params, frozen, batch: dict, num_microbatches: int):
    """Loss, float32 gradients and metrics of the batch, its microbatches scanned (constant memory in
    their number). A `WholeBatchMean` loss gets the whole batch's denominators, and its microbatch
    values are summed: equal to one batch within float32 rounding. Any other loss is averaged over
    microbatches (exact for a mean over equal-size rows, e.g. pairs). The forward and backward run
    on a compute-dtype copy of the weights, made once: the gradient of the master weights is that of
    the copy (the same values the per-use cast gave)."""
    compute_dtype = nnx.merge(graphdef, params, frozen).config.compute_dtype
    working, frozen = compute_copy(params, compute_dtype), compute_copy(frozen, compute_dtype)
    if isinstance(loss_fn, WholeBatchMean):
        totals = loss_fn.count(batch)
        microbatch_loss, combine = lambda model, part: loss_fn.loss(model, part, totals), jnp.sum
    else:
        microbatch_loss, combine = loss_fn, jnp.mean

    def loss_of(working, microbatch):
        return microbatch_loss(nnx.merge(graphdef, working, frozen), microbatch)

    value_and_grad = jax.value_and_grad(loss_of, has_aux=True)

    def grad_fn(microbatch):
        (loss, metrics), grads = value_and_grad(working, microbatch)
        return (loss, metrics), jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    if num_microbatches == 1:
        (loss, metrics), grads = grad_fn(batch)
        return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics

    def body(grad_sum, microbatch):
        (loss, metrics), grads = grad_fn(microbatch)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grad_sum, (losses, metrics) = jax.lax.scan(body, zeros, split_microbatches(batch, num_microbatches))
    scale = 1.0 if combine is jnp.sum else 1.0 / num_microbatches
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
    return combine(losses), grads, jax.tree.map(lambda m: combine(m, axis=0), metrics)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def shardings_of(tree):
    """The sharding of every array (or sharded `jax.ShapeDtypeStruct`) of a pytree."""
    return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(
    graphdef, loss_fn: LossFn, optimizer: optax.GradientTransformation, num_microbatches: int, state_shardings=None
):
    """A jitted `(state, batch) -> (state, metrics)`; the state is donated (updated in place). With
    `state_shardings` (`shardings_of(state)`) the new state comes out laid out exactly as the old
    (propagation alone may move a replicated vector onto a mesh axis, and the next call would
    compile again)."""

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_shardings, None) if state_shardings else None)
    def train_step(state: TrainState, batch: dict):
        loss, grads, metrics = accumulate_gradients(
            loss_fn, graphdef, state.params, state.frozen, batch, num_microbatches
        )
        state = state.apply_gradients(poisoned_if_loss_not_finite(grads, loss), optimizer)
        metrics = dict(metrics, loss=loss, grad_norm=global_norm(grads), **bad_step_counts(state.opt_state))
        return state, metrics

    return train_step


def make_eval_step(graphdef, loss_fn: LossFn):
    """A jitted `(params, frozen, batch) -> metrics` with the loss under "loss"."""

    @jax.jit
    def eval_step(params, frozen, batch):
        loss, metrics = loss_fn(nnx.merge(graphdef, params, frozen), batch)
        return dict(metrics, loss=loss)

    return eval_step
