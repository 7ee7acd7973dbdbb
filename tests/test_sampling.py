"""Token sampling: filters keep only allowed tokens, frequencies follow the tempered softmax, rows are independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.generation.sampling import filtered_logits, sample_tokens, suppress_eos

SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "greedy")
sample = jax.jit(sample_tokens, static_argnames=SAMPLING_SETTINGS)


def draws_from_one_row(row_logits, num_draws, seed, **settings):
    """`num_draws` samples of one distribution in a single vectorised call (one key per copy)."""
    logits = jnp.broadcast_to(row_logits, (num_draws, row_logits.shape[-1]))
    keys = jax.random.split(jax.random.key(seed), num_draws)
    return np.asarray(sample(logits, keys, **settings))


def numpy_nucleus(row_logits, top_k, top_p):
    """Token ids allowed by top-k then top-p, computed independently in float64."""
    logits = np.asarray(row_logits, np.float64)
    order = np.argsort(-logits)
    if top_k:
        order = order[:top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
    return set(order[mass_before < top_p].tolist())


def test_top_k_only_emits_the_k_highest():
    row = jax.random.normal(jax.random.key(0), (50,)) * 2
    tokens = draws_from_one_row(row, 2000, seed=1, temperature=1.0, top_k=5)
    top5 = set(np.argsort(-np.asarray(row))[:5].tolist())
    assert set(tokens.tolist()) <= top5
    assert len(set(tokens.tolist())) >= 3, "top-k should still sample, not collapse to argmax"


@pytest.mark.parametrize("top_k, top_p", [(0, 0.7), (10, 0.8)])
def test_top_p_only_emits_the_nucleus(top_k, top_p):
    row = jax.random.normal(jax.random.key(2), (30,)) * 2
    tokens = draws_from_one_row(row, 2000, seed=3, temperature=1.0, top_k=top_k, top_p=top_p)
    nucleus = numpy_nucleus(row, top_k, top_p)
    assert 1 < len(nucleus) < 30
    assert set(tokens.tolist()) <= nucleus
    assert set(tokens.tolist()) == nucleus, "every nucleus token has enough mass to show up in 2000 draws"


def test_tiny_top_p_keeps_the_top_token():
    row = jnp.array([0.0, 3.0, 1.0, 2.0])
    tokens = draws_from_one_row(row, 100, seed=4, temperature=1.0, top_p=1e-6)
    assert set(tokens.tolist()) == {1}


def test_temperature_zero_equals_greedy_equals_argmax():
    logits = jax.random.normal(jax.random.key(5), (16, 40))
    keys = jax.random.split(jax.random.key(6), 16)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    greedy = sample(logits, keys, temperature=0.8, top_k=5, top_p=0.9, greedy=True)
    cold = sample(logits, keys, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), argmax)
    np.testing.assert_array_equal(np.asarray(cold), argmax)
    assert greedy.dtype == jnp.int32


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_frequencies_match_tempered_softmax():
    row = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
    tokens = draws_from_one_row(jnp.asarray(row), 6000, seed=7, temperature=0.5)
    tempered = np.exp(row / 0.5) / np.exp(row / 0.5).sum()
    untempered = np.exp(row) / np.exp(row).sum()
    # 5 degrees of freedom: the 99.9% quantile of chi-square is about 20.5.
    assert chi_square(tokens, tempered) < 30
    assert chi_square(tokens, untempered) > 300, "the temperature must change the distribution"


def test_a_rows_token_does_not_depend_on_the_other_rows():
    logits = jax.random.normal(jax.random.key(8), (8, 64)) * 3
    keys = jax.random.split(jax.random.key(9), 8)
    settings = dict(temperature=1.3, top_k=20, top_p=0.95)
    full_batch = np.asarray(sample(logits, keys, **settings))
    picked = np.array([5, 2, 7])
    sub_batch = np.asarray(sample(logits[picked], keys[picked], **settings))
    np.testing.assert_array_equal(sub_batch, full_batch[picked])


def test_no_nan_with_huge_bf16_logits():
    logits = jnp.array([[3e38, -3e38, 1e4, 0.0, -1e4], [-3e38, -3e38, 1e3, 1e3 - 1, 2e38]], dtype=jnp.bfloat16)
    for settings in (dict(temperature=0.7), dict(temperature=0.3, top_k=3, top_p=0.9)):
        filtered = filtered_logits(logits, **{"top_k": 0, "top_p": 1.0, **settings})
        assert np.all(np.isfinite(np.asarray(filtered)))
        tokens = draws_from_one_row(logits[0], 50, seed=10, **settings)
        assert set(tokens.tolist()) == {0}, "a logit 3e38 above the rest takes all the mass"
    keys = jax.random.split(jax.random.key(11), 2)
    np.testing.assert_array_equal(np.asarray(sample(logits, keys, temperature=0.7)), [0, 4])


def test_suppress_eos_until_min_new_tokens():
    logits = jnp.array([[0.0, 5.0, 1.0], [2.0, 9.0, 1.0]], dtype=jnp.float16)  # EOS (1) is the argmax
    suppress = jax.jit(lambda step: suppress_eos(logits, eos_id=1, step=step, min_new_tokens=3))
    early = suppress(2)
    assert np.all(np.isfinite(np.asarray(early, np.float32)))
    assert np.all(np.asarray(early[:, 1], np.float32) < -6e4)
    np.testing.assert_array_equal(np.asarray(early[:, [0, 2]]), np.asarray(logits[:, [0, 2]]))
    np.testing.assert_array_equal(np.argmax(np.asarray(early), axis=-1), [2, 0])
    np.testing.assert_array_equal(np.asarray(suppress(3)), np.asarray(logits))


def test_bad_settings_raise():
    logits = jnp.zeros((2, 5))
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(ValueError, match="top_p=0"):
        sample_tokens(logits, keys, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        sample_tokens(logits, keys, temperature=-1.0)
    with pytest.raises(ValueError, match="keys has 1 rows"):
        sample_tokens(logits, keys[:1], temperature=1.0)
    with pytest.raises(ValueError, match="eos_id=5"):
        suppress_eos(logits, eos_id=5, step=0, min_new_tokens=1)
