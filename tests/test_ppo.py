"""Step 3 in process: nothing recompiles after the first iteration, and a sharded iteration
(fsdp=4, tensor=2, tensor-parallel rollouts) equals the single-device one."""

import json
import os

import jax
import numpy as np
import pytest
from hf_fixtures import random_reward_model

from jaxrlhf.config import load_config
from jaxrlhf.metrics import MetricsLogger
from jaxrlhf.models.safetensors_io import read_header
from jaxrlhf.parallel import make_mesh
from jaxrlhf.rl.ppo import run_ppo
from jaxrlhf.run_context import RunContext
from jaxrlhf.train import task_hooks

TINY_PPO = [
    "steps=[ppo]",
    "data.builtin_size=1000",
    "ppo.prompts_per_iteration=8",
    "ppo.num_minibatches=2",
    "ppo.ppo_epochs=2",
    "ppo.eval_prompts=8",
    "ppo.max_prompt_seq_len=24",
    "ppo.max_answer_seq_len=12",
    "ppo.actor_optimizer.learning_rate=1e-5",
    "ppo.critic_optimizer.learning_rate=1e-5",
    "log_every=1",
    "ppo.ema_decay=0.5",
    "generation.greedy=true",
    "tensorboard=false",
]


def run(tmp_path, name, mesh, *overrides):
    cache = tmp_path / "cache"
    reward_model = random_reward_model(str(tmp_path), str(cache))
    roles = [f"ppo.critic_model.path={reward_model}"]  # the reward model comes from the critic's path
    config = load_config([*TINY_PPO, *roles, f"output_dir={tmp_path / name}", f"data.cache_dir={cache}", *overrides])
    logger = MetricsLogger(config.output_dir, tensorboard=False)
    try:
        summary = run_ppo(RunContext(config, mesh, logger), task_hooks(config))
    finally:
        logger.close()
    lines = [json.loads(line) for line in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    return summary, [line for line in lines if line["prefix"] == "ppo"]


def weights(directory):
    return {name: ref.array() for name, ref in read_header(os.path.join(directory, "model.safetensors")).items()}


def test_iterations_after_the_first_compile_nothing(tmp_path):
    summary, iterations = run(tmp_path, "single", make_mesh(devices=jax.devices()[:1]), "ppo.num_iterations=3")
    assert [line["step"] for line in iterations] == [1, 2, 3]
    assert iterations[0]["compiles"] > 0  # generation, experience and the update compile once...
    assert [line["compiles"] for line in iterations[1:]] == [0, 0]  # ...and never again
    assert summary["ppo.kl_to_sft"] >= 0 and "ppo.gold_reward_ppo" in summary
    for role in ("actor", "actor_ema", "critic", "reward_model"):
        assert os.path.exists(tmp_path / "single" / "ppo" / role / "model.safetensors"), role


def test_sharded_iteration_equals_single_device(tmp_path):
    _, single = run(tmp_path, "single", make_mesh(devices=jax.devices()[:1]), "ppo.num_iterations=1")
    _, sharded = run(
        tmp_path, "sharded", make_mesh(fsdp=4, tensor=2), "ppo.num_iterations=1", "generation.tensor_parallel=2"
    )
    for key in ("score", "kl", "reward", "actor_loss", "critic_loss", "answer_length", "entropy"):
        assert sharded[0][key] == pytest.approx(single[0][key], rel=1e-3, abs=1e-4), key
    for role in ("actor", "critic"):
        expected, actual = weights(tmp_path / "single" / "ppo" / role), weights(tmp_path / "sharded" / "ppo" / role)
        assert expected.keys() == actual.keys()
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], atol=2e-5, err_msg=f"{role}: {name}")


def test_lora_ptx_adaptive_kl_and_the_deepspeed_chat_preset(tmp_path):
    """The other paths of step 3 run: LoRA actor and critic (the reference is the actor's own base
    with adapters off, so KL starts at exactly 0), the PTX loss, the adaptive KL controller, and
    DeepSpeed-Chat's preset (score one slot after the answer, no whitening)."""
    summary, iterations = run(
        tmp_path,
        "lora",
        make_mesh(devices=jax.devices()[:1]),
        "ppo.num_iterations=2",
        "ppo.actor_lora.rank=4",
        "ppo.critic_lora.rank=4",
        "ppo.unsup_coef=0.5",
        "ppo.adaptive_kl=true",
        "ppo.kl_target=0.01",
        "ppo.preset=deepspeed_chat",
    )
    assert iterations[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: actor == reference
    assert iterations[0]["kl_coef"] == pytest.approx(0.1)  # deepspeed_chat's coefficient...
    assert iterations[1]["kl_coef"] != pytest.approx(0.1)  # ...then moved by the controller
    assert all(line["ptx_loss"] > 0 for line in iterations)
    assert [line["compiles"] for line in iterations[1:]] == [0]
    preset = load_config(["ppo.preset=deepspeed_chat"]).ppo
    assert preset.score_position == "after_last" and not preset.whiten_advantages and preset.kl_coef == 0.1
    actor = weights(tmp_path / "lora" / "ppo" / "actor")
    assert not any("lora" in name for name in actor)  # adapters merged into the exported kernels
