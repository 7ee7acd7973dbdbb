"""Reward functions: Python rules that score answers on the host, beside the learned reward model.

The contract of a reward function:

    fn(prompts: list[str], answers: list[str], **fields) -> Sequence[float]

one finite float per answer. `fields` are the rows' extra data columns, each a list as long as
`answers` (none for the built-in task). It runs on the host once per rollout batch, so it may be
plain Python. A config names one as "module.path:function" (imported, never evaluated), and
`RewardMix` weighs the functions and the reward model ("model") into the training reward.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxrlhf.config.checks import ConfigError

MODEL = "model"  # the source name of the learned reward model
ANSWER_START = 40  # characters of a bad answer quoted in an error


class RewardFunctionError(ValueError):
    """A reward function misbehaved at run time; the message is one line naming it and the first bad row."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def load_reward_function(spec: str, key: str) -> Callable:
    """The callable named by `spec` ("module.path:function"); ConfigError naming `key` when it is not one."""
    module_name, colon, attribute = spec.partition(":")
    names = module_name.split(".") + attribute.split(".")
    if not colon or not all(name.isidentifier() for name in names):
        raise ConfigError(f"{key}: {spec!r} is not 'module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as error:
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({_first_line(error)})") from error
    target = module
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise ConfigError(f"{key}: {spec!r} is not callable (a {type(target).__name__})")
    return target


def _row(answers: Sequence[str], index: int) -> str:
    if index >= len(answers):
        return f"row {index} (no such answer)"
    return f"row {index} (answer {str(answers[index])[:ANSWER_START]!r})"


def _first_raising_row(fn: Callable, prompts: list, answers: list, fields: dict[str, list]) -> int | None:
    """The first row on which `fn` raises when called on that row alone, or None."""
    for index in range(len(answers)):
        row_fields = {name: [values[index]] for name, values in fields.items()}
        try:
            fn([prompts[index]], [answers[index]], **row_fields)
        except Exception:
            return index
    return None


def _as_values(result: object) -> list | None:
    """The elements of a function's result, or None when it is not a flat sequence or array."""
    if isinstance(result, (str, bytes)):
        return None
    if isinstance(result, np.ndarray) or (hasattr(result, "__array__") and not isinstance(result, Sequence)):
        array = np.asarray(result)
        return array.tolist() if array.ndim == 1 else None
    return list(result) if isinstance(result, Sequence) else None


def call_reward_function(
    fn: Callable, name: str, prompts: Sequence[str], answers: Sequence[str], fields: dict[str, list] | None
) -> np.ndarray:
    """`fn`'s scores of the answers as float64 [batch]; RewardFunctionError (one line) when it misbehaves."""
    prompts, answers, fields = list(prompts), list(answers), dict(fields or {})
    where = f"reward function {name}"
    try:
        result = fn(prompts, answers, **fields)
    except Exception as error:
        row = _first_raising_row(fn, prompts, answers, fields)
        at = f"first failing {_row(answers, row)}" if row is not None else "on the batch, no row alone"
        raise RewardFunctionError(f"{where} raised {_first_line(error)}; {at}") from error
    values = _as_values(result)
    if values is None:
        problem = f"returned {type(result).__name__}, not one float per answer"
        raise RewardFunctionError(f"{where} {problem}; first answer without a score: {_row(answers, 0)}")
    if len(values) < len(answers):
        problem = f"returned {len(values)} scores for {len(answers)} answers"
        raise RewardFunctionError(f"{where} {problem}; first answer without a score: {_row(answers, len(values))}")
    if len(values) > len(answers):
        raise RewardFunctionError(f"{where} returned {len(values)} scores for {len(answers)} answers")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            problem = f"returned {type(value).__name__} {repr(value)[:20]}, not a number"
            raise RewardFunctionError(f"{where} {problem} at {_row(answers, index)}")
        if not math.isfinite(value):
            raise RewardFunctionError(f"{where} returned {float(value)} at {_row(answers, index)}")
    return np.asarray([float(value) for value in values], dtype=np.float64)


def _check_weight(weight: object, key: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ConfigError(f"{key}: a weight must be a finite number, got {weight!r}")
    return float(weight)


def _short_names(specs: list[str]) -> list[str]:
    """Each spec's function name, or the whole spec where two functions share a name."""
    short = [spec.partition(":")[2] for spec in specs]
    return [name if short.count(name) == 1 else spec for name, spec in zip(short, specs)]


@dataclasses.dataclass(frozen=True)
class RewardMix:
    """The training reward: `model_weight` x the reward model (0 = not used) + sum of weight x function."""

    model_weight: float
    functions: tuple[tuple[str, float, Callable], ...] = ()  # (name, weight, fn)

    @classmethod
    def from_config(cls, sources: list[str], weights: list[float], key: str = "ppo.reward") -> RewardMix:
        """Sources are "model" or "module.path:function"; `weights` is empty (all 1.0) or one per source.

        Errors are ConfigErrors naming `key` (`key`_weights for the weights)."""
        if not sources:
            raise ConfigError(f"{key}: needs at least one source ('{MODEL}' or 'module.path:function')")
        if weights and len(weights) != len(sources):
            raise ConfigError(f"{key}_weights: {len(weights)} weights for {len(sources)} sources (give one each)")
        weights = [_check_weight(w, f"{key}_weights[{i}]") for i, w in enumerate(weights)] or [1.0] * len(sources)
        model_weight, specs, function_weights, loaded = 0.0, [], [], []
        for index, (source, weight) in enumerate(zip(sources, weights)):
            if source in sources[:index]:
                raise ConfigError(f"{key}[{index}]: {source!r} is listed twice")
            if source == MODEL:
                model_weight = weight
                continue
            fn = load_reward_function(source, f"{key}[{index}]")
            if any(fn is other for other in loaded):
                raise ConfigError(f"{key}[{index}]: {source!r} is a function already listed under another name")
            specs.append(source)
            function_weights.append(weight)
            loaded.append(fn)
        names = _short_names(specs)
        return cls(model_weight, tuple(zip(names, function_weights, loaded)))

    @property
    def uses_model(self) -> bool:
        return self.model_weight != 0.0

    @property
    def uses_functions(self) -> bool:
        return bool(self.functions)

    def function_scores(
        self, prompts: Sequence[str], answers: Sequence[str], fields: dict[str, list] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The weighted sum of the functions' scores, float32 [batch], and their metrics (batch mean
        per function under "reward_fn/<name>", wall seconds under "time/reward_fn_s")."""
        total = np.zeros(len(answers), dtype=np.float64)
        if not self.functions:
            return total.astype(np.float32), {}
        metrics = {}
        started = time.perf_counter()
        for name, weight, fn in self.functions:
            scores = call_reward_function(fn, name, prompts, answers, fields)
            total += weight * scores
            metrics[f"reward_fn/{name}"] = float(scores.mean()) if len(scores) else 0.0
        metrics["time/reward_fn_s"] = time.perf_counter() - started
        return total.astype(np.float32), metrics
