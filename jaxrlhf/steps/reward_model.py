"""Step 2: the reward model, a decoder with a scalar head trained on (chosen, rejected) pairs."""

from __future__ import annotations

import jax.numpy as jnp

from jaxrlhf.data.tokenize import tokenize_pairs
from jaxrlhf.losses import pairwise_accuracy, pairwise_loss_deepspeed_chat, pairwise_loss_final_token
from jaxrlhf.models.outputs import sequence_scores
from jaxrlhf.run_context import RunContext
from jaxrlhf.steps.loop import SupervisedJob, run_supervised


def pair_values(model, batch):
    """One forward over chosen and rejected together: values [pairs, seq] for each side."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    values = model(ids, mask)
    pairs = batch["chosen_ids"].shape[0]
    return values[:pairs], values[pairs:]


def make_reward_loss(kind: str, centering_coef: float):
    """(model, batch) -> (loss, metrics) for the Bradley-Terry loss on final-token scores
    ("final_token") or DeepSpeed-Chat's loss over the divergent span ("deepspeed_chat")."""

    def loss_fn(model, batch):
        chosen_values, rejected_values = pair_values(model, batch)
        if kind == "deepspeed_chat":
            loss, chosen, rejected = pairwise_loss_deepspeed_chat(
                chosen_values,
                rejected_values,
                batch["chosen_ids"],
                batch["rejected_ids"],
                batch["chosen_mask"],
                batch["rejected_mask"],
            )
        else:
            chosen = sequence_scores(chosen_values, batch["chosen_mask"])
            rejected = sequence_scores(rejected_values, batch["rejected_mask"])
            loss = pairwise_loss_final_token(chosen, rejected, centering_coef=centering_coef)
        return loss, {
            "accuracy": pairwise_accuracy(chosen, rejected),
            "chosen_mean": chosen.mean(),
            "rejected_mean": rejected.mean(),
            "margin": (chosen - rejected).mean(),
        }

    return loss_fn


def run_reward_model(ctx: RunContext) -> dict[str, float]:
    """Trains, exports <output_dir>/rm/model (SequenceClassification + tokenizer), returns summary values."""
    stage = ctx.config.rm
    job = SupervisedJob(
        name="rm",
        stage=stage,
        previous_step="sft",
        value_head=True,
        loss_fn=make_reward_loss(stage.loss, stage.centering_coef),
        tokenize=lambda records, tokenizer: tokenize_pairs(
            records, tokenizer, stage.max_seq_len, cache_dir=ctx.cache_dir
        ),
        count_tokens=lambda rows: int(rows["chosen_mask"].sum() + rows["rejected_mask"].sum()),
        data_seed=ctx.config.data.seed + 2,
    )
    first, last = run_supervised(ctx, job)
    return {
        "rm.eval_accuracy_start": first["accuracy"],
        "rm.eval_accuracy": last["accuracy"],
        "rm.chosen_mean": last["chosen_mean"],
        "rm.rejected_mean": last["rejected_mean"],
        "rm.eval_margin": last["margin"],
    }
