"""Checkpointer: bitwise round trip of a sharded train state, retention, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxrlhf.checkpoint import Checkpointer


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("fsdp",))


def train_state(mesh, seed=0):
    """A small sharded state: params, an AdamW state after one update, a PRNG key and plain scalars."""
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    params = {
        "w": jax.device_put(jax.random.normal(jax.random.key(seed), (16, 4)), rows),  # [16, 4] over 8 devices
        "b": jnp.arange(3, dtype=jnp.bfloat16) + seed,
    }
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key(seed + 7),
        "step": 3 + seed,
        "data_position": np.array([5, 6], dtype=np.int64),
    }


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x, state
    )


def assert_bitwise_equal(restored, expected):
    restored_leaves, restored_tree = jax.tree.flatten(restored)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    assert restored_tree == expected_tree
    for got, want in zip(restored_leaves, expected_leaves):
        if isinstance(want, jax.Array) and jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            assert got.dtype == want.dtype
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        if isinstance(want, jax.Array):
            assert got.sharding == want.sharding
        assert np.asarray(got).dtype == np.asarray(want).dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharded_state_round_trips_bitwise_with_its_shardings(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpointer(tmp_path, keep=2, every_steps=10) as checkpointer:
        assert checkpointer.save(10, state, {"data_position": 640, "config": "abc"})
        restored, metadata = checkpointer.restore(abstract(train_state(mesh, seed=1)))
    assert metadata == {"data_position": 640, "config": "abc"}
    assert_bitwise_equal(restored, state)
    assert restored["params"]["w"].sharding.spec == PartitionSpec("fsdp")


def test_restore_lays_arrays_out_as_the_target_asks(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpointer(tmp_path, keep=1, every_steps=1) as checkpointer:
        checkpointer.save(1, state, {})
        target = abstract(state)
        replicated = NamedSharding(mesh, PartitionSpec())
        target["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)
        restored, _ = checkpointer.restore(target)
    assert restored["params"]["w"].sharding == replicated
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))


def test_saves_on_schedule_keeps_the_newest_and_restores_the_latest(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpointer(tmp_path, keep=2, every_steps=2) as checkpointer:
        assert checkpointer.latest_step() is None
        saved = [step for step in range(7) if checkpointer.save(step, state, {"step": step})]
        assert saved == [2, 4, 6]  # every 2nd step, none at step 0
        assert checkpointer.save(7, state, {"step": 7}, force=True)
        assert not checkpointer.save(7, state, {"step": 7}, force=True)  # never the same step twice
        assert checkpointer.all_steps() == [6, 7] and checkpointer.latest_step() == 7
        assert checkpointer.restore(abstract(state))[1] == {"step": 7}
        assert checkpointer.restore(abstract(state), step=6)[1] == {"step": 6}
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            checkpointer.restore(abstract(state), step=2)
        with pytest.raises(TypeError, match="not JSON-serializable"):
            checkpointer.save(8, state, {"position": np.int64(3)})


SAVE_THEN_HANG = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxrlhf.checkpoint import Checkpointer
    mesh = jax.make_mesh((8,), ("fsdp",))
    w = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, PartitionSpec("fsdp")))
    Checkpointer(sys.argv[1], keep=2, every_steps=5).save(5, {"w": w}, {"note": "before kill"})
    print("saved", flush=True)
    time.sleep(120)
""")


def test_checkpoint_survives_sigkill_right_after_save_and_half_written_ones_are_ignored(tmp_path, mesh):
    worker = subprocess.Popen(
        [sys.executable, "-c", SAVE_THEN_HANG, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert worker.stdout.readline().strip() == "saved"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    half_written = tmp_path / "10.orbax-checkpoint-tmp-1700000000"  # what a save killed midway leaves
    half_written.mkdir()
    (half_written / "junk").write_text("partial")
    target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))}
    with Checkpointer(tmp_path, keep=2, every_steps=5) as checkpointer:
        assert checkpointer.latest_step() == 5
        restored, metadata = checkpointer.restore(target)
    assert not half_written.exists()  # cleaned up when the next run opens the directory
    assert metadata == {"note": "before kill"}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(32.0).reshape(8, 4))


def corrupt_truncated_array(step_dir):
    """Cut an array file of the checkpoint in half."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_dir)
        for name in names
        if "state" in root and os.path.getsize(os.path.join(root, name)) > 64 and "METADATA" not in name
    ]
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def corrupt_deleted_metadata(step_dir):
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name == "_METADATA":
                os.remove(os.path.join(root, name))


def corrupt_garbage_metadata(step_dir):
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name == "_METADATA":
                with open(os.path.join(root, name), "w") as f:
                    f.write("{ not json")


@pytest.mark.parametrize("corrupt", [corrupt_truncated_array, corrupt_deleted_metadata, corrupt_garbage_metadata])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(mesh, tmp_path, corrupt):
    state = train_state(mesh)
    with Checkpointer(tmp_path / "ckpt", keep=3, every_steps=1) as checkpointer:
        checkpointer.save(1, state, {"step": 1})
        checkpointer.save(2, train_state(mesh, seed=1), {"step": 2})
    corrupt(tmp_path / "ckpt" / "2")
    with Checkpointer(tmp_path / "ckpt", keep=3, every_steps=1) as checkpointer:
        step, restored, metadata = checkpointer.restore_latest(abstract(state))
        assert step == 1 and metadata == {"step": 1}
        assert_bitwise_equal(restored, state)
        assert checkpointer.all_steps() == [1]
    assert os.path.isdir(tmp_path / "ckpt" / "2.corrupt")


def test_a_target_that_fits_no_checkpoint_moves_nothing(mesh, tmp_path):
    """When every checkpoint fails (a changed model, not a damaged file), nothing is set aside."""
    with Checkpointer(tmp_path / "ckpt", keep=3, every_steps=1) as checkpointer:
        checkpointer.save(1, train_state(mesh), {"step": 1})
        checkpointer.save(2, train_state(mesh), {"step": 2})
        other = {"params": {"w": jax.ShapeDtypeStruct((3, 3), jnp.float32)}}
        with pytest.raises(ValueError, match=r"checkpoint 2 in .* does not restore"):
            checkpointer.restore_latest(other)
        assert checkpointer.all_steps() == [1, 2]


def test_non_finite_values_are_never_written(mesh, tmp_path):
    from jaxrlhf.checkpoint import NonFiniteValues

    state = train_state(mesh)
    w = np.array(state["params"]["w"])
    w[0, 0] = np.nan
    state["params"]["w"] = jax.device_put(w, state["params"]["w"].sharding)
    with Checkpointer(tmp_path / "ckpt", keep=3, every_steps=1) as checkpointer:
        with pytest.raises(NonFiniteValues, match="refusing to write checkpoint 1"):
            checkpointer.save(1, state, {})
        assert checkpointer.all_steps() == []
