"""Evaluation on held-out prompts, shared by step 3 (every algorithm) and DPO: a policy answers the
same prompts with the same sampling settings and key every time; its answers are scored by the
training reward (the proxy: reward model and/or functions) and, where the task has one, by a gold
reward that training never sees. Evaluated every `ppo.eval_every` iterations, the two make the
over-optimisation curve (`ppo/eval_curve.jsonl`, `ppo/eval_curve.png`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np
from matplotlib.figure import Figure

from jaxrlhf.data.tokenize import pad_token_id, tokenize_prompts
from jaxrlhf.generation.generate import SamplingSettings
from jaxrlhf.generation.prompting import decode_answers
from jaxrlhf.parallel.mesh import to_host

EVALUATION_KEY = 10**6  # folded into the run's key: the same sampling noise for every evaluation


@dataclasses.dataclass
class HeldOutPrompts:
    """The evaluation prompts: this process's rows of the arrays, and every prompt's text."""

    arrays: dict[str, np.ndarray]
    texts: list[str]


def held_out_prompts(ctx, records, tokenizer) -> HeldOutPrompts:
    """This process's rows of the evaluation prompts (a multiple of both layouts' replicas), and all their texts."""
    ppo = ctx.config.ppo
    arrays, kept = tokenize_prompts(
        records, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt, cache_dir=ctx.cache_dir
    )
    # whole rows for the training layout's replicas and for the generation layout's
    replicas = math.lcm(
        ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"], ctx.mesh.devices.size // ctx.config.generation.tensor_parallel
    )
    count = min(ppo.eval_prompts, len(kept)) // replicas * replicas
    rows = count // jax.process_count()  # each process feeds its own rows of the global eval batch
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    return HeldOutPrompts(
        {name: arrays[name][:count][mine] for name in ("prompt_ids", "prompt_mask")},
        [records[int(i)].prompt for i in kept[:count]],
    )


def decode_engine(generation, rows: int) -> tuple[str, int]:
    """(engine, slots) for generating `rows` rows at a time, as `generation.engine` says: "auto"
    refills where the planner left fewer slots than rows (the rows' KV cache does not fit), and
    decodes statically otherwise (one slot per row: the same work, no queue)."""
    if generation.engine == "static" or (generation.engine == "auto" and not 0 < generation.slots < rows):
        return "static", 0
    return "refill", generation.slots


def sampling_settings(config, tokenizer) -> SamplingSettings:
    """Rollout sampling from the run's generation section; answers up to ppo.max_answer_seq_len,
    by the engine `decode_engine` picks for a rollout's rows."""
    generation = config.generation
    rows = (config.ppo.prompts_per_iteration + config.ppo.oversample_prompts) * config.ppo.samples_per_prompt
    engine, slots = decode_engine(generation, rows)
    return SamplingSettings(
        eos_id=tokenizer.eos_token_id,
        pad_id=pad_token_id(tokenizer),
        max_new_tokens=config.ppo.max_answer_seq_len,
        min_new_tokens=generation.min_new_tokens,
        temperature=generation.temperature,
        top_k=generation.top_k,
        top_p=generation.top_p,
        greedy=generation.greedy,
        attention=generation.attention,
        engine=engine,
        slots=slots,
        refill_chunk=generation.refill_chunk,
    )


def held_out_answers(engine, policy_states: tuple, device_batch, held_out: HeldOutPrompts, key, tokenizer, prompt_len):
    """A policy's sampled answers to the held-out prompts: (rollout, answer texts)."""
    prompts = device_batch(held_out.arrays)
    out, _ = engine.generate(policy_states, prompts["prompt_ids"], prompts["prompt_mask"], key)
    answers = decode_answers(tokenizer, to_host(out.tokens), to_host(out.attention_mask), prompt_len)
    return out, answers


def gold_of_answers(gold_reward: Callable, held_out: HeldOutPrompts, answers: list[str]) -> dict:
    """The gold reward's mean and standard error over the answers, and one sample to show."""
    gold, se = mean_and_se([gold_reward(prompt, answer) for prompt, answer in zip(held_out.texts, answers)])
    return {"gold": gold, "gold_se": se, "sample": held_out.texts[0].strip() + " ->" + answers[0]}


def evaluate_policy(loop, run, policy, states) -> dict:
    """`policy` (ModelStates) answers the held-out prompts; the answers are scored by the training
    reward (`states`' reward model and the loop's functions), their KL to `states.reference`, and
    the gold reward where the task has one."""
    out, answers = held_out_answers(
        loop.engine,
        (policy.params, policy.frozen),
        loop.device_batch,
        run.held_out,
        jax.random.fold_in(loop.key, EVALUATION_KEY),
        run.tokenizer,
        loop.prompt_len,
    )
    function_scores, _ = loop.function_scores(out.tokens, out.attention_mask, prompts=run.held_out.texts)
    rows = {
        k: to_host(v) for k, v in run.evaluation_fn(states, out.tokens, out.attention_mask, function_scores).items()
    }
    result = {"reward_score": None, "reward_score_se": None}
    result["reward_score"], result["reward_score_se"] = mean_and_se(rows["score"])
    result["kl_to_sft"] = float(np.mean(rows["kl"]))
    result["answer_length"] = float(np.mean(rows["answer_length"]))
    if run.hooks.gold_reward is not None:
        result.update(gold_of_answers(run.hooks.gold_reward, run.held_out, answers))
    return result


def mean_and_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def without_sample(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if k != "sample"}


def append_to_curve(path: str, iteration: int, evaluation: dict) -> None:
    """One line of the gold-against-proxy curve (process 0 writes)."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as lines:
            lines.write(json.dumps({"iteration": iteration, **without_sample(evaluation)}) + "\n")


def rewind_curve(path: str, iteration: int) -> None:
    """Drops the curve's points after `iteration` (a resumed run evaluates them again)."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    kept = []
    for line in open(path):
        try:
            if json.loads(line)["iteration"] <= iteration:
                kept.append(line)
        except ValueError:  # a line cut short by the kill
            continue
    temporary = f"{path}.tmp"
    with open(temporary, "w") as out:
        out.writelines(kept)
    os.replace(temporary, path)


def plot_curve(path: str, png: str) -> None:
    """The proxy (training reward) and the gold reward of the held-out answers against the
    iteration, with their standard errors: where they part is where the policy over-optimises."""
    points: dict[int, dict] = {}
    for line in open(path):
        point = json.loads(line)
        points[point["iteration"]] = point
    iterations = sorted(points)
    curves = [("reward_score", "training reward (proxy)"), ("gold", "gold reward")]
    curves = [(key, label) for key, label in curves if all(points[i].get(key) is not None for i in iterations)]
    figure = Figure(figsize=(6, 2.4 * len(curves)), layout="constrained")
    axes = figure.subplots(len(curves), 1, sharex=True, squeeze=False)[:, 0]
    for axis, (key, label) in zip(axes, curves):
        mean = np.array([points[i][key] for i in iterations])
        se = np.array([points[i][f"{key}_se"] for i in iterations])
        axis.plot(iterations, mean, marker=".")
        axis.fill_between(iterations, mean - se, mean + se, alpha=0.3)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_title("held-out prompts: proxy against gold")
    axes[-1].set_xlabel("iteration")
    figure.savefig(png, dpi=100)
