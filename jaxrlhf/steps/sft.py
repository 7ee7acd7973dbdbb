"""Step 1: supervised fine-tuning of the base model on prompt + chosen response."""

from __future__ import annotations

import math

from jaxrlhf.data.tokenize import tokenize_sft
from jaxrlhf.models import export_model, load_pretrained, load_tokenizer
from jaxrlhf.run_context import RunContext
from jaxrlhf.steps.loop import SupervisedJob, train_supervised
from jaxrlhf.steps.losses import language_model_loss


def run_sft(ctx: RunContext) -> dict[str, float]:
    """Trains, exports <output_dir>/sft/model (HF format + tokenizer), returns summary values."""
    config, stage = ctx.config, ctx.config.sft
    model_path = ctx.model_path(stage.model.path, previous_step=None)
    tokenizer = load_tokenizer(model_path)
    data = ctx.step_data("sft")
    print(f"[sft] {len(data.train)} train / {len(data.eval)} eval records; {data.report}", flush=True)
    tokenized = lambda records: tokenize_sft(
        records, tokenizer, stage.max_seq_len, stage.loss_on, stage.packing, cache_dir=ctx.cache_dir
    )
    model = load_pretrained(
        model_path,
        mesh=ctx.mesh,
        rules=ctx.rules,
        dtype=stage.model.dtype,
        param_dtype=stage.model.param_dtype,
        remat=stage.model.remat,
    )
    job = SupervisedJob(
        name="sft",
        stage=stage,
        loss_fn=language_model_loss,
        train_arrays=tokenized(data.train),
        eval_arrays=tokenized(data.eval),
        count_tokens=lambda rows: int(rows["attention_mask"].sum()),
        data_seed=config.data.seed + 1,
    )
    model, first, last = train_supervised(ctx, job, model)
    export_model(model, ctx.step_dir("sft", "model"), model_path)
    return {
        "sft.eval_loss_start": first["loss"],
        "sft.eval_loss_end": last["loss"],
        "sft.eval_perplexity_end": math.exp(min(last["loss"], 50.0)),
    }
