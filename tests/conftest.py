"""Test session set-up: eight host devices for every sharding layout, CPU only; the default run.

Tests over ~20 s carry `@pytest.mark.slow` (pyproject.toml registers it). CI runs every test;
`python -m pytest tests -q -m "not slow"` is the quick local loop (a few minutes on a laptop).
"""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The default pipeline, once per test session, as a user starts it: `python -m jaxrlhf.train`
    with no argument (only the output directory moved), on one CPU device. Returns (output
    directory, summary.json, stdout). Its SFT and reward-model exports (<out>/sft/model,
    <out>/rm/model) are the starting points of tests of the later steps, which write their runs
    elsewhere (they may share <out>/cache as their tokenized-data cache; the run itself has none)."""
    out = tmp_path_factory.mktemp("default_run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a plain CPU run
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "jaxrlhf.train", f"output_dir={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.load(open(out / "summary.json")), result.stdout
