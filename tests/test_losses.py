"""Reward-model losses against hand-worked numbers and a transcription of DeepSpeed-Chat's loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses
from jaxrlhf.models.outputs import sequence_scores

LOG2 = math.log(2.0)


def test_sequence_scores_either_padding_side():
    values = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    mask = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 1, 0]])  # right, left, both sides
    np.testing.assert_allclose(jax.jit(sequence_scores)(values, mask), [3.0, 8.0, 11.0])


def test_final_token_loss_hand_worked_with_left_and_right_padding():
    # Pair 0 right-padded, pair 1 left-padded; padding positions hold garbage.
    chosen_values = jnp.array([[0.0, math.log(3.0), 99.0], [-99.0, 0.0, 0.5]])
    chosen_mask = jnp.array([[1, 1, 0], [0, 1, 1]])
    rejected_values = jnp.array([[0.0, 99.0, 99.0], [-99.0, 0.2, 0.5]])
    rejected_mask = jnp.array([[1, 0, 0], [0, 1, 1]])
    chosen = sequence_scores(chosen_values, chosen_mask)
    rejected = sequence_scores(rejected_values, rejected_mask)
    loss_fn = jax.jit(losses.pairwise_loss_final_token)
    # Pair 0: c - r = log 3 -> -log(3/4); pair 1: c - r = 0 -> log 2.
    np.testing.assert_allclose(loss_fn(chosen, rejected), (math.log(4 / 3) + LOG2) / 2, rtol=1e-6)
    # Centering adds coef * mean((c + r)^2) = 0.5 * ((log 3)^2 + 1^2) / 2.
    centered = loss_fn(chosen, rejected, centering_coef=0.5)
    np.testing.assert_allclose(centered, (math.log(4 / 3) + LOG2) / 2 + 0.5 * (math.log(3.0) ** 2 + 1.0) / 2, rtol=1e-6)


def test_deepspeed_chat_loss_hand_worked():
    pad = 0
    chosen_ids = jnp.array(
        [
            [5, 6, 7, 8, pad, pad],  # pair 0: diverges at 2, chosen longer (ends 4)
            [5, 6, 7, 8, 9, 1],  # pair 1: long shared prefix, diverges at the last position
            [5, 6, 7, pad, pad, pad],  # pair 2: identical
        ]
    )
    rejected_ids = jnp.array([[5, 6, 9, pad, pad, pad], [5, 6, 7, 8, 9, 2], [5, 6, 7, pad, pad, pad]])
    chosen_mask = (chosen_ids != pad).astype(jnp.int32)
    rejected_mask = (rejected_ids != pad).astype(jnp.int32)
    log3 = math.log(3.0)
    # Shared-prefix positions hold a +-100 gap that would dominate the loss if they counted.
    chosen_values = jnp.array(
        [
            [-100.0, -100.0, log3, 0.7, 50.0, 50.0],
            [-100.0, -100.0, -100.0, -100.0, -100.0, 0.0],
            [-100.0, -100.0, 0.4, 50.0, 50.0, log3],
        ]
    )
    rejected_values = jnp.array(
        [
            [100.0, 100.0, 0.0, 0.7, -50.0, -50.0],
            [100.0, 100.0, 100.0, 100.0, 100.0, log3],
            [100.0, 100.0, 0.9, -50.0, -50.0, 0.0],
        ]
    )
    loss, chosen_scores, rejected_scores = jax.jit(losses.pairwise_loss_deepspeed_chat)(
        chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_mask, rejected_mask
    )
    pair0 = (math.log(4 / 3) + LOG2) / 2  # span [2, 4): gaps log 3 and 0
    pair1 = math.log(4.0)  # span [5, 6): gap -log 3
    pair2 = math.log(4 / 3)  # identical ids: last position T-1 only, gap log 3
    np.testing.assert_allclose(loss, (pair0 + pair1 + pair2) / 3, rtol=1e-6)
    # Each sequence's value at its own last real token; identical pairs reuse chosen's end.
    np.testing.assert_allclose(chosen_scores, [0.7, 0.0, 0.4])
    np.testing.assert_allclose(rejected_scores, [0.0, log3, 0.9])


def deepspeed_chat_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, pad_id):
    """Transcription of DeepSpeed-Chat RewardModel.forward's loop (num_padding_at_beginning=0)."""
    batch, seq_len = chosen_ids.shape
    loss, chosen_scores, rejected_scores = 0.0, [], []
    for i in range(batch):
        c_inds = np.nonzero(chosen_ids[i] == pad_id)[0]
        c_ind = c_inds[0] if len(c_inds) > 0 else seq_len
        check_divergence = np.nonzero(chosen_ids[i] != rejected_ids[i])[0]
        if len(check_divergence) == 0:
            end_ind = seq_len
            divergence_ind = end_ind - 1
            r_ind = c_ind
        else:
            r_inds = np.nonzero(rejected_ids[i] == pad_id)[0]
            r_ind = r_inds[0] if len(r_inds) > 0 else seq_len
            end_ind = max(c_ind, r_ind)
            divergence_ind = check_divergence[0]
        c_truncated = chosen_values[i, divergence_ind:end_ind]
        r_truncated = rejected_values[i, divergence_ind:end_ind]
        chosen_scores.append(chosen_values[i, c_ind - 1])
        rejected_scores.append(rejected_values[i, r_ind - 1])
        loss += np.mean(np.logaddexp(0.0, -(c_truncated - r_truncated)))
    return loss / batch, np.array(chosen_scores), np.array(rejected_scores)


def test_deepspeed_chat_loss_matches_transcription_on_random_right_padded_pairs():
    rng = np.random.default_rng(0)
    batch, seq_len, pad = 6, 10, 0
    chosen_ids = np.full((batch, seq_len), pad)
    rejected_ids = np.full((batch, seq_len), pad)
    for i in range(batch):
        prefix = rng.integers(1, 9, size=rng.integers(1, 6))
        chosen_tail = rng.integers(1, 9, size=rng.integers(0, seq_len - len(prefix) + 1))
        rejected_tail = rng.integers(1, 9, size=rng.integers(0, seq_len - len(prefix) + 1))
        chosen = np.concatenate([prefix, chosen_tail])
        rejected = chosen if i == 0 else np.concatenate([prefix, rejected_tail])  # row 0: identical pair
        chosen_ids[i, : len(chosen)] = chosen
        rejected_ids[i, : len(rejected)] = rejected
    chosen_values = rng.normal(size=(batch, seq_len)).astype(np.float32)
    rejected_values = rng.normal(size=(batch, seq_len)).astype(np.float32)
    rejected_values[0] = chosen_values[0]  # the model scores identical inputs identically

    got = losses.pairwise_loss_deepspeed_chat(
        chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_ids != pad, rejected_ids != pad
    )
    expected = deepspeed_chat_loss(chosen_values, rejected_values, chosen_ids, rejected_ids, pad)
    for got_part, expected_part in zip(got, expected):
        np.testing.assert_allclose(got_part, expected_part, rtol=1e-5)


def test_deepspeed_chat_loss_left_padding_with_equal_padding():
    pad = 0
    chosen_ids = jnp.array([[pad, pad, 5, 6, 7]])
    rejected_ids = jnp.array([[pad, pad, 5, 6, 8]])
    chosen_values = jnp.array([[9.0, 9.0, -100.0, -100.0, 0.0]])
    rejected_values = jnp.array([[-9.0, -9.0, 100.0, 100.0, 0.0]])
    loss, chosen_scores, rejected_scores = losses.pairwise_loss_deepspeed_chat(
        chosen_values, rejected_values, chosen_ids, rejected_ids, chosen_ids != pad, rejected_ids != pad
    )
    np.testing.assert_allclose(loss, LOG2, rtol=1e-6)  # only the last position differs
    np.testing.assert_allclose(chosen_scores, [0.0])
    np.testing.assert_allclose(rejected_scores, [0.0])


def test_pairwise_accuracy_counts_ties_as_wrong():
    accuracy = jax.jit(losses.pairwise_accuracy)(jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 2.0, 4.0]))
    np.testing.assert_allclose(accuracy, 1 / 3, rtol=1e-6)
