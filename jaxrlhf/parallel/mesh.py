"""The device mesh over (data, fsdp, tensor) and JAX's multi-controller start-up."""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh of all (or the given) devices; one axis may be -1 to take what the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh {_describe(sizes)}: sizes must be positive, with at most one -1")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if len(devices) % fixed:
        raise ValueError(f"mesh {_describe(sizes)} does not divide the {len(devices)} available devices")
    if free:
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices, but {len(devices)} are available"
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    if devices == list(jax.devices()):
        # jax.make_mesh orders devices so that the inner axes (tensor) sit on the fastest links.
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _describe(sizes: dict[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


CLUSTER_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME")


def maybe_initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int = 30,
) -> bool:
    """Starts JAX's multi-controller runtime when asked, or ("auto") when a cluster launcher is seen.

    Must run before anything touches a device. Unset arguments are auto-detected by JAX from
    SLURM, Kubernetes (JobSet) or TPU pod environments. A process silent for `heartbeat_timeout_s`
    is declared dead and the coordination service stops the others. Returns whether it initialized.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed.initialize must be auto, always or never, not {mode!r}")
    launched = coordinator_address is not None or any(var in os.environ for var in CLUSTER_ENV_VARS)
    if mode == "never" or (mode == "auto" and not launched):
        return False
    if mode == "auto" and os.environ.get("SLURM_NTASKS", "2") == "1" and coordinator_address is None:
        return False  # a single-task SLURM allocation needs no coordinator
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def barrier(name: str) -> None:
    """All processes wait here until each has arrived (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(array) -> np.ndarray:
    """The whole value of a (possibly sharded, possibly multi-process) array as numpy, on every process."""
    if jax.process_count() > 1 and not array.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))
