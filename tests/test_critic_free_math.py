"""Critic-free step-3 math (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) against hand-worked numbers and NumPy loops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.rl import advantages as adv
from jaxrlhf.rl import policy_loss as pl
from jaxrlhf.rl import ppo_math

# ---------------------------------------------------------------------------------------------
# NumPy transcriptions: one loop over groups, rows or tokens, written the obvious way.


def np_group_advantages(scores, valid, n, scale_rewards, eps=1e-6):
    out = np.zeros(len(scores))
    all_valid = np.array([s for s, v in zip(scores, valid) if v])
    batch_std = all_valid.std(ddof=1) if len(all_valid) > 1 else 0.0
    for start in range(0, len(scores), n):
        rows = [i for i in range(start, start + n) if valid[i]]
        group = np.array([scores[i] for i in rows])
        if len(rows) < 2 or np.all(group == group[0]):
            continue
        for i in rows:
            centred = scores[i] - group.mean()
            if scale_rewards == "group":
                centred /= group.std(ddof=1) + eps
            elif scale_rewards == "batch":
                centred /= batch_std + eps
            out[i] = centred
    return out


def np_leave_one_out(rewards, valid, n):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), n):
        rows = [i for i in range(start, start + n) if valid[i]]
        if len(rows) < 2:
            continue
        for i in rows:
            out[i] = rewards[i] - np.mean([rewards[j] for j in rows if j != i])
    return out


def np_group_mean_baseline(scores, valid, n):
    out = np.zeros(len(scores))
    for start in range(0, len(scores), n):
        rows = [i for i in range(start, start + n) if valid[i]]
        for i in rows:
            out[i] = scores[i] - np.mean([scores[j] for j in rows])
    return out


def np_returns(rewards, mask, gamma):
    out = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        for t in range(rewards.shape[1]):
            if mask[b, t]:
                later = [s for s in range(t, rewards.shape[1]) if mask[b, s]]
                out[b, t] = sum(gamma ** (s - t) * rewards[b, s] for s in later)
    return out


def np_aggregate(per_token, mask, mode, horizon):
    if mode == "token_mean":
        return (per_token * mask).sum() / mask.sum()
    if mode == "sequence_mean":
        rows = [b for b in range(len(mask)) if mask[b].sum() > 0]
        return np.mean([(per_token[b] * mask[b]).sum() / mask[b].sum() for b in rows])
    return (per_token * mask).sum() / (len(mask) * horizon)


def np_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip):
    loss = np.zeros_like(logprobs)
    for b, t in np.ndindex(*logprobs.shape):
        ratio = math.exp(mask[b, t] * (logprobs[b, t] - old_logprobs[b, t]))
        a = advantages[b, t]
        loss[b, t] = max(-a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high))
        if dual_clip is not None and a < 0:
            loss[b, t] = min(loss[b, t], -dual_clip * a)
    return loss


def random_batch(seed, groups=5, n=4, drop=0.2, ties=True):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=groups * n)
    if ties:
        scores = np.round(scores)  # many ties, some all-equal groups
    valid = (rng.random(groups * n) > drop).astype(np.float32)
    return scores.astype(np.float32), valid


def random_tokens(seed, batch=6, length=9):
    """Right-padded answers after a left-padded prompt, with one empty row."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch - 1):
        start = rng.integers(0, length - 1)
        mask[b, start : rng.integers(start + 1, length + 1)] = 1.0
    return rng, mask


# ---------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("scale_rewards", adv.SCALE_REWARDS)
@pytest.mark.parametrize("seed", range(4))
def test_group_advantages_match_loops(scale_rewards, seed):
    scores, valid = random_batch(seed, ties=seed % 2 == 0)
    got = adv.group_advantages(scores, valid, 4, scale_rewards=scale_rewards)
    np.testing.assert_allclose(got, np_group_advantages(scores, valid, 4, scale_rewards), rtol=1e-5, atol=1e-6)


def test_group_advantages_hand_worked():
    # Group 0: [1, 1, 0, 2] with a tie: mean 1, std = sqrt(2/3). Group 1: all equal -> 0.
    # Group 2: [5, x, 3, x] with two dropped rows: mean 4, std = sqrt(2). Group 3: one valid row -> 0.
    scores = jnp.array([1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 3.0, 3.0, 5.0, 100.0, 3.0, -7.0, 9.0, 1.0, 2.0, 3.0])
    valid = jnp.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0], jnp.float32)
    std0 = math.sqrt(2 / 3)
    expected = [0, 0, -1 / std0, 1 / std0, 0, 0, 0, 0, 1 / math.sqrt(2), 0, -1 / math.sqrt(2), 0, 0, 0, 0, 0]
    got = adv.group_advantages(scores, valid, 4, scale_rewards="group", eps=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Dr. GRPO: centred only.
    none = adv.group_advantages(scores, valid, 4, scale_rewards="none")
    np.testing.assert_allclose(none, [0, 0, -1, 1, 0, 0, 0, 0, 1, 0, -1, 0, 0, 0, 0, 0], atol=1e-7)
    # Batch scale: std over the 11 valid scores [1,1,0,2,3,3,3,3,5,3,1].
    batch_std = np.std([1, 1, 0, 2, 3, 3, 3, 3, 5, 3, 1], ddof=1)
    batch = adv.group_advantages(scores, valid, 4, scale_rewards="batch", eps=0.0)
    np.testing.assert_allclose(batch, np.asarray(none) / batch_std, rtol=1e-6)


def test_group_advantages_degenerate_groups():
    # n = 1: every group has a single sample, so there is no signal at all.
    np.testing.assert_array_equal(adv.group_advantages(jnp.array([1.0, 2.0, 3.0]), jnp.ones(3), 1), [0, 0, 0])
    # An all-equal group of values that don't sum exactly in float32 still gives exactly 0.
    equal = jnp.full(3, 0.1)
    for mode in adv.SCALE_REWARDS:
        np.testing.assert_array_equal(adv.group_advantages(equal, jnp.ones(3), 3, scale_rewards=mode), [0, 0, 0])
    # An all-invalid group: no NaN.
    np.testing.assert_array_equal(adv.group_advantages(jnp.array([1.0, 2.0]), jnp.zeros(2), 2), [0, 0])
    with pytest.raises(ValueError, match="scale_rewards 'std'"):
        adv.group_advantages(equal, jnp.ones(3), 3, scale_rewards="std")
    with pytest.raises(ValueError, match="n=2"):
        adv.group_advantages(equal, jnp.ones(3), 2)


def test_leave_one_out_hand_worked():
    got = adv.leave_one_out_advantages(jnp.array([1.0, 2.0, 3.0]), jnp.ones(3), 3)
    np.testing.assert_allclose(got, [1 - 2.5, 2 - 2.0, 3 - 1.5])
    # Second group: the dropped row is no part of the baseline; third group: one valid row -> 0.
    rewards = jnp.array([1.0, 2.0, 3.0, 4.0, 50.0, 6.0, 7.0, 8.0, 9.0])
    valid = jnp.array([1, 1, 1, 1, 0, 1, 0, 1, 0], jnp.float32)
    got = adv.leave_one_out_advantages(rewards, valid, 3)
    np.testing.assert_allclose(got, [-1.5, 0.0, 1.5, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("seed", range(3))
def test_leave_one_out_and_group_mean_match_loops(seed):
    rewards, valid = random_batch(seed, groups=6, n=3, drop=0.3, ties=False)
    np.testing.assert_allclose(
        adv.leave_one_out_advantages(rewards, valid, 3), np_leave_one_out(rewards, valid, 3), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        adv.group_mean_baseline(rewards, valid, 3), np_group_mean_baseline(rewards, valid, 3), rtol=1e-5, atol=1e-6
    )


def test_group_mean_baseline_hand_worked():
    scores = jnp.array([1.0, 2.0, 6.0, 4.0, 9.0, 4.0])
    valid = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
    np.testing.assert_allclose(adv.group_mean_baseline(scores, valid, 3), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])


def test_reverse_cumulative_returns_hand_worked():
    rewards = jnp.array([[9.0, 1.0, 2.0, 3.0, 9.0]])
    mask = jnp.array([[0, 1, 1, 1, 0]], jnp.float32)
    got = adv.reverse_cumulative_returns(rewards, mask, gamma=0.5)
    np.testing.assert_allclose(got, [[0.0, 1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]])
    np.testing.assert_allclose(adv.reverse_cumulative_returns(rewards, mask), [[0.0, 6.0, 5.0, 3.0, 0.0]])


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reverse_cumulative_returns_match_loops(gamma):
    rng, mask = random_tokens(0)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    got = adv.reverse_cumulative_returns(rewards, mask, gamma)
    np.testing.assert_allclose(got, np_returns(rewards, mask, gamma), rtol=1e-5, atol=1e-6)


def test_batch_normalized_advantages_and_broadcast():
    rng, mask = random_tokens(1)
    scores = rng.normal(size=mask.shape[0]).astype(np.float32)
    per_token = adv.broadcast_to_tokens(scores, mask)
    np.testing.assert_array_equal(per_token, mask * scores[:, None])
    returns = adv.reverse_cumulative_returns(per_token + rng.normal(size=mask.shape), mask)
    normalised = np.asarray(adv.batch_normalized_advantages(returns, mask))
    on_mask = normalised[mask > 0]
    np.testing.assert_allclose([on_mask.mean(), on_mask.std()], [0.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(normalised[mask == 0], 0.0)
    raw = np.asarray(returns)[mask > 0]
    np.testing.assert_allclose(on_mask, (raw - raw.mean()) / np.sqrt(raw.var() + 1e-8), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Policy loss


def test_clipped_surrogate_clip_higher_hand_worked():
    # clip_low 0.2, clip_high 0.28: the ratio may rise to 1.28 but fall only to 0.8.
    ratios = np.array([[1.25, 1.4, 0.85, 0.7, 1.4, 0.7]])
    signs = np.array([[1.0, 1.0, -1.0, -1.0, -1.0, 1.0]])
    per_token, ind = pl.clipped_surrogate(
        jnp.log(ratios), jnp.zeros_like(ratios), signs, jnp.ones_like(ratios), clip_low=0.2, clip_high=0.28
    )
    # A>0, r=1.25 (inside): -1.25. A>0, r=1.4: clipped to 1.28 wins. A<0, r=0.85 (inside): 0.85.
    # A<0, r=0.7: clipped to 0.8 wins. A<0, r=1.4: unclipped 1.4 wins (no clip up for A<0). A>0, r=0.7: -0.7.
    np.testing.assert_allclose(per_token, [[-1.25, -1.28, 0.85, 0.8, 1.4, -0.7]], rtol=1e-6)
    np.testing.assert_array_equal(ind["clipfrac"], [[0, 1, 0, 1, 0, 0]])
    np.testing.assert_allclose(ind["ratio"], ratios, rtol=1e-6)
    np.testing.assert_allclose(ind["approx_kl"], ratios - 1 - np.log(ratios), rtol=1e-5, atol=1e-7)
    # Dual clip 3 bounds an A<0 token at 3|A|: ratio 4 would cost 4, costs 3.
    logprobs, signs = jnp.log(jnp.array([[4.0, 4.0]])), jnp.array([[-1.0, 1.0]])
    zeros, ones = jnp.zeros((1, 2)), jnp.ones((1, 2))
    per_token, ind = pl.clipped_surrogate(logprobs, zeros, signs, ones, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(per_token, [[3.0, -1.28]], rtol=1e-6)
    np.testing.assert_array_equal(ind["dual_clipfrac"], [[1.0, 0.0]])
    with pytest.raises(ValueError, match="dual_clip"):
        pl.clipped_surrogate(ratios, ratios, signs, signs, clip_low=0.2, clip_high=0.2, dual_clip=1.0)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_clipped_surrogate_matches_loops(dual_clip):
    rng, mask = random_tokens(2)
    logprobs, old = rng.normal(scale=0.3, size=(2, *mask.shape)).astype(np.float32) - 1.0
    advantages = rng.normal(size=mask.shape).astype(np.float32)
    per_token, _ = pl.clipped_surrogate(
        logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.3, dual_clip=dual_clip
    )
    expected = np_surrogate(logprobs, old, advantages, mask, 0.2, 0.3, dual_clip)
    np.testing.assert_allclose(per_token, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_symmetric_clip_token_mean_equals_ppo_actor_loss(dual_clip):
    rng, mask = random_tokens(3)
    logprobs, old = rng.normal(scale=0.3, size=(2, *mask.shape)).astype(np.float32) - 1.0
    advantages = rng.normal(size=mask.shape).astype(np.float32)
    per_token, ind = pl.clipped_surrogate(
        logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=dual_clip
    )
    loss = pl.aggregate(per_token, mask, "token_mean", horizon=mask.shape[1])
    expected, stats = ppo_math.actor_loss(logprobs, old, advantages, mask, cliprange=0.2, dual_clip=dual_clip)
    assert float(loss) == float(expected)
    for name, key in [("clipfrac", "clipfrac"), ("approx_kl", "approx_kl"), ("ratio", "ratio_mean")]:
        np.testing.assert_allclose(ppo_math.masked_mean(ind[name], mask), stats[key], rtol=1e-6)
    if dual_clip is not None:
        np.testing.assert_allclose(ppo_math.masked_mean(ind["dual_clipfrac"], mask), stats["dual_clipfrac"])


def test_aggregate_hand_worked():
    per_token = jnp.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
    totals = pl.loss_totals(mask)
    assert {k: float(v) for k, v in totals.items()} == {"tokens": 4.0, "sequences": 2.0, "rows": 3.0}
    np.testing.assert_allclose(pl.aggregate(per_token, mask, "token_mean", horizon=4), 10 / 4)
    np.testing.assert_allclose(pl.aggregate(per_token, mask, "sequence_mean", horizon=4), (2.0 + 4.0) / 2)
    np.testing.assert_allclose(pl.aggregate(per_token, mask, "constant", horizon=4), 10 / (3 * 4))
    # An all-empty batch gives 0, not NaN.
    for mode in pl.AGGREGATIONS:
        assert float(pl.aggregate(per_token, jnp.zeros_like(mask), mode, horizon=4)) == 0.0
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        pl.aggregate(per_token, mask, "mean", horizon=4)


@pytest.mark.parametrize("mode", pl.AGGREGATIONS)
def test_aggregate_matches_loops_and_microbatches_sum_to_the_batch(mode):
    rng, mask = random_tokens(4, batch=8, length=7)
    per_token = rng.normal(size=mask.shape).astype(np.float32)
    whole = pl.aggregate(per_token, mask, mode, horizon=7)
    np.testing.assert_allclose(whole, np_aggregate(per_token, mask, mode, 7), rtol=1e-5)
    totals = pl.loss_totals(mask)
    for parts in (2, 4):
        pieces = zip(np.split(per_token, parts), np.split(mask, parts))
        summed = sum(pl.aggregate(x, m, mode, horizon=7, totals=totals) for x, m in pieces)
        np.testing.assert_allclose(summed, whole, rtol=1e-6)


def test_kl_loss_is_the_kl_penalty():
    logprobs, ref = jnp.log(jnp.array([[0.5, 0.25]])), jnp.log(jnp.array([[0.25, 0.5]]))
    np.testing.assert_allclose(pl.kl_loss(logprobs, ref), [[-0.5 + math.log(2), 1.0 - math.log(2)]], rtol=1e-6)
    for estimator in ppo_math.KL_ESTIMATORS:
        np.testing.assert_array_equal(
            pl.kl_loss(logprobs, ref, estimator), ppo_math.kl_penalty(logprobs, ref, estimator)
        )


def test_rollout_correction_hand_worked():
    ratios = jnp.array([[0.4, 0.6, 1.0, 1.9, 2.5, 7.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.float32)
    train, rollout = jnp.log(ratios), jnp.zeros_like(ratios)
    weights, touched = pl.rollout_correction(train, rollout, mask, mode="tis", cap=2.0)
    np.testing.assert_allclose(weights, [[0.4, 0.6, 1.0, 1.9, 2.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(touched, [[0, 0, 0, 0, 1, 0]])
    weights, touched = pl.rollout_correction(train, rollout, mask, mode="mask", cap=2.0)
    np.testing.assert_array_equal(weights, [[0, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(touched, [[1, 0, 0, 0, 1, 0]])
    weights, touched = pl.rollout_correction(train, rollout, mask, mode="none", cap=2.0)
    np.testing.assert_array_equal(weights, mask)
    np.testing.assert_array_equal(touched, 0.0)
    with pytest.raises(ValueError, match="rollout correction 'is'"):
        pl.rollout_correction(train, rollout, mask, mode="is", cap=2.0)


def test_rollout_correction_weights_carry_no_gradient():
    train, rollout, mask = jnp.array([[-0.5, -1.0]]), jnp.array([[-1.0, -1.0]]), jnp.ones((1, 2))

    def loss(train):
        weights, _ = pl.rollout_correction(train, rollout, mask, mode="tis", cap=2.0)
        return jnp.sum(weights * train)

    np.testing.assert_allclose(jax.grad(loss)(train), [[math.exp(0.5), 1.0]], rtol=1e-6)


def test_everything_jits():
    scores, valid = random_batch(5)
    rng, mask = random_tokens(5)
    tokens = rng.normal(size=mask.shape).astype(np.float32)
    partial = functools.partial
    cases = [
        (partial(adv.group_advantages, n=4, scale_rewards="batch"), (scores, valid)),
        (partial(adv.leave_one_out_advantages, n=4), (scores, valid)),
        (partial(adv.group_mean_baseline, n=4), (scores, valid)),
        (partial(adv.reverse_cumulative_returns, gamma=0.9), (tokens, mask)),
        (adv.batch_normalized_advantages, (tokens, mask)),
        (adv.broadcast_to_tokens, (scores[: mask.shape[0]], mask)),
        (
            partial(pl.clipped_surrogate, clip_low=0.2, clip_high=0.28, dual_clip=3.0),
            (tokens, tokens * 0.9, tokens, mask),
        ),
        (pl.loss_totals, (mask,)),
        (
            lambda x, m, t: pl.aggregate(x, m, "sequence_mean", horizon=9, totals=t),
            (tokens, mask, pl.loss_totals(mask)),
        ),
        (partial(pl.kl_loss, estimator="k2"), (tokens, tokens * 0.5)),
        (partial(pl.rollout_correction, mode="mask", cap=2.0), (tokens, tokens * 0.9, mask)),
    ]
    for fn, args in cases:
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), jax.jit(fn)(*args), fn(*args))
