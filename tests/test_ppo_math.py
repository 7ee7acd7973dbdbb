"""PPO math against hand-worked numbers and plain-Python references (incl. DeepSpeed-Chat's loops)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.config import PRESETS
from jaxrlhf.models.outputs import logprobs_and_entropy, next_token_logprobs
from jaxrlhf.rl import ppo_math


def test_kl_estimators_hand_worked():
    # logp = log 0.5, ref = log 0.25 (policy above reference), and the reverse.
    logprobs = jnp.log(jnp.array([[0.5, 0.25]]))
    ref_logprobs = jnp.log(jnp.array([[0.25, 0.5]]))
    kl = jax.jit(ppo_math.kl_penalty, static_argnames="estimator")
    np.testing.assert_allclose(kl(logprobs, ref_logprobs, estimator="k1"), [[math.log(2), -math.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(kl(logprobs, ref_logprobs, estimator="k2"), [[0.5 * math.log(2) ** 2] * 2], rtol=1e-6)
    # k3 = (r - 1) - log r with r = ref / p: r = 0.5 then r = 2.
    np.testing.assert_allclose(
        kl(logprobs, ref_logprobs, estimator="k3"), [[-0.5 + math.log(2), 1.0 - math.log(2)]], rtol=1e-6
    )
    with pytest.raises(ValueError, match="kl estimator 'k4'"):
        ppo_math.kl_penalty(logprobs, ref_logprobs, estimator="k4")


# Two rows, L = 5 actions, prompt length P = 2 so answers start at action 1.
# Row 0: answer of 2 tokens (actions 1, 2). Row 1: answer fills the whole length.
ACTION_MASK = jnp.array([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], jnp.float32)
KL = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
SCORE = jnp.array([7.0, -2.0])  # 7 gets clipped to 5


@pytest.mark.parametrize(
    "score_position, expected, expected_span",
    [
        (
            "last_token",
            [[0.0, -0.2, -0.3 + 5.0, 0.0, 0.0], [0.0, -0.2, -0.3, -0.4, -0.5 - 2.0]],
            [[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]],
        ),
        (
            # One past the last answer token, keeping that position's KL; row 1 is clamped to the end.
            "after_last",
            [[0.0, -0.2, -0.3, -0.4 + 5.0, 0.0], [0.0, -0.2, -0.3, -0.4, -0.5 - 2.0]],
            [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]],
        ),
    ],
)
def test_token_rewards_hand_worked(score_position, expected, expected_span):
    rewards_fn = jax.jit(ppo_math.token_rewards, static_argnames="score_position")
    rewards = rewards_fn(KL, SCORE, ACTION_MASK, kl_coef=0.1, clip_reward_value=5.0, score_position=score_position)
    np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-6)
    span = ppo_math.reward_span_mask(ACTION_MASK, score_position=score_position)
    np.testing.assert_array_equal(span, expected_span)


def test_token_rewards_rejects_unknown_position():
    with pytest.raises(ValueError, match="score_position 'first'"):
        ppo_math.token_rewards(KL, SCORE, ACTION_MASK, kl_coef=0.1, clip_reward_value=5.0, score_position="first")


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain double loop: A_t = sum_l (gamma lam)^l delta_{t+l} until the episode (mask run) ends."""
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            total, s = 0.0, t
            while s < length and mask[b, s]:
                next_value = values[b, s + 1] if s + 1 < length and mask[b, s + 1] else 0.0
                delta = rewards[b, s] + gamma * next_value - values[b, s]
                total += (gamma * lam) ** (s - t) * delta
                s += 1
            advantages[b, t] = total
    return advantages, np.where(mask > 0, advantages + values, 0.0)


GAE_MASK = np.array(
    [
        [0, 0, 1, 1, 1, 1, 0, 0],  # prompt, answer, right padding
        [0, 1, 1, 1, 1, 1, 1, 1],  # answer to the end
        [1, 1, 0, 1, 1, 0, 0, 0],  # a hole: the first run must not bootstrap across it
    ],
    np.float32,
)

gae_jit = jax.jit(ppo_math.gae_advantages)


def test_gae_matches_double_loop():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=GAE_MASK.shape).astype(np.float32)
    values = rng.normal(size=GAE_MASK.shape).astype(np.float32)
    advantages, returns = gae_jit(rewards, values, GAE_MASK, gamma=0.9, lam=0.8)
    expected_advantages, expected_returns = reference_gae(rewards, values, GAE_MASK, 0.9, 0.8)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-6)


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = np.array([[0.0, 1.0, 2.0, 3.0, 9.0]], np.float32)
    values = np.array([[5.0, 0.5, 0.25, 1.0, 7.0]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0]], np.float32)
    advantages, returns = gae_jit(rewards, values, mask, gamma=1.0, lam=1.0)
    # Reward-to-go over actions 1..3 is [6, 5, 3]; masked positions are 0.
    np.testing.assert_allclose(advantages, [[0.0, 6.0 - 0.5, 5.0 - 0.25, 3.0 - 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[0.0, 6.0, 5.0, 3.0, 0.0]], rtol=1e-6)


def deepspeed_chat_advantages(logprobs, ref_logprobs, score, values, attention_mask, prompt_length, plus_one):
    """Transcription of DeepSpeed-Chat compute_rewards + train_rlhf zeroing + get_advantages_and_returns.

    plus_one=True is dschat/rlhf/ppo_trainer.py; False is the older training/step3 version.
    """
    kl_ctl, clip_reward_value, gamma, lam = 0.1, 5.0, 1.0, 0.95
    action_mask = attention_mask[:, 1:]
    rewards = -kl_ctl * (logprobs - ref_logprobs)
    values = values.copy()
    start = prompt_length - 1
    ends = start + action_mask[:, start:].sum(1) + (1 if plus_one else 0)
    reward_clip = np.clip(score, -clip_reward_value, clip_reward_value)
    for j in range(rewards.shape[0]):
        rewards[j, start : ends[j]][-1] += reward_clip[j]
    for i in range(rewards.shape[0]):
        rewards[i, ends[i] :] = 0
        values[i, ends[i] :] = 0
    lastgaelam = 0
    advantages_reversed = []
    length = rewards.shape[-1]
    for t in reversed(range(start, length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = np.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values[:, start:]


@pytest.mark.parametrize("score_position, plus_one", [("after_last", True), ("last_token", False)])
def test_deepspeed_chat_pipeline_matches_transcription(score_position, plus_one):
    rng = np.random.default_rng(1)
    prompt_length, seq_len = 3, 9
    # Left-padded prompts, right-padded answers of 2, 4, 6 (= whole length) and 1 tokens.
    attention_mask = np.zeros((4, seq_len), np.int64)
    for row, (prompt_pad, answer_len) in enumerate([(0, 2), (1, 4), (2, 6), (0, 1)]):
        attention_mask[row, prompt_pad:prompt_length] = 1
        attention_mask[row, prompt_length : prompt_length + answer_len] = 1
    logprobs = rng.normal(size=(4, seq_len - 1)).astype(np.float32)
    ref_logprobs = rng.normal(size=(4, seq_len - 1)).astype(np.float32)
    values = rng.normal(size=(4, seq_len - 1)).astype(np.float32)
    score = np.array([7.0, -1.5, 0.3, -9.0], np.float32)
    expected_advantages, expected_returns = deepspeed_chat_advantages(
        logprobs, ref_logprobs, score, values, attention_mask, prompt_length, plus_one
    )

    start = prompt_length - 1
    action_mask = attention_mask[:, 1:].astype(np.float32)
    action_mask[:, :start] = 0
    preset = PRESETS["deepspeed_chat"]

    @jax.jit
    def pipeline(logprobs, ref_logprobs, score, values, action_mask):
        kl = ppo_math.kl_penalty(logprobs, ref_logprobs, estimator=preset["kl_estimator"])
        rewards = ppo_math.token_rewards(
            kl,
            score,
            action_mask,
            kl_coef=preset["kl_coef"],
            clip_reward_value=preset["clip_reward_value"],
            score_position=score_position,
        )
        span = ppo_math.reward_span_mask(action_mask, score_position=score_position)
        return ppo_math.gae_advantages(rewards, values, span, gamma=preset["gamma"], lam=preset["lam"])

    advantages, returns = pipeline(logprobs, ref_logprobs, score, values, action_mask)
    np.testing.assert_allclose(advantages[:, start:], expected_advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns[:, start:], expected_returns, rtol=1e-5, atol=1e-5)


def test_masked_whiten_mean_zero_std_one():
    rng = np.random.default_rng(2)
    x = rng.normal(loc=3.0, scale=5.0, size=(3, 7)).astype(np.float32)
    mask = (rng.uniform(size=(3, 7)) > 0.4).astype(np.float32)
    whiten = jax.jit(ppo_math.masked_whiten, static_argnames="shift_mean")
    whitened = np.asarray(whiten(x, mask))
    selected = whitened[mask > 0]
    np.testing.assert_allclose(selected.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(selected.std(), 1.0, rtol=1e-4)
    np.testing.assert_array_equal(whitened[mask == 0], 0.0)

    scaled = np.asarray(whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(scaled.mean(), x[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(scaled.std(), 1.0, rtol=1e-4)


def test_masked_mean_ignores_masked_inf_and_empty_mask():
    x = jnp.array([[1.0, 3.0, jnp.inf]])
    assert float(ppo_math.masked_mean(x, jnp.array([[1.0, 1.0, 0.0]]))) == 2.0
    assert float(ppo_math.masked_mean(x, jnp.zeros((1, 3)))) == 0.0


# Tokens: (advantage, ratio) = inside clip, above clip (A>0), below clip (A<0),
# A<0 with ratio above clip (not clipped), A>0 with ratio below clip (not clipped), masked.
ADVANTAGES = jnp.array([[1.0, 1.0, -1.0, -1.0, 1.0, 5.0]])
RATIOS = jnp.array([[1.1, 1.5, 0.5, 1.5, 0.5, 100.0]])
LOSS_MASK = jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
actor_loss_jit = jax.jit(ppo_math.actor_loss, static_argnames=("cliprange", "dual_clip"))


def test_actor_loss_clipping_hand_worked():
    loss, stats = actor_loss_jit(jnp.log(RATIOS), jnp.zeros_like(RATIOS), ADVANTAGES, LOSS_MASK, cliprange=0.2)
    # Per token: -1.1, clipped -1.2, clipped 0.8, 1.5, -0.5.
    np.testing.assert_allclose(loss, (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5, rtol=1e-5)
    np.testing.assert_allclose(stats["clipfrac"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(stats["ratio_mean"], (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5, rtol=1e-5)
    ratios = np.array([1.1, 1.5, 0.5, 1.5, 0.5])
    np.testing.assert_allclose(stats["approx_kl"], np.mean(ratios - 1 - np.log(ratios)), rtol=1e-5)


def test_actor_loss_gradient_zero_where_clipped():
    def loss_of_logprobs(logprobs):
        return ppo_math.actor_loss(logprobs, jnp.zeros_like(logprobs), ADVANTAGES, LOSS_MASK, cliprange=0.2)[0]

    grad = jax.jit(jax.grad(loss_of_logprobs))(jnp.log(RATIOS))
    # d(-A * ratio)/d logp = -A * ratio, over 5 tokens; clipped and masked tokens get 0.
    np.testing.assert_allclose(grad, [[-1.1 / 5, 0.0, 0.0, 1.5 / 5, -0.5 / 5, 0.0]], rtol=1e-5, atol=1e-7)


def test_actor_loss_dual_clip_only_for_negative_advantages():
    advantages = jnp.array([[-1.0, -1.0, 1.0]])
    ratios = jnp.array([[4.0, 1.5, 4.0]])
    mask = jnp.ones((1, 3))
    plain, _ = actor_loss_jit(jnp.log(ratios), jnp.zeros((1, 3)), advantages, mask, cliprange=0.2)
    dual, stats = actor_loss_jit(jnp.log(ratios), jnp.zeros((1, 3)), advantages, mask, cliprange=0.2, dual_clip=3.0)
    np.testing.assert_allclose(plain, (4.0 + 1.5 - 1.2) / 3, rtol=1e-5)
    # Only the first token (A < 0, loss 4 > 3 * |A|) is bounded to 3.
    np.testing.assert_allclose(dual, (3.0 + 1.5 - 1.2) / 3, rtol=1e-5)
    np.testing.assert_allclose(stats["dual_clipfrac"], 1 / 3, rtol=1e-6)

    def loss_of_logprobs(logprobs):
        return ppo_math.actor_loss(logprobs, jnp.zeros((1, 3)), advantages, mask, cliprange=0.2, dual_clip=3.0)[0]

    grad = jax.grad(loss_of_logprobs)(jnp.log(ratios))
    np.testing.assert_allclose(grad, [[0.0, 1.5 / 3, 0.0]], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_math.actor_loss(jnp.log(ratios), jnp.zeros((1, 3)), advantages, mask, cliprange=0.2, dual_clip=0.5)


def test_value_loss_hand_worked():
    values = jnp.array([[1.0, 1.5, 1.5, 50.0]])
    old_values = jnp.array([[0.9, 1.0, 1.0, 0.0]])
    returns = jnp.array([[2.0, 2.0, 1.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = jax.jit(ppo_math.value_loss, static_argnames="cliprange_value")(
        values, old_values, returns, mask, cliprange_value=0.2
    )
    # Token 0 inside the clip: 1.0. Token 1 clipped to 1.2: max(0.25, 0.64). Token 2 clipped to 1.2: max(0.25, 0.04).
    np.testing.assert_allclose(loss, 0.5 * (1.0 + 0.64 + 0.25) / 3, rtol=1e-5)
    np.testing.assert_allclose(stats["value_clipfrac"], 1 / 3, rtol=1e-6)
    # Var(R - v) = 14/36 and Var(R) = 2/9 (population): 1 - 1.75.
    np.testing.assert_allclose(stats["explained_variance"], -0.75, rtol=1e-4)


def test_logprobs_and_entropy_from_logits():
    logits = jnp.array([[[0.0, math.log(3.0)], [1e4, 0.0]]], jnp.bfloat16)  # [1, 2, 2]
    logprobs = jax.jit(next_token_logprobs)(jnp.pad(logits, ((0, 0), (0, 1), (0, 0))), jnp.array([[9, 1, 0]]))
    assert logprobs.dtype == jnp.float32
    np.testing.assert_allclose(logprobs, [[math.log(0.75), 0.0]], atol=1e-2)

    uniform_then_peaked = jnp.array([[[0.0] * 4, [1e4, 0.0, 0.0, 0.0]]])
    _, entropy = jax.jit(logprobs_and_entropy)(uniform_then_peaked, jnp.array([[0, 0]]))
    np.testing.assert_allclose(entropy, [[math.log(4), 0.0]], atol=1e-6)


def test_adaptive_kl_update():
    update = jax.jit(functools.partial(ppo_math.adaptive_kl_update, target=6.0, horizon=100.0))
    np.testing.assert_allclose(update(0.1, 6.6, 10), 0.1 * (1 + 0.1 * 0.1), rtol=1e-6)  # proportional
    np.testing.assert_allclose(update(0.1, 12.0, 10), 0.1 * (1 + 0.2 * 0.1), rtol=1e-6)  # clipped at +0.2
    np.testing.assert_allclose(update(0.1, 3.0, 10), 0.1 * (1 - 0.2 * 0.1), rtol=1e-6)  # clipped at -0.2


def test_presets_share_fields_and_match_deepspeed_chat():
    assert set(PRESETS["deepspeed_chat"]) == set(PRESETS["stable"])
    deepspeed_chat = PRESETS["deepspeed_chat"]
    assert deepspeed_chat["kl_coef"] == 0.1 and deepspeed_chat["kl_estimator"] == "k1"
    assert deepspeed_chat["clip_reward_value"] == 5.0 and deepspeed_chat["score_position"] == "after_last"
    assert (deepspeed_chat["cliprange"], deepspeed_chat["cliprange_value"]) == (0.2, 0.2)
    assert (deepspeed_chat["gamma"], deepspeed_chat["lam"]) == (1.0, 0.95)
    assert not deepspeed_chat["whiten_advantages"] and not deepspeed_chat["adaptive_kl"]
    assert deepspeed_chat["dual_clip"] is None and deepspeed_chat["entropy_coef"] == 0.0


def test_logprob_agreement_compares_each_answer_token_with_its_training_logprob():
    # a 2-token prompt, then 2 answer tokens and a pad; old_logprobs[t] scores token t + 1
    rollout = jnp.array([[-1.0, -2.0, 0.0]])
    old = jnp.array([[-9.0, -1.0005, -2.01, -7.0]])
    mask = jnp.array([[1, 1, 1, 1, 0]])
    gaps = ppo_math.logprob_agreement(rollout, old, mask, prompt_len=2)
    assert float(gaps["logprob_gap_mean"]) == pytest.approx((0.0005 + 0.01) / 2, rel=1e-4)
    assert float(gaps["logprob_gap_max"]) == pytest.approx(0.01, rel=1e-4)  # the pad's -7 vs 0 is not counted
    assert float(gaps["logprob_gap_share_over_1e-3"]) == 0.5
