"""Step 3 in process, for PPO and the critic-free algorithms: nothing recompiles after the first
iteration, a sharded iteration (fsdp=4, tensor=2, tensor-parallel rollouts) equals the
single-device one, gradient accumulation equals one batch, and a critic-free run holds, trains and
exports no critic."""

import json
import os

import jax
import numpy as np
import pytest
from hf_fixtures import random_reward_model

from jaxrlhf.config import PRESETS, load_config
from jaxrlhf.metrics import MetricsLogger
from jaxrlhf.models.safetensors_io import read_header
from jaxrlhf.parallel import make_mesh
from jaxrlhf.rl.ppo import run_ppo
from jaxrlhf.run_context import RunContext
from jaxrlhf.train import task_hooks

TINY_PPO = [
    "steps=[ppo]",
    "ppo.actor_model.path=builtin",
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


@pytest.mark.slow  # ~20 s: two step-3 runs, one sharded
def test_sharded_iteration_equals_single_device(tmp_path):
    _, single = run(tmp_path, "single", make_mesh(devices=jax.devices()[:1]), "ppo.num_iterations=1")
    _, sharded = run(
        tmp_path, "sharded", make_mesh(fsdp=4, tensor=2), "ppo.num_iterations=1", "generation.tensor_parallel=2"
    )
    for key in ("score", "kl", "advantage_mean", "actor_loss", "critic_loss", "answer_length", "entropy"):
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
    assert iterations[0]["kl_coef"] == pytest.approx(PRESETS["deepspeed_chat"]["kl_coef"])  # the preset's...
    assert iterations[1]["kl_coef"] != pytest.approx(iterations[0]["kl_coef"])  # ...then moved by the controller
    assert all(line["ptx_loss"] > 0 for line in iterations)
    assert [line["compiles"] for line in iterations[1:]] == [0]
    actor = weights(tmp_path / "lora" / "ppo" / "actor")
    assert not any("lora" in name for name in actor)  # adapters merged into the exported kernels


GRPO = ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=4", "generation.greedy=false"]


@pytest.mark.slow  # ~25 s: two step-3 runs, one sharded
def test_grpo_compiles_once_sharded_equals_one_device_and_has_no_critic(tmp_path):
    tis = "ppo.rollout_correction=tis"  # float32 generation: every ratio within the cap, weights 1
    single_summary, single = run(
        tmp_path, "single", make_mesh(devices=jax.devices()[:1]), *GRPO, tis, "ppo.num_iterations=2"
    )
    _, sharded = run(
        tmp_path,
        "sharded",
        make_mesh(fsdp=4, tensor=2),
        *GRPO,
        tis,
        "ppo.num_iterations=2",
        "generation.tensor_parallel=2",
    )
    assert all(line["rollout_correction_share"] == 0 for line in single + sharded)
    assert [line["compiles"] for line in single[1:]] == [0]
    for key in ("score", "kl", "kl_loss", "advantage_mean", "actor_loss", "answer_length", "entropy"):
        for a, b in zip(sharded, single):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
    assert not any(key.startswith("critic") for key in single[0])
    assert single_summary["ppo.algorithm"] == "grpo"
    outputs = sorted(os.listdir(tmp_path / "single" / "ppo"))
    assert "critic" not in outputs and {"actor", "reward_model", "eval_curve.jsonl"} <= set(outputs)
    expected, actual = weights(tmp_path / "single" / "ppo" / "actor"), weights(tmp_path / "sharded" / "ppo" / "actor")
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=2e-5, err_msg=name)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_step3_gradient_accumulation_equals_one_minibatch(tmp_path, aggregation):
    """Answers of unequal lengths (1 .. 9 actions) in 1, 2 and 4 microbatches: the actor's loss
    (surrogate, KL term, PTX) and the critic's loss and gradients equal one minibatch's."""
    from hf_fixtures import padded_batch, save_tiny_model

    from jaxrlhf.models import ValueModel, load_pretrained
    from jaxrlhf.rl.experience import Experience
    from jaxrlhf.rl.update import UpdateSettings, actor_objective, critic_objective
    from jaxrlhf.train_state import accumulate_gradients, split_for_training

    path = save_tiny_model("llama_gqa_llama3", str(tmp_path))
    graphdef, params, frozen = split_for_training(load_pretrained(path), 0)
    ids, mask = padded_batch([13, 5, 9, 7, 12, 6, 10, 8], 14, left=False, seed=3)
    tokens, attention_mask = jax.numpy.asarray(ids), jax.numpy.asarray(mask)
    actions = (attention_mask[:, 1:] * (np.arange(13) >= 3)).astype(np.float32)  # a 4-token "prompt"
    noise = jax.random.normal(jax.random.key(0), (4, *actions.shape))
    experience = Experience(
        tokens, attention_mask, actions, actions, 0.1 * noise[0] - 5, 0.1 * noise[1] - 5, actions, noise[2],
        jax.numpy.ones(8), jax.numpy.ones(8), old_values=noise[3], returns=noise[2],
    )  # fmt: skip
    ptx = {"input_ids": tokens, "attention_mask": attention_mask, "loss_mask": attention_mask}
    settings = UpdateSettings(
        ppo_epochs=1, num_minibatches=1, grad_accum_steps=1, cliprange=0.2, cliprange_high=0.28,
        cliprange_value=0.2, dual_clip=3.0, entropy_coef=0.01, unsup_coef=0.5, ema_decay=0.0,
        loss_aggregation=aggregation, kl_loss_estimator="k3", max_answer_seq_len=10, kl_in_loss=True,
    )  # fmt: skip
    batch = {"experience": experience, "ptx": ptx}
    critic = split_for_training(load_pretrained(path, model_cls=ValueModel, untrained_head="zeros"), 0)
    for objective, model in (
        (actor_objective(settings, 0.05), (graphdef, params, frozen)),
        (critic_objective(settings), critic),
    ):
        one = accumulate_gradients(objective, *model, batch, 1)
        for microbatches in (2, 4):
            split = accumulate_gradients(objective, *model, batch, microbatches)
            np.testing.assert_allclose(float(split[0]), float(one[0]), rtol=2e-5)
            for a, b in zip(jax.tree.leaves(split[1]), jax.tree.leaves(one[1])):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def test_reward_functions_alone_load_no_reward_model_and_a_bad_one_names_its_row(tmp_path):
    rule = "ppo.reward=[test_ppo:letters_e]"
    summary, iterations = run(
        tmp_path, "rule", make_mesh(devices=jax.devices()[:1]), *GRPO, rule, "ppo.kl_coef=0", "ppo.num_iterations=1"
    )
    assert "reward_fn/letters_e" in iterations[0] and "time/reward_fn_s" in iterations[0]
    assert not os.path.exists(tmp_path / "rule" / "ppo" / "reward_model")
    assert summary["ppo.kl_to_sft"] != 0  # the SFT policy is loaded for the evaluation's KL only
    with pytest.raises(ValueError, match=r"reward function returns_nan .*row 0 \(answer '"):
        run(tmp_path, "bad", make_mesh(devices=jax.devices()[:1]), *GRPO, "ppo.reward=[test_ppo:returns_nan]")


def letters_e(prompts, answers, **fields):
    return [answer.count("e") for answer in answers]


def returns_nan(prompts, answers, **fields):
    return [float("nan")] * len(answers)
