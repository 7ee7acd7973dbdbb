"""Sharding as data: logical axis names on every parameter, mapped to mesh axes by rule tables.

Training keeps every large weight sharded over `fsdp` (ZeRO-3 style: XLA all-gathers a layer's
weights just before use and reduce-scatters its gradients), with heads and MLP over `tensor`
when the mesh has one. Generation replicates over `fsdp` and splits heads, MLP and vocabulary
over `tensor` (Megatron-style tensor parallelism); the `fsdp` devices then act as data-parallel
replicas. A mesh axis is dropped from a dimension it does not divide, so any model fits any mesh.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, object], ...]

TRAINING_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_proj", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("positions", "fsdp"),
)

GENERATION_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def logical_to_spec(axes, shape, rules: Rules, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for one array: each logical axis takes its rule's mesh axes, leaving out
    axes of size 1, axes already used by an earlier dimension, and axes that do not divide it."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        wanted = table.get(name)
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        chosen = []
        for axis in wanted:
            axis_size = mesh.shape[axis]
            if axis_size == 1 or axis in used or size % (math.prod(mesh.shape[a] for a in chosen) * axis_size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_specs(state, rules: Rules, mesh: Mesh):
    """A pytree like `state` (an nnx.State of Variables with `axes` metadata) of PartitionSpecs."""

    def spec(variable):
        value = variable.get_value()
        axes = getattr(variable, "axes", None) or (None,) * len(value.shape)
        return variable.replace(value=logical_to_spec(axes, value.shape, rules, mesh))

    return jax.tree.map(spec, state, is_leaf=_is_variable)


def state_shardings(state, rules: Rules, mesh: Mesh):
    """NamedShardings for every array in `state`, as a pytree of the same structure."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, rules, mesh),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def reshard(state, rules: Rules, mesh: Mesh, donate: bool = False):
    """Moves every array of `state` straight to its sharding under `rules`, leaf by leaf on device
    (no replicated intermediate, no host copy). With `donate`, source buffers are freed."""
    shardings = state_shardings(state, rules, mesh)
    return jax.device_put(state, shardings, donate=donate)


def shard_model(model: nnx.Module, rules: Rules, mesh: Mesh, donate: bool = False) -> nnx.Module:
    """The same module with its parameters resharded under `rules`."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, reshard(state, rules, mesh, donate=donate))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules = TRAINING_RULES) -> NamedSharding:
    """Sharding of a [batch, ...] input: rows over the data-parallel axes."""
    batch_axes = tuple(a for a in dict(rules)["batch"] if mesh.shape[a] > 1)
    first = batch_axes[0] if len(batch_axes) == 1 else (batch_axes or None)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))
