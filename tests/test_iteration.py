"""One PPO iteration on its own: it takes one optimizer step per minibatch and epoch for the actor and
the critic, reports every phase, and depends only on the state and the iteration number."""

import dataclasses

import jax
import numpy as np
import pytest
from hf_fixtures import random_reward_model

from jaxrlhf.config import load_config
from jaxrlhf.metrics import MetricsLogger
from jaxrlhf.parallel import make_mesh
from jaxrlhf.rl.iteration import run_iteration
from jaxrlhf.rl.ppo import prepare_run
from jaxrlhf.run_context import RunContext
from jaxrlhf.train import task_hooks

SETTINGS = [
    "steps=[ppo]",
    "ppo.actor_model.path=builtin",
    "data.builtin_size=1000",
    "ppo.prompts_per_iteration=8",
    "ppo.num_minibatches=2",
    "ppo.ppo_epochs=3",
    "ppo.eval_prompts=8",
    "ppo.max_answer_seq_len=8",
    "tensorboard=false",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("iteration")
    reward_model = random_reward_model(str(out), str(out / "cache"))
    roles = [f"ppo.critic_model.path={reward_model}"]  # the reward model comes from the critic's path
    config = load_config([*SETTINGS, *roles, f"output_dir={out}", f"data.cache_dir={out / 'cache'}"])
    ctx = RunContext(config, make_mesh(devices=jax.devices()[:1]), MetricsLogger(out, tensorboard=False))
    return prepare_run(ctx, task_hooks(config))


def copy(state):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def test_one_iteration_steps_both_models_and_reports_every_phase(prepared):
    run, initial = prepared
    state, stats = run_iteration(run.loop, copy(initial), iteration=0, kl_coef=0.1)
    updates = 3 * 2  # epochs x minibatches
    assert int(state.actor.step) == updates and int(state.critic.step) == updates
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), state.actor.params, initial.actor.params)
    assert any(jax.tree.leaves(changed))
    for key in (
        "score",
        "kl",
        "advantage_mean",
        "actor_loss",
        "critic_loss",
        "clipfrac",
        "time/generation_s",
        "time/experience_s",
        "time/train_s",
        "samples_per_s",
    ):
        assert np.isfinite(stats[key]), key


def test_the_kl_coefficient_weighs_the_kl_penalty_in_the_critics_targets(prepared):
    """kl_coef changes neither the rollouts nor their scores; it weighs the per-token KL penalty of
    the rewards, so the critic's returns move in proportion to it, and not at all while the actor
    is still the reference."""
    run, initial = prepared
    position = run.loop.prompts.position

    def iterate(state, kl_coef):  # the same prompts and sampling key each time
        run.loop.prompts.position = position
        return run_iteration(run.loop, copy(state), iteration=1, kl_coef=kl_coef)

    unmoved = [iterate(initial, kl_coef)[1] for kl_coef in (0.0, 0.5)]
    assert unmoved[0]["kl"] == unmoved[1]["kl"] == 0.0  # the actor starts as the reference
    assert unmoved[0]["return_mean"] == unmoved[1]["return_mean"]

    moved, _ = iterate(initial, 0.1)  # six updates away from the reference
    stats = [iterate(moved, kl_coef)[1] for kl_coef in (0.0, 0.5, 1.0)]
    for key in ("score", "kl", "answer_length", "value_mean"):
        assert stats[0][key] == stats[1][key] == stats[2][key], key
    assert stats[0]["kl"] != 0
    returns = [row["return_mean"] for row in stats]
    assert abs(returns[1] - returns[0]) > 1e-4 * abs(returns[0]), returns
    assert returns[2] - returns[0] == pytest.approx(2 * (returns[1] - returns[0]), rel=1e-2), returns


def test_an_iteration_depends_only_on_the_state_its_prompts_and_its_number(prepared):
    run, initial = prepared
    position = run.loop.prompts.position

    def iterate(iteration):
        run.loop.prompts.position = position  # the same prompt batch each time
        return run_iteration(run.loop, copy(initial), iteration=iteration, kl_coef=0.1)[1]

    first = [iterate(0) for _ in range(2)]
    other = iterate(1)  # another sampling key
    for key in ("score", "actor_loss", "critic_loss", "answer_length"):
        assert first[0][key] == first[1][key], key
    assert any(first[0][key] != other[key] for key in ("score", "actor_loss", "answer_length"))


def test_refill_and_static_rollouts_give_the_same_iteration(prepared):
    """The same prompts and key: the refill engine's rollouts are static generation's, so every
    metric but the timings and the decode-step counts is the same, under the same keys."""
    run, initial = prepared
    position, engine = run.loop.prompts.position, run.loop.engine
    configured = engine.settings
    assert configured.engine == "static"  # "auto", and every row's cache fits
    results = {}
    try:
        for name, settings in (
            ("static", dataclasses.replace(configured, engine="static", slots=0)),
            ("refill", dataclasses.replace(configured, engine="refill", slots=2, refill_chunk=1)),
        ):
            engine.settings = settings
            run.loop.prompts.position = position
            results[name] = run_iteration(run.loop, copy(initial), iteration=2, kl_coef=0.1)[1]
    finally:
        engine.settings = configured
    static, refill = results["static"], results["refill"]
    assert static.keys() == refill.keys()
    speeds = ("time/", "tflops/", "samples_per_s", "generation/")
    for key, value in static.items():
        if not key.startswith(speeds):
            assert refill[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert refill["generation/decode_steps"] > static["generation/decode_steps"]  # 2 slots for 8 rows
    assert refill["time/generation_s"] > 0
