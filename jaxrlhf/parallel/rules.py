"""Sharding as data: logical axis names on every parameter, mapped to mesh axes by rule tables.

Training keeps every large weight sharded over `fsdp` (ZeRO-3 style: XLA all-gathers a layer's
weights just before use and reduce-scatters its gradients), with heads and MLP over `tensor`
when the mesh has one. Generation replicates over `fsdp` and splits heads, MLP and vocabulary
over `tensor` (Megatron-style tensor parallelism); the `fsdp` devices then act as data-parallel
replicas. A run may override any rule from its config (`mesh.training_rules`,
`mesh.generation_rules`). A mesh axis is dropped from a dimension it does not divide, so any
model fits any mesh; when that leaves a large weight less sharded than its rule asks, a
`ShardingWarning` names the parameter and the axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, object], ...]
# Every logical axis name the models use, for checking configured rules.
LOGICAL_AXES = (
    "batch",
    "layers",
    "vocab",
    "embed",
    "embed_proj",
    "positions",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "norm",
    "lora_rank",
)
# A weight at least this large that a rule cannot shard as asked is reported.
WARN_REPLICATED_BYTES = 16 * 2**20


class ShardingWarning(UserWarning):
    """A weight is less sharded than its rule asks, because a mesh axis does not divide it."""


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


def with_overrides(rules: Rules, overrides: Mapping[str, Sequence[str]] | None) -> Rules:
    """`rules` with the logical axes named in `overrides` mapped to the given mesh axes instead
    (an empty list: replicated); the other rules are kept."""
    if not overrides:
        return rules
    table = dict(rules)
    table.update({name: tuple(axes) for name, axes in overrides.items()})
    return tuple(table.items())


def logical_to_spec(axes, shape, rules: Rules, mesh: Mesh, dropped: list | None = None) -> PartitionSpec:
    """PartitionSpec for one array: each logical axis takes its rule's mesh axes, leaving out
    axes of size 1, axes already used by an earlier dimension, and axes that do not divide it
    (those are appended to `dropped` as (logical axis, mesh axis, dimension size))."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        wanted = table.get(name)
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        chosen = []
        for axis in wanted:
            axis_size = mesh.shape[axis]
            if axis_size == 1 or axis in used:
                continue
            if size % (math.prod(mesh.shape[a] for a in chosen) * axis_size):
                if dropped is not None:
                    dropped.append((name, axis, size))
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
    """A pytree like `state` (an nnx.State of Variables with `axes` metadata) of PartitionSpecs.
    Warns (`ShardingWarning`) for each large weight a mesh axis could not divide."""

    def spec(path, variable):
        value = variable.get_value()
        axes = getattr(variable, "axes", None) or (None,) * len(value.shape)
        dropped = []
        result = logical_to_spec(axes, value.shape, rules, mesh, dropped)
        nbytes = math.prod(value.shape) * value.dtype.itemsize
        for name, axis, size in dropped if nbytes >= WARN_REPLICATED_BYTES else ():
            where = "/".join(str(getattr(key, "key", key)) for key in path)
            warnings.warn(
                f"{where} ({nbytes / 2**20:.0f} MiB): its {name} dimension ({size}) is not divisible by "
                f"mesh axis {axis!r} ({mesh.shape[axis]}), so it is not sharded over {axis!r}",
                ShardingWarning,
                stacklevel=3,
            )
        return variable.replace(value=result)

    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=_is_variable)


def state_shardings(state, rules: Rules, mesh: Mesh):
    """NamedShardings for every array in `state`, as a pytree of the same structure."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(state, rules, mesh),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


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


_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("jaxrlhf_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules):
    """While a jitted function is traced inside this context, `constrain` pins activations to
    `rules` on `mesh` (mesh None: to nothing); outside it, `constrain` does nothing. JAX caches a
    function's trace, so the context must be active when the function is first traced (the run
    enters it before any step builds its jitted functions); a module-level jitted function enters
    it itself, from a static argument (`generate_from_state`), so each layout has its own trace."""
    token = _ACTIVATION_SHARDING.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def constrain(x, logical_axes):
    """`with_sharding_constraint` of x by its logical axes under the active activation sharding,
    so XLA's propagation is not left to guess (e.g. the residual stream: rows over the data axes)."""
    active = _ACTIVATION_SHARDING.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, rules, mesh)))
