"""Step 1: supervised fine-tuning of the base model on prompt + chosen response."""

from __future__ import annotations

import math

from jaxrlhf.data.tokenize import tokenize_sft
from jaxrlhf.losses import language_model_loss
from jaxrlhf.run_context import RunContext
from jaxrlhf.steps.loop import SupervisedJob, run_supervised


def run_sft(ctx: RunContext) -> dict[str, float]:
    """Trains, exports <output_dir>/sft/model (HF format + tokenizer), returns summary values."""
    stage = ctx.config.sft
    job = SupervisedJob(
        name="sft",
        stage=stage,
        previous_step=None,
        value_head=False,
        loss_fn=language_model_loss,
        tokenize=lambda records, tokenizer: tokenize_sft(
            records, tokenizer, stage.max_seq_len, stage.loss_on, stage.packing, cache_dir=ctx.cache_dir
        ),
        count_tokens=lambda rows: int(rows["attention_mask"].sum()),
        data_seed=ctx.config.data.seed + 1,
    )
    first, last = run_supervised(ctx, job)
    return {
        "sft.eval_loss_start": first["loss"],
        "sft.eval_loss_end": last["loss"],
        "sft.eval_perplexity_end": math.exp(min(last["loss"], 50.0)),
    }
