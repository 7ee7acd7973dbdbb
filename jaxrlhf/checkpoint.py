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
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxrlhf.parallel.mesh import barrier

# Test hook: the process kills itself with SIGKILL right after the checkpoint of this step is
# written, to prove that a killed run resumes exactly (see tests/test_resume.py).
SIGKILL_AFTER_CHECKPOINT = "JAXRLHF_SIGKILL_AFTER_CHECKPOINT"


def maybe_kill_after_checkpoint(step: int) -> None:
    if os.environ.get(SIGKILL_AFTER_CHECKPOINT) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class NonFiniteValues(RuntimeError):
    """Arrays about to be written hold a NaN or an inf."""


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (one reduction per array, one dispatch)."""
    floats = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)]
    flags = jax.jit(lambda arrays: [jnp.all(jnp.isfinite(x)) for x in arrays])(floats)
    return all(bool(flag) for flag in flags)


class Checkpointer:
    """Keeps the newest `keep` checkpoints, written every `every_steps` steps (or when forced)."""

    def __init__(self, directory: str | os.PathLike, keep: int, every_steps: int):
        if keep < 1 or every_steps < 1:
            raise ValueError(f"checkpoint keep={keep} and every_steps={every_steps} must both be >= 1")
        remote = "://" in str(directory)  # e.g. gs://bucket/run: orbax reads and writes it directly
        self.directory = str(directory) if remote else os.path.abspath(directory)
        self.every_steps = every_steps
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "metadata"))

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
        if not all_finite(state):
            raise NonFiniteValues(f"refusing to write checkpoint {step} in {self.directory}: it holds a NaN or inf")
        self._manager.save(
            step,
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(_key_to_data, state)), metadata=ocp.args.JsonSave(metadata)
            ),
        )
        self._manager.wait_until_finished()
        return True

    def describe_latest(self) -> str:
        """Where the newest checkpoint is, in words (for error messages)."""
        step = self.latest_step()
        return f"step {step} in {self.directory}" if step is not None else f"none yet (in {self.directory})"

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

    def restore_latest(self, target: Any) -> tuple[int, Any, dict]:
        """(step, state, metadata) of the newest checkpoint that restores. A newer one that fails
        while an older one restores is unreadable (a truncated array file, lost metadata): it is
        reported and moved aside to `<step>.corrupt`. When none restores, nothing is moved (the
        cause is then rather a changed model than a damaged file) and the first failure is raised."""
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, metadata = self.restore(target, step)
            except Exception as error:  # orbax and tensorstore raise many kinds for a damaged file
                failures.append((step, error))
                continue
            for bad_step, error in failures:
                self._set_aside(bad_step, error)
            return step, state, metadata
        if not failures:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        step, error = failures[0]
        raise ValueError(
            f"checkpoint {step} in {self.directory} does not restore ({_first_line(error)}); resume=never starts over"
        ) from error

    def _set_aside(self, step: int, error: BaseException) -> None:
        print(
            f"warning: checkpoint {step} in {self.directory} is unreadable ({_first_line(error)}); moved to "
            f"{step}.corrupt, resuming from the previous one",
            flush=True,
        )
        if jax.process_index() == 0:
            os.replace(os.path.join(self.directory, str(step)), os.path.join(self.directory, f"{step}.corrupt"))
        barrier(f"jaxrlhf set aside {self.directory}/{step}")
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "metadata"))

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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
