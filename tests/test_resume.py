"""A run killed with SIGKILL and started again ends with exactly the parameters of a run that
was never interrupted: for SFT, the reward model and PPO (bitwise, on CPU)."""

import filecmp

import pytest
from pipeline_helpers import train

from jaxrlhf.checkpoint import SIGKILL_AFTER_CHECKPOINT

pytestmark = pytest.mark.slow  # three runs per test, killed and resumed


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(default_run):
    """SFT and reward-model exports for the later steps to start from: the default run's."""
    return default_run[0]


def interrupted_and_uninterrupted(tmp_path, cache, kill_at, *overrides):
    straight = train(tmp_path / "straight", cache, *overrides)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = train(tmp_path / "resumed", cache, *overrides, env_extra={SIGKILL_AFTER_CHECKPOINT: str(kill_at)})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])  # died by SIGKILL mid-run
    resumed = train(tmp_path / "resumed", cache, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    return tmp_path / "straight", tmp_path / "resumed"


def same_file(a, b):
    return filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)


def test_sft_resumes_exactly(tmp_path, cache):
    straight, resumed = interrupted_and_uninterrupted(tmp_path, cache, 3, "steps=[sft]")
    assert same_file(straight / "sft" / "model", resumed / "sft" / "model")


def test_reward_model_resumes_exactly(tmp_path, cache, base):
    straight, resumed = interrupted_and_uninterrupted(
        tmp_path, cache, 3, "steps=[rm]", f"rm.model.path={base / 'sft' / 'model'}"
    )
    assert same_file(straight / "rm" / "model", resumed / "rm" / "model")


def test_ppo_resumes_exactly(tmp_path, cache, base):
    straight, resumed = interrupted_and_uninterrupted(
        tmp_path,
        cache,
        2,
        "steps=[ppo]",
        "checkpoint.every_steps=2",
        f"ppo.actor_model.path={base / 'sft' / 'model'}",
        f"ppo.critic_model.path={base / 'rm' / 'model'}",
    )
    for role in ("actor", "actor_ema", "critic"):
        assert same_file(straight / "ppo" / role, resumed / "ppo" / role), role
