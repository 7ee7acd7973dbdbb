"""The default run, end to end, as a user starts it: `python -m jaxrlhf.train` with no argument
(only the output directory moved), on one CPU device (conftest.py's `default_run`, made once per
session). Checks what each step must show."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the default run (conftest.py's `default_run`, ~5 min) and runs from its models


def test_sft_learns(default_run):
    _, summary, _ = default_run
    assert summary["sft.eval_loss_end"] < 0.5 * summary["sft.eval_loss_start"]


def test_reward_model_is_accurate(default_run):
    _, summary, _ = default_run
    assert summary["rm.eval_accuracy"] >= 0.85
    assert summary["rm.chosen_mean"] > summary["rm.rejected_mean"]


def test_ppo_raises_the_gold_reward_with_bounded_kl(default_run):
    _, summary, stdout = default_run
    gain = summary["ppo.gold_reward_ppo"] - summary["ppo.gold_reward_sft"]
    combined_se = math.hypot(summary["ppo.gold_reward_sft_se"], summary["ppo.gold_reward_ppo_se"])
    assert gain > 3 * combined_se, summary
    assert 0 <= summary["ppo.kl_to_sft"] < 20
    assert "sample after" in stdout


def test_generation_and_training_agree_on_every_logprob(default_run):
    """The log-probs recorded while generating (generation layout, KV cache) against the training
    forward's for the same tokens before the update: float32 rounding, every iteration."""
    out, _, _ = default_run
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    gaps = [row for row in rows if row.get("prefix") == "ppo" and "logprob_gap_max" in row]
    assert len(gaps) >= 6  # logged every log_every iterations
    assert max(row["logprob_gap_max"] for row in gaps) < 1e-4
    assert all(row["logprob_gap_share_over_1e-3"] == 0 for row in gaps)


def test_dpo_from_the_sft_model_raises_the_gold_reward(default_run, tmp_path):
    """DPO (steps: [dpo]) on the reward model's pairs, starting from the default run's SFT model,
    judged on the same held-out prompts with the same sampling as PPO."""
    out, _, _ = default_run
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrlhf.train",
            "steps=[dpo]",
            f"output_dir={tmp_path}",
            f"dpo.model.path={out / 'sft' / 'model'}",
            f"data.cache_dir={out / 'cache'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.load(open(tmp_path / "summary.json"))
    gain = summary["dpo.gold_reward_dpo"] - summary["dpo.gold_reward_sft"]
    assert gain > 3 * math.hypot(summary["dpo.gold_reward_sft_se"], summary["dpo.gold_reward_dpo_se"]), summary
    assert summary["dpo.eval_accuracy"] > 0.75 and summary["dpo.eval_margin"] > 0
    assert (tmp_path / "dpo" / "model" / "config.json").exists()


def test_outputs_a_user_needs(default_run):
    import numpy as np
    import torch
    import transformers

    out, _, _ = default_run
    assert os.path.getsize(out / "ppo" / "ppo.png") > 1000
    assert os.path.exists(out / "config.yaml") and os.listdir(out / "tensorboard")
    for role in ("sft/model", "rm/model", "ppo/actor", "ppo/actor_ema", "ppo/critic", "ppo/reward_model"):
        assert os.path.exists(out / role / "model.safetensors"), role
    # transformers loads the exported actor and answers greedily what our generation answers
    from jaxrlhf.generation.prompting import TextGenerator

    text = "\n\nHuman: I am Alice. List three fruits.\n\nAssistant:"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "ppo" / "actor")
    actor = transformers.AutoModelForCausalLM.from_pretrained(out / "ppo" / "actor")
    prompt = tokenizer(text, return_tensors="pt")
    answer = actor.generate(
        **prompt,
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    hf_text = tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert hf_text.strip(), answer
    assert [hf_text] == TextGenerator(str(out / "ppo" / "actor"), max_new_tokens=20, greedy=True).answers([text])
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(out / "rm" / "model")
    with torch.no_grad():
        assert np.isfinite(reward(answer).logits.numpy()).all()


def step3(out, output_dir, config_file, *overrides):
    """Step 3 alone with a shipped config, from the default run's SFT and reward models."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    argv = [
        sys.executable, "-m", "jaxrlhf.train", config_file, "steps=[ppo]", f"output_dir={output_dir}",
        f"ppo.actor_model.path={out / 'sft' / 'model'}", f"ppo.critic_model.path={out / 'rm' / 'model'}",
        f"data.cache_dir={out / 'cache'}", "tensorboard=false", *overrides,
    ]  # fmt: skip
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.load(open(output_dir / "summary.json")), result.stdout


def gain_in_se(summary, name):
    gain = summary[f"ppo.{name}_ppo"] - summary[f"ppo.{name}_sft"]
    return gain / math.hypot(summary[f"ppo.{name}_sft_se"], summary[f"ppo.{name}_ppo_se"])


@pytest.mark.parametrize("algorithm, standard_errors", [("grpo", 3), ("rloo", 2), ("reinforce_pp", 2)])
def test_critic_free_algorithms_raise_the_gold_reward_without_a_critic(
    default_run, tmp_path, algorithm, standard_errors
):
    out, ppo_summary, _ = default_run
    summary, stdout = step3(out, tmp_path, f"configs/{algorithm}.yaml")
    assert summary["ppo.algorithm"] == algorithm
    assert gain_in_se(summary, "gold_reward") > standard_errors, summary
    assert 0 <= summary["ppo.kl_to_sft"] < 20
    assert {k for k in summary if k.startswith("ppo.")} == {k for k in ppo_summary if k.startswith("ppo.")}
    # no critic in its plan, its roles, its metrics or its exports
    plan = next(line for line in stdout.splitlines() if line.startswith("[plan] ppo:"))
    roles = next(line for line in stdout.splitlines() if "roles:" in line)
    assert "critic" not in plan and "critic" not in roles, (plan, roles)
    assert not os.path.exists(tmp_path / "ppo" / "critic") and os.path.exists(tmp_path / "ppo" / "actor")
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert not any(key.startswith("critic") for row in metrics for key in row)
    curve = [json.loads(line)["iteration"] for line in open(tmp_path / "ppo" / "eval_curve.jsonl")]
    assert curve == list(range(0, 81, 10)) and os.path.getsize(tmp_path / "ppo" / "eval_curve.png") > 1000


def test_grpo_with_the_public_rule_reward_alone_raises_it(default_run, tmp_path):
    """No reward model at all: the built-in task's visible format reward (greeting and closing)."""
    out, _, _ = default_run
    rule = "ppo.reward=[jaxrlhf.data.builtin:format_reward]"
    summary, stdout = step3(out, tmp_path, "configs/grpo.yaml", rule, "ppo.kl_coef=0")
    assert gain_in_se(summary, "reward_score") > 3, summary
    assert "reward_model" not in next(line for line in stdout.splitlines() if "roles:" in line)
    assert not os.path.exists(tmp_path / "ppo" / "reward_model")
