"""Device mesh, sharding rules (training = FSDP, generation = tensor parallel), resharding."""

from jaxrlhf.parallel.mesh import MESH_AXES, barrier, make_mesh, maybe_initialize_distributed, to_host
from jaxrlhf.parallel.rules import (
    GENERATION_RULES,
    LOGICAL_AXES,
    TRAINING_RULES,
    ShardingWarning,
    activation_sharding,
    batch_sharding,
    constrain,
    logical_to_spec,
    param_specs,
    reshard,
    shard_model,
    state_shardings,
    with_overrides,
)

__all__ = [
    "MESH_AXES",
    "barrier",
    "make_mesh",
    "maybe_initialize_distributed",
    "to_host",
    "GENERATION_RULES",
    "LOGICAL_AXES",
    "TRAINING_RULES",
    "ShardingWarning",
    "activation_sharding",
    "constrain",
    "with_overrides",
    "batch_sharding",
    "logical_to_spec",
    "param_specs",
    "reshard",
    "shard_model",
    "state_shardings",
]
