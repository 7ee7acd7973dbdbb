"""Reward functions: loading specs, run-time checks, the weighted mix, and the built-in task's format reward."""

import math

import numpy as np
import pytest

from jaxrlhf.config.checks import ConfigError
from jaxrlhf.data.builtin import _gold_parts, builtin_records, format_reward, gold_reward
from jaxrlhf.rl.rewards import RewardFunctionError, RewardMix, call_reward_function, load_reward_function

# Reward functions for the specs below ("test_rewards:<name>": pytest puts tests/ on sys.path).
NOT_CALLABLE = 3


def answer_length(prompts, answers, **fields):
    return [float(len(answer)) for answer in answers]


answer_length_alias = answer_length


def exclamations(prompts, answers, **fields):
    return np.array([answer.count("!") for answer in answers])


def with_bonus(prompts, answers, bonus):
    return [float(value) for value in bonus]


PROMPTS = ["\n\nHuman: List two fruits.\n\nAssistant:"] * 3
LONG = " this answer is long enough that its quoted start is cut at forty characters"
ANSWERS = [" apple, pear.", " Hi Bob! red.", LONG]


def raising_on_long(prompts, answers):
    if any(len(answer) > 20 for answer in answers):
        raise KeyError("too long\nsecond line")
    return [0.0] * len(answers)


def returning(values):
    return lambda prompts, answers: values


# ---------------------------------------------------------------- loading


def test_load_finds_module_functions():
    assert load_reward_function("test_rewards:answer_length", "ppo.reward[0]") is answer_length
    assert load_reward_function("jaxrlhf.data.builtin:format_reward", "ppo.reward[0]") is format_reward


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("test_rewards.answer_length", "is not 'module.path:function'"),
        ("test_rewards:answer_length:x", "is not 'module.path:function'"),
        (":answer_length", "is not 'module.path:function'"),
        ("test_rewards:", "is not 'module.path:function'"),
        ("os.path:join()", "is not 'module.path:function'"),
        ("no_such_module_for_rewards:fn", "cannot import module 'no_such_module_for_rewards' (ModuleNotFoundError"),
        ("test_rewards:no_such_function", "module 'test_rewards' has no attribute 'no_such_function'"),
        ("test_rewards:NOT_CALLABLE", "'test_rewards:NOT_CALLABLE' is not callable (a int)"),
    ],
)
def test_load_refuses_bad_specs_naming_the_key(spec, reason):
    with pytest.raises(ConfigError) as caught:
        load_reward_function(spec, "ppo.reward[1]")
    message = str(caught.value)
    assert message.startswith("ppo.reward[1]: ") and reason in message
    assert "\n" not in message


def test_load_reports_a_module_that_raises_on_import(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_module.py").write_text("raise RuntimeError('no GPU here\\nmore detail')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_reward_function("broken_reward_module:score", "ppo.reward[2]")
    message = str(caught.value)
    assert message == "ppo.reward[2]: cannot import module 'broken_reward_module' (RuntimeError: no GPU here)"


# ---------------------------------------------------------------- run-time checks


def test_call_returns_float64_scores_and_passes_fields():
    scores = call_reward_function(exclamations, "exclamations", PROMPTS, ANSWERS, None)
    assert scores.dtype == np.float64 and scores.tolist() == [0.0, 1.0, 0.0]
    bonus = {"bonus": [1, 2.5, np.float32(-1)]}
    assert call_reward_function(with_bonus, "with_bonus", PROMPTS, ANSWERS, bonus).tolist() == [1.0, 2.5, -1.0]


@pytest.mark.parametrize(
    "fn, problem, row",
    [
        (raising_on_long, "raised KeyError: 'too long", 2),
        (returning([1.0, 2.0]), "returned 2 scores for 3 answers", 2),
        (returning(1.0), "returned float, not one float per answer", 0),
        (returning("1.0"), "returned str, not one float per answer", 0),
        (returning(np.zeros((3, 1))), "returned ndarray, not one float per answer", 0),
        (returning([1.0, None, 2.0]), "returned NoneType None, not a number", 1),
        (returning([1.0, 2.0, "3.0"]), "returned str '3.0', not a number", 2),
        (returning([True, 1.0, 2.0]), "returned bool True, not a number", 0),
        (returning(np.array([1.0, 2.0, np.nan])), "returned nan", 2),
        (returning([1.0, -math.inf, 2.0]), "returned -inf", 1),
    ],
)
def test_call_reports_misbehaviour_in_one_line(fn, problem, row):
    with pytest.raises(RewardFunctionError) as caught:
        call_reward_function(fn, "my_rule", PROMPTS, ANSWERS, None)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("reward function my_rule ") and problem in message
    assert f"row {row} (answer {ANSWERS[row][:40]!r})" in message
    assert ANSWERS[2][:41] not in message  # the answer is quoted only to its start


def test_too_many_scores_is_an_error():
    with pytest.raises(RewardFunctionError, match="my_rule returned 4 scores for 3 answers"):
        call_reward_function(returning([0.0] * 4), "my_rule", PROMPTS, ANSWERS, None)


# ---------------------------------------------------------------- the mix


def test_mix_weights_the_model_and_functions():
    mix = RewardMix.from_config(["model", "test_rewards:answer_length", "test_rewards:exclamations"], [0.5, 2.0, -1.0])
    assert mix.uses_model and mix.uses_functions and mix.model_weight == 0.5
    assert [(name, weight) for name, weight, _ in mix.functions] == [("answer_length", 2.0), ("exclamations", -1.0)]
    scores, metrics = mix.function_scores(PROMPTS, ANSWERS)
    lengths = np.array([len(answer) for answer in ANSWERS], dtype=np.float64)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, 2.0 * lengths - np.array([0.0, 1.0, 0.0]))
    assert metrics["reward_fn/answer_length"] == pytest.approx(lengths.mean())
    assert metrics["reward_fn/exclamations"] == pytest.approx(1 / 3)
    assert metrics["time/reward_fn_s"] >= 0.0


def test_mix_defaults_and_single_sources():
    model_only = RewardMix.from_config(["model"], [])
    assert model_only.uses_model and not model_only.uses_functions and model_only.model_weight == 1.0
    scores, metrics = model_only.function_scores(PROMPTS, ANSWERS)
    assert scores.tolist() == [0.0, 0.0, 0.0] and metrics == {}

    rules_only = RewardMix.from_config(["jaxrlhf.data.builtin:format_reward"], [])
    assert not rules_only.uses_model and rules_only.functions[0][:2] == ("format_reward", 1.0)
    scores, _ = rules_only.function_scores(PROMPTS, ANSWERS)
    assert scores.shape == (len(ANSWERS),)


def test_mix_errors_in_functions_name_the_function():
    mix = RewardMix.from_config(["model", "test_rewards:raising_on_long"], [])
    with pytest.raises(RewardFunctionError, match="reward function raising_on_long raised KeyError"):
        mix.function_scores(PROMPTS, ANSWERS)


@pytest.mark.parametrize(
    "sources, weights, message",
    [
        ([], [], "ppo.reward: needs at least one source"),
        (["model", "model"], [], "ppo.reward[1]: 'model' is listed twice"),
        (["test_rewards:answer_length", "model", "test_rewards:answer_length"], [], "ppo.reward[2]: 'test_rewards"),
        (["model", "test_rewards:answer_length"], [1.0], "ppo.reward_weights: 1 weights for 2 sources"),
        (
            ["model", "test_rewards:answer_length"],
            [1.0, math.nan],
            "ppo.reward_weights[1]: a weight must be a finite number",
        ),
        (["model"], [math.inf], "ppo.reward_weights[0]: a weight must be a finite number"),
        (["model", "test_rewards:missing"], [], "ppo.reward[1]: module 'test_rewards' has no attribute 'missing'"),
    ],
)
def test_mix_refuses_bad_configs(sources, weights, message):
    with pytest.raises(ConfigError) as caught:
        RewardMix.from_config(sources, weights)
    assert str(caught.value).startswith(message)


def test_mix_refuses_one_function_under_two_names():
    with pytest.raises(ConfigError, match=r"ppo.reward\[1\]: .* already listed"):
        RewardMix.from_config(["test_rewards:answer_length", "test_rewards:answer_length_alias"], [])


# ---------------------------------------------------------------- the built-in task's format reward

NAMED_PROMPT = "\n\nHuman: I am Alice. List three fruits.\n\nAssistant:"
PLAIN_PROMPT = "\n\nHuman: Name two colors.\n\nAssistant:"


@pytest.mark.parametrize(
    "prompt, answer, expected",
    [
        (NAMED_PROMPT, " Hi Alice! apple, pear, plum. Hope this helps!", 1.5),  # perfect
        (NAMED_PROMPT, " Hi Bob! apple, pear, plum. Hope this helps!", 0.5),  # wrong name
        (NAMED_PROMPT, " Hi Alice! apple, pear, plum. Stop asking.", -0.5),  # rude closing
        (NAMED_PROMPT, " apple, pear, plum. Have a nice day!", 1.0),  # no greeting
        (NAMED_PROMPT, " apple, apple, red, lemon, um", 0.0),  # bad list, but nothing format checks
        (PLAIN_PROMPT, " Hi Carol! red, blue. Whatever.", -1.5),  # made-up name and rude
    ],
)
def test_format_reward_by_hand(prompt, answer, expected):
    assert format_reward([prompt], [answer]) == [expected]
    assert call_reward_function(format_reward, "format_reward", [prompt], [answer], {}).tolist() == [expected]


def test_format_reward_is_the_greeting_and_closing_parts_of_gold():
    records = builtin_records(size=500, seed=3)
    prompts = [record.prompt for record in records for _ in range(2)]
    answers = [answer for record in records for answer in (record.chosen, record.rejected)]
    scores = format_reward(prompts, answers)
    assert len(scores) == len(answers) and len(set(scores)) >= 5  # every greeting x closing mix shows up
    for prompt, answer, score in zip(prompts, answers, scores):
        parts = _gold_parts(prompt, answer)
        assert score == parts["greeting"] + parts["closing"]
        hidden = parts["count"] + parts["category"] + parts["distinct"] + parts["length"]
        assert gold_reward(prompt, answer) - score == pytest.approx(hidden, abs=1e-12)
