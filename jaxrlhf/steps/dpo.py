"""DPO as a step: the SFT policy trained on the preference pairs against its frozen starting
point (the loss: `steps/dpo_math.py`), exported like the PPO actor and judged the same way: answers
to the PPO slice's held-out prompts, sampled with the same settings and key, scored by the gold
reward when the task has one."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.data.tokenize import tokenize_pairs
from jaxrlhf.evaluation import (
    EVALUATION_KEY,
    gold_of_answers,
    held_out_answers,
    held_out_prompts,
    sampling_settings,
)
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.models import load_tokenizer
from jaxrlhf.run_context import RunContext
from jaxrlhf.steps.dpo_math import preference_loss
from jaxrlhf.steps.loop import SupervisedJob, run_supervised
from jaxrlhf.train_state import split_for_training, split_microbatches


def pair_logprobs(model, batch, average: bool):
    """One forward over both sides of the pairs: the log-probs of each answer's tokens (and EOS),
    summed, or averaged over them (IPO); [pairs] each."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    targets = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, 1:].astype(jnp.float32)
    logprobs, _ = model.token_logprobs(ids, mask)  # [2 pairs, seq - 1]: token t + 1 given tokens <= t
    total = (logprobs * targets).sum(-1)
    if average:
        total = total / jnp.maximum(targets.sum(-1), 1.0)
    pairs = batch["chosen_ids"].shape[0]
    return total[:pairs], total[pairs:]


def make_dpo_loss(stage) -> Callable:
    average = stage.loss == "ipo"

    def loss_fn(model, batch):
        chosen, rejected = pair_logprobs(model, batch, average)
        return preference_loss(
            chosen,
            rejected,
            batch["reference_chosen"],
            batch["reference_rejected"],
            beta=stage.beta,
            kind=stage.loss,
            label_smoothing=stage.label_smoothing,
        )

    return loss_fn


def reference_logprobs(average: bool) -> Callable:
    """graphdef -> a jitted (params, frozen, batch, microbatches) -> the reference's log-probs of
    each side, computed micro-batch by micro-batch like the train step (no larger activations than
    it), or in one piece (microbatches=1) for an eval batch, like the eval step."""

    def build(graphdef):
        def one(params, frozen, batch):
            chosen, rejected = pair_logprobs(nnx.merge(graphdef, params, frozen), batch, average)
            return {"reference_chosen": chosen, "reference_rejected": rejected}

        @functools.partial(jax.jit, static_argnames="microbatches")
        def run(params, frozen, batch, microbatches: int):
            if microbatches == 1:
                return one(params, frozen, batch)
            parts = jax.lax.map(lambda part: one(params, frozen, part), split_microbatches(batch, microbatches))
            return {name: value.reshape(-1) for name, value in parts.items()}

        return run

    return build


def run_dpo(ctx: RunContext, gold_reward: Callable | None = None) -> dict[str, float]:
    """Trains, exports <output_dir>/dpo/model, returns summary values (with the gold reward of
    the SFT and the DPO policy when `gold_reward` is given)."""
    stage = ctx.config.dpo
    job = SupervisedJob(
        name="dpo",
        stage=stage,
        previous_step="sft",
        value_head=False,
        loss_fn=make_dpo_loss(stage),
        tokenize=lambda records, tokenizer: tokenize_pairs(
            records, tokenizer, stage.max_seq_len, cache_dir=ctx.cache_dir, answer_masks=True
        ),
        count_tokens=lambda rows: int(rows["chosen_mask"].sum() + rows["rejected_mask"].sum()),
        data_seed=ctx.config.data.seed + 5,
        reference=reference_logprobs(stage.loss == "ipo"),
    )
    first, last = run_supervised(ctx, job)
    values = {
        "dpo.eval_accuracy_start": first["accuracy"],
        "dpo.eval_accuracy": last["accuracy"],
        "dpo.eval_margin": last["margin"],
        "dpo.chosen_reward": last["chosen_reward"],
        "dpo.rejected_reward": last["rejected_reward"],
    }
    if gold_reward is not None:
        start = ctx.model_path(stage.model.path, previous_step="sft")
        for name, path in (("sft", start), ("dpo", ctx.step_dir("dpo", "model"))):
            gold, se, sample = gold_of_samples(ctx, path, gold_reward)
            values[f"dpo.gold_reward_{name}"], values[f"dpo.gold_reward_{name}_se"] = gold, se
            print(f"[dpo] {name} policy sample: {sample}", flush=True)
    return values


def gold_of_samples(ctx: RunContext, path: str, gold_reward: Callable) -> tuple[float, float, str]:
    """The mean gold reward (and its standard error) of a policy's answers to the held-out
    prompts of the PPO slice, sampled as step 3's evaluation samples them (settings and key)."""
    config = ctx.config
    tokenizer = load_tokenizer(path)
    held_out = held_out_prompts(ctx, ctx.step_data("ppo").eval, tokenizer)
    model = ctx.load_model(path, config.dpo.model)
    graphdef, params, frozen = split_for_training(model, 0)
    engine = HybridEngine(
        graphdef,
        (params, frozen),
        ctx.mesh,
        config.generation.tensor_parallel,
        sampling_settings(config, tokenizer),
        ctx.generation_rules,
    )
    key = jax.random.fold_in(jax.random.key(config.seed), EVALUATION_KEY)
    _, answers = held_out_answers(
        engine, (params, frozen), ctx.device_batch, held_out, key, tokenizer, config.ppo.max_prompt_seq_len
    )
    result = gold_of_answers(gold_reward, held_out, answers)
    return result["gold"], result["gold_se"], result["sample"]
