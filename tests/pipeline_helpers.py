"""Running `python -m jaxrlhf.train` in a subprocess the way a user does: one CPU device, tiny sizes."""

import os
import subprocess
import sys

TINY = [
    "data.builtin_size=2000",
    "sft.max_steps=6",
    "rm.max_steps=6",
    "sft.batch_size=8",
    "rm.batch_size=8",
    "sft.eval_every=0",
    "rm.eval_every=0",
    "sft.eval_batches=1",
    "rm.eval_batches=1",
    "ppo.num_iterations=4",
    "ppo.prompts_per_iteration=8",
    "ppo.num_minibatches=2",
    "ppo.eval_prompts=8",
    "log_every=1",
    "checkpoint.every_steps=3",
    "tensorboard=false",
]


def train(output_dir, cache_dir, *overrides, env_extra=None, module="jaxrlhf.train"):
    """Runs the CLI with the tiny settings; returns the CompletedProcess."""
    argv, env = command(output_dir, cache_dir, overrides, env_extra, module)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)


def start_train(output_dir, cache_dir, *overrides) -> subprocess.Popen:
    """Starts the CLI with the tiny settings and returns at once (stdout and stderr piped, as text)."""
    argv, env = command(output_dir, cache_dir, overrides)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def command(output_dir, cache_dir, overrides, env_extra=None, module="jaxrlhf.train"):
    """(argv, environment) of a tiny CLI run on one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a plain CPU run
    env.update(JAX_PLATFORMS="cpu", **(env_extra or {}))
    argv = [sys.executable, "-m", module, *TINY, f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *overrides]
    return argv, env
