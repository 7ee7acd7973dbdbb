"""Two processes on 127.0.0.1 under jax.distributed (gloo collectives) behave like one process."""

import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import padded_batch, save_tiny_model, torch_logits

from jaxrlhf.models import load_pretrained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharded_forward_and_export(tmp_path):
    model_dir = save_tiny_model("llama_gqa_llama3", str(tmp_path))
    out = str(tmp_path / "logits.npy")
    port = str(free_port())
    here = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here]))
    env.pop("XLA_FLAGS", None)
    workers = [
        subprocess.Popen(
            [sys.executable, os.path.join(here, "multihost_worker.py"), str(i), port, model_dir, out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

    ids, mask = padded_batch([12, 5, 9, 1, 12, 7, 3, 10], 12, left=True)
    expected = np.asarray(load_pretrained(model_dir)(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5, rtol=1e-5)
    exported = torch_logits(out + ".export", ids, mask)
    np.testing.assert_allclose(exported[mask == 1], expected[mask == 1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # ~200 s: the pipeline in two processes
def test_two_process_pipeline_runs_end_to_end(tmp_path):
    """`python -m jaxrlhf.train` as a cluster launcher would start it: two processes of two CPU
    devices each, one mesh over all four; every step trains, checkpoints and exports."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    tiny = [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.builtin_size=1000",
        "sft.max_steps=4",
        "rm.max_steps=4",
        "sft.batch_size=8",
        "rm.batch_size=8",
        "ppo.num_iterations=2",
        "ppo.prompts_per_iteration=8",
        "ppo.num_minibatches=2",
        "ppo.eval_prompts=8",
        "log_every=1",
        "tensorboard=false",
        "distributed.initialize=always",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
    ]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxrlhf.train", *tiny, f"distributed.process_id={i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
    assert "on 4 device(s)" in logs[0]
    import json

    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert {"sft.eval_loss_end", "rm.eval_accuracy", "ppo.gold_reward_ppo", "ppo.kl_to_sft"} <= summary.keys()
    for role in ("sft/model", "rm/model", "ppo/actor", "ppo/critic"):
        assert os.path.exists(tmp_path / "run" / role / "model.safetensors"), role


@pytest.mark.slow  # ~100 s: waits out the heartbeat timeout
def test_a_dead_peer_stops_the_survivor_within_a_minute(tmp_path):
    """Kill one of two processes mid-training: the other must not hang on a collective, but exit
    non-zero within 60 s (the coordination service's heartbeat timeout, 30 s by default)."""
    import signal
    import time

    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        PYTHONUNBUFFERED="1",
    )
    settings = [
        f"output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.builtin_size=1000",
        "steps=[sft]",
        "sft.max_steps=100000",
        "sft.batch_size=8",
        "log_every=1",
        "tensorboard=false",
        "distributed.initialize=always",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
    ]
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxrlhf.train", *settings, f"distributed.process_id={i}"],
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 300
        while "[sft] step 2 " not in (tmp_path / "process0.log").read_text():  # both are training
            assert time.time() < deadline and workers[0].poll() is None, (tmp_path / "process0.log").read_text()[-3000:]
            time.sleep(1)
        workers[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = workers[0].wait(timeout=120)
        assert time.time() - killed_at < 60 and code != 0, (code, time.time() - killed_at)
    finally:
        for worker in workers:
            worker.kill()
        for log in logs:
            log.close()
