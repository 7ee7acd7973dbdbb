"""The score shaping of step 3's experience by hand: DAPO's dynamic sampling (uniform groups, the
informative groups kept at a fixed batch size) and its soft overlong penalty."""

import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.rl.experience import Experience, informative_groups_first, overlong_penalty, uniform_groups


def test_uniform_groups_are_those_whose_kept_scores_are_all_equal():
    scores = jnp.array([1.0, 1.0, 1.0, 0.0, 2.0, 5.0, 3.0, 3.0])
    kept = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    # groups of 2: (1, 1) uniform; (1, 0) not; (2, [5 dropped]) one kept row: uniform; (3, 3) uniform
    np.testing.assert_array_equal(uniform_groups(scores, kept, 2), [1, 1, 0, 0, 1, 1, 1, 1])
    # groups of 4: (1, 1, 1, 0) not; (2, 3, 3) not
    np.testing.assert_array_equal(uniform_groups(scores, kept, 4), [0] * 8)


def test_overlong_penalty_is_zero_then_linear_to_the_limit():
    settings = types.SimpleNamespace(overlong_buffer=4, overlong_penalty=1.0, max_answer_seq_len=10)
    lengths = jnp.array([3.0, 6.0, 7.0, 8.0, 10.0])
    np.testing.assert_allclose(overlong_penalty(lengths, settings), [0, 0, -0.25, -0.5, -1.0])
    settings.overlong_buffer = 0
    np.testing.assert_allclose(overlong_penalty(lengths, settings), [0] * 5)


def test_oversampled_batch_keeps_the_first_informative_groups_at_a_fixed_size():
    n, generated, wanted = 2, 4, 2
    rows = n * generated
    arange = jnp.arange(rows, dtype=jnp.float32)
    per_token = jnp.tile(arange[:, None], (1, 3))
    experience = Experience(
        tokens=per_token.astype(jnp.int32), attention_mask=per_token, action_mask=per_token, span_mask=per_token,
        old_logprobs=per_token, ref_logprobs=per_token, correction=per_token, advantages=per_token,
        scores=arange, kept=jnp.array([0, 0, 1, 0, 0, 0, 1, 1], jnp.float32),
    )  # fmt: skip
    chosen, stats = jax.jit(informative_groups_first, static_argnums=(1, 2))(experience, wanted, n)
    np.testing.assert_array_equal(chosen.scores, [2, 3, 6, 7])  # groups 1 and 3, in order
    assert chosen.tokens.shape == (wanted * n, 3) and float(stats["informative_group_share"]) == 1.0
    too_few = Experience(**{**experience.__dict__, "kept": jnp.array([0, 0, 0, 0, 1, 0, 0, 0], jnp.float32)})
    chosen, stats = informative_groups_first(too_few, wanted, n)
    np.testing.assert_array_equal(chosen.scores, [4, 5, 0, 1])  # topped up with a masked group
    np.testing.assert_array_equal(chosen.kept, [1, 0, 0, 0])
    assert float(stats["informative_group_share"]) == 0.5


def test_an_iteration_of_uniform_groups_teaches_nothing_but_does_not_stop_the_run():
    import pytest

    from jaxrlhf.rl.ppo import require_kept_rows

    require_kept_rows({"kept_fraction": 0.0, "uniform_group_share": 1.0}, 3)  # every group answered alike
    with pytest.raises(ValueError, match="iteration 3: every answer was dropped"):
        require_kept_rows({"kept_fraction": 0.0, "uniform_group_share": 0.5}, 3)  # the rest were too short
