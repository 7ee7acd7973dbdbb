"""Checkpoints for exact resume: a pytree of (sharded) arrays plus JSON metadata, saved with orbax.

Layout: <directory>/<step>/{state, metadata}. Saving is synchronous: `save` returns once the
checkpoint is committed (orbax writes into a temporary directory and renames it), so a process
killed right after `save` returns keeps it, and one killed during a save leaves only a temporary
directory that `latest_step` never reports and the next Checkpointer deletes.

Restoring reads each array straight into the sharding and dtype of the matching leaf of a target
pytree (arrays or `jax.ShapeDtypeStruct`s with `.sharding`), so every device loads only its shard.
Typed PRNG keys (`jax.random.key`) cannot be serialized; they are saved as `jax.random.key_data`
and rebuilt with `jax.random.wrap_key_data` on restore, with no work from the caller.

Every process must call `save` and `restore`: orbax decides which process writes which file.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp

# Test hook: the process kills itself with SIGKILL right after the checkpoint of this step is
# written, to prove that a killed run resumes exactly (see tests/test_resume.py).
SIGKILL_AFTER_CHECKPOINT = "JAXRLHF_SIGKILL_AFTER_CHECKPOINT"


def maybe_kill_after_checkpoint(step: int) -> None:
    if os.environ.get(SIGKILL_AFTER_CHECKPOINT) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class Checkpointer:
    """Keeps the newest `keep` checkpoints, written every `every_steps` steps (or when forced)."""

    def __init__(self, directory: str | os.PathLike, keep: int, every_steps: int):
        if keep < 1 or every_steps < 1:
            raise ValueError(f"checkpoint keep={keep} and every_steps={every_steps} must both be >= 1")
        remote = "://" in str(directory)  # e.g. gs://bucket/run: orbax reads and writes it directly
        self.directory = str(directory) if remote else os.path.abspath(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "metadata"))

    def should_save(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, ...)` would write: on every `every_steps`-th step after 0, or forced; never twice."""
        return (force or (step > 0 and step % self.every_steps == 0)) and step not in self._manager.all_steps()

    def save(self, step: int, state: Any, metadata: dict, force: bool = False) -> bool:
        """Saves `state` (a pytree of arrays and scalars) and `metadata` (JSON) if `should_save`; returns
        whether it did. Blocks until the checkpoint is committed on disk."""
        if not self.should_save(step, force):
            return False
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"checkpoint metadata for step {step} is not JSON-serializable: {error}") from None
        self._manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(_key_to_data, state)), metadata=ocp.args.JsonSave(metadata)
            ),
        )
        self._manager.wait_until_finished()
        return True

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state, metadata) of `step` (default: the latest), with the structure, shardings and dtypes of
        `target`: a pytree like the saved one, of arrays or ShapeDtypeStructs with shardings."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory} (steps there: {self.all_steps() or 'none'})"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.map(_abstract_leaf, target)), metadata=ocp.args.JsonRestore()
            ),
        )
        state = jax.tree.map(_data_to_key, target, restored.state)
        return state, dict(restored.metadata)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _key_to_data(leaf: Any) -> Any:
    """A typed PRNG key becomes its raw uint32 key data; other leaves pass through."""
    return jax.random.key_data(leaf) if _is_typed_key(leaf) else leaf


def _abstract_leaf(leaf: Any) -> Any:
    """What orbax restores a target leaf into: arrays become ShapeDtypeStructs with their sharding."""
    if _is_typed_key(leaf):
        key_data = jax.eval_shape(jax.random.key_data, leaf)  # [*key_shape, key_words]
        return jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def _data_to_key(target_leaf: Any, restored_leaf: Any) -> Any:
    """Rebuilds a typed PRNG key from restored key data where the target holds one."""
    if not _is_typed_key(target_leaf):
        return restored_leaf
    # A concrete key names its implementation; an abstract one gets the default, checked below.
    impl = jax.random.key_impl(target_leaf) if isinstance(target_leaf, jax.Array) else None
    key = jax.random.wrap_key_data(restored_leaf, impl=impl)
    if key.dtype != target_leaf.dtype:
        raise ValueError(
            f"restored PRNG key has dtype {key.dtype}, the target wants {target_leaf.dtype}: "
            "pass a concrete key (jax.random.key) in the target instead of a ShapeDtypeStruct"
        )
    return key
