"""Bytes per device of one training job, from shapes alone: what a step holds and what it makes.

State is counted exactly (every array's local shard under the run's rules and mesh). Activations
are what JAX itself keeps for the backward pass: the residuals of one block's VJP under each
remat policy, traced with `jax.eval_shape` at the per-device microbatch (heads and MLP split over
`tensor`), times the number of blocks, plus one block's full working set while its backward runs,
plus the LM head's float32 logits (a chunk of them: `models.outputs`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import REMAT_POLICIES, CausalLM, ValueModel, attention_mask_4d
from jaxrlhf.models.layers import DecoderLayer, rope_inverse_frequencies
from jaxrlhf.models.lora import apply_lora, trainable_filter
from jaxrlhf.models.outputs import LOGITS_CHUNK_ELEMENTS
from jaxrlhf.parallel.rules import Rules, logical_to_spec
from jaxrlhf.train_state import split_for_training

POLICIES = ("none", "dots", "block")  # least recomputation first
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Job:
    """One jitted training job: the model, what trains, the rows of an optimizer step, the sequence."""

    name: str  # e.g. "sft", "rm", "ppo actor"
    config: DecoderConfig
    value_head: bool
    lora_rank: int
    batch: int  # global rows per optimizer step
    grad_accum: int
    seq: int


@dataclasses.dataclass
class Estimate:
    """Bytes per device."""

    params: int  # what the optimizer updates (float32 master weights, or the adapters)
    frozen: int  # the rest of the model (the base under LoRA)
    optimizer: int  # Adam's two moments
    grads: int  # float32 gradients (and their running sum over micro-batches when accumulating)
    working: int  # compute-dtype copy of the weights, and one layer gathered whole (FSDP)
    activations: dict[str, int]  # kept for the backward pass, per remat policy
    logits: int  # the LM head's float32 logits and their gradient (one chunk)

    @property
    def state(self) -> int:
        return self.params + self.frozen + self.optimizer

    def total(self, policy: str) -> int:
        return self.state + self.grads + self.working + self.activations[policy] + self.logits


def abstract_model(config: DecoderConfig, value_head: bool, lora_rank: int):
    """The model as shapes (no weights), with adapters if `lora_rank`."""

    def build():
        model = (ValueModel if value_head else CausalLM)(config, nnx.Rngs(0))
        if lora_rank:
            apply_lora(model, lora_rank, 2.0 * lora_rank, LORA_TARGETS)
        return model

    return nnx.eval_shape(build)


def device_bytes(state, rules: Rules, mesh: Mesh) -> int:
    """Bytes of one device's shards of every array of an nnx State, under `rules` on `mesh`."""
    total = 0
    for _, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        spec = logical_to_spec(getattr(variable, "axes", None) or (None,) * len(value.shape), value.shape, rules, mesh)
        shards = math.prod(math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s)) for s in spec if s)
        total += math.prod(value.shape) * jnp.dtype(value.dtype).itemsize // shards
    return total


def estimate(job: Job, rules: Rules, mesh: Mesh, platform: str = "gpu") -> Estimate:
    """Bytes per device of `job`'s training step on `mesh`. `platform="cpu"` adds what XLA:CPU
    alone allocates (it has no bfloat16 matmul: each block keeps float32 copies of its bf16
    weights for the backward pass), so the figure compares with a CPU dry run."""
    config, tensor = job.config, mesh.shape["tensor"]
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    _, params, frozen = split_for_training(abstract_model(config, job.value_head, job.lora_rank), job.lora_rank)
    params_bytes, frozen_bytes = device_bytes(params, rules, mesh), device_bytes(frozen, rules, mesh)
    compute_size, param_size = jnp.dtype(config.compute_dtype).itemsize, jnp.dtype(config.param_dtype).itemsize
    layer_elements = layer_weight_elements(config) // tensor if config.num_layers else 0
    rows = max(1, job.batch // job.grad_accum // replicas)
    local = tensor_local(config, tensor)
    residuals = {policy: block_residual_bytes(local, rows, job.seq, policy, job.lora_rank) for policy in POLICIES}
    # every block's residuals, and while one block's backward runs, what it recomputes
    activations = {
        policy: config.num_layers * residuals[policy] + (policy != "none") * residuals["none"] for policy in POLICIES
    }
    if platform == "cpu" and compute_size < 4:
        upcast = config.num_layers * layer_elements * 4 // (1 if job.lora_rank else replicas)
        upcast *= 2 if param_size < 4 else 1  # weights stored in bf16: one float32 copy forward, one backward
        activations = {policy: value + upcast for policy, value in activations.items()}
        # and the matmul outputs that "dots" keeps stay float32 there
        activations["dots"] += (activations["dots"] - activations["block"]) * (4 // compute_size - 1)
    vocab_shard = 1 if job.value_head else config.vocab_size // (tensor if config.vocab_size % tensor == 0 else 1)
    cast = compute_size < jnp.dtype(config.param_dtype).itemsize
    return Estimate(
        params=params_bytes,
        frozen=frozen_bytes,
        optimizer=2 * params_bytes,
        grads=params_bytes * (2 if job.grad_accum > 1 else 1),  # accumulating: the running sum too
        # the compute-dtype copy of the weights, and under FSDP a block gathered whole, in the
        # stored dtype and cast (XLA gathers float32 master weights before the cast)
        working=int(cast) * (params_bytes + frozen_bytes) * compute_size // 4
        + (mesh.shape["fsdp"] > 1) * layer_elements * (param_size + compute_size),
        activations=activations,
        # the LM head's float32 logits and their gradient, one chunk at a time
        logits=2 * 4 * min(rows * job.seq * vocab_shard, LOGITS_CHUNK_ELEMENTS),
    )


def tensor_local(config: DecoderConfig, tensor: int) -> DecoderConfig:
    """The per-device shapes of one block under tensor parallelism: heads and MLP split where
    `tensor` divides them (the rules leave an indivisible axis whole)."""
    split = lambda n: n // tensor if n % tensor == 0 else n
    if tensor == 1 or config.num_heads % tensor or config.num_kv_heads % tensor:
        heads, kv_heads = config.num_heads, config.num_kv_heads  # attention stays whole
    else:
        heads, kv_heads = config.num_heads // tensor, config.num_kv_heads // tensor
    return dataclasses.replace(
        config, num_heads=heads, num_kv_heads=kv_heads, intermediate_size=split(config.intermediate_size)
    )


def layer_weight_elements(config: DecoderConfig) -> int:
    """Elements of one block's weights."""
    layer = nnx.eval_shape(lambda: DecoderLayer(config, nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(layer)))


def block_residual_bytes(config: DecoderConfig, rows: int, seq: int, policy: str, lora_rank: int = 0) -> int:
    """Bytes one block keeps for its backward pass at [rows, seq] under a remat policy: the
    residuals of its VJP as JAX traces them (its own weights excluded), with respect to its input
    and what trains (under LoRA only the adapters: no weight gradient of the frozen base)."""

    def build():
        layer = DecoderLayer(config, nnx.Rngs(0))
        if lora_rank:
            apply_lora(layer, lora_rank, 2.0 * lora_rank, LORA_TARGETS)
        return layer

    graphdef, weights, frozen = nnx.split(nnx.eval_shape(build), trainable_filter(lora_rank), ...)
    inv_freq = rope_inverse_frequencies(config)

    def block(x, weights, frozen):
        positions = jnp.broadcast_to(jnp.arange(seq), (rows, seq))
        slots = jnp.arange(seq)
        mask = attention_mask_4d(jnp.ones((rows, seq), bool), slots, slots, config.window(0))
        layer = nnx.merge(graphdef, weights, frozen)
        return layer(x, lambda attn, h: (attn(h, positions, mask, inv_freq), None))[0]

    if policy in REMAT_POLICIES:
        block = jax.checkpoint(block, policy=REMAT_POLICIES[policy])
    x = jax.ShapeDtypeStruct((rows, seq, config.hidden_size), config.compute_dtype)
    vjp = lambda x, weights, frozen: jax.vjp(lambda x, weights: block(x, weights, frozen), x, weights)[1]
    residuals = jax.eval_shape(vjp, x, weights, frozen)
    # the weights and their compute-dtype casts: the train step casts the weights once, outside the blocks
    weights = jax.tree.leaves(weights) + jax.tree.leaves(frozen)
    weight_ids = {(tuple(w.shape), jnp.dtype(d)) for w in weights for d in (w.dtype, config.compute_dtype)}
    kept = [r for r in jax.tree.leaves(residuals) if (tuple(r.shape), jnp.dtype(r.dtype)) not in weight_ids]
    # Softmax leaves three float32 [.., seq, seq] residuals (logits, their exponent, the
    # probabilities); XLA fuses the middle one away and keeps two.
    scores = [r for r in kept if r.shape[-2:] == (seq, seq) and jnp.issubdtype(r.dtype, jnp.floating)]
    fused = sorted(scores, key=lambda r: math.prod(r.shape))[: max(0, len(scores) - 2)]
    return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in kept) - sum(
        math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in fused
    )
