"""Step 3: PPO of the actor against the reward model, with a critic and a frozen reference.

Each iteration (`rl.iteration.run_iteration`): the hybrid engine generates answers to a batch of
prompts in the tensor-parallel layout; one jitted function scores them with the four roles in
the training layout (experience: log-probs, values, scores, KL-penalized rewards, GAE); one
jitted function runs the whole PPO update. Before the first and after the last iteration the
SFT policy and the PPO policy answer the same held-out prompts with the same sampling settings
and keys, scored by the reward model and, where the task has one, by a gold reward that
training never sees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.checkpoint import maybe_kill_after_checkpoint
from jaxrlhf.data.batches import BatchIterator, BatchPosition
from jaxrlhf.data.tokenize import pad_token_id, tokenize_pretraining, tokenize_prompts
from jaxrlhf.generation.generate import SamplingSettings
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.generation.prompting import decode_answers
from jaxrlhf.metrics import CompileCounter, count_params, plot_metrics, progress
from jaxrlhf.models import export_model, load_tokenizer
from jaxrlhf.parallel.mesh import to_host
from jaxrlhf.rl.experience import RewardSettings, make_experience_fn
from jaxrlhf.rl.iteration import PPOLoop, merged_models, run_iteration
from jaxrlhf.rl.ppo_math import adaptive_kl_update
from jaxrlhf.rl.roles import RoleGraphs, load_roles
from jaxrlhf.rl.update import PPOState, UpdateSettings, make_ppo_update
from jaxrlhf.run_context import RunContext
from jaxrlhf.train_state import check_bad_steps, init_train_state, make_optimizer, shardings_of


@dataclasses.dataclass(frozen=True)
class TaskHooks:
    """What step 3 may know of the task beyond its prompts (the built-in task has both)."""

    gold_reward: Callable[[str, str], float] | None = None  # (prompt, answer) -> score; evaluation only
    pretraining_texts: Callable[[int, int], list[str]] | None = None  # (count, seed) -> texts for PTX


@dataclasses.dataclass
class HeldOutPrompts:
    """The evaluation prompts: this process's rows of the arrays, and every prompt's text."""

    arrays: dict[str, np.ndarray]
    texts: list[str]


@dataclasses.dataclass
class PPORun:
    """One PPO run, set up: the iteration loop, the models' graphs and sources, the evaluation prompts."""

    loop: PPOLoop
    graphs: RoleGraphs
    tokenizer: object
    sources: dict[str, str]  # where each exported role's config and tokenizer come from
    held_out: HeldOutPrompts
    hooks: TaskHooks


def run_ppo(ctx: RunContext, hooks: TaskHooks = TaskHooks()) -> dict[str, float]:
    """Sets up, resumes or evaluates the SFT policy, iterates, evaluates, exports; returns the summary."""
    ppo = ctx.config.ppo
    run, state = prepare_run(ctx, hooks)
    checkpointer, latest = ctx.open_checkpoints("ppo")
    kl_coef, start = ppo.kl_coef, 0
    if latest is not None:
        _, restored, metadata = checkpointer.restore_latest(state.checkpoint_tree())
        state = state.restored(restored)
        run.loop.prompts.position = BatchPosition(**metadata["position"])
        if run.loop.ptx_rows is not None:
            run.loop.ptx_rows.position = BatchPosition(**metadata["ptx_position"])
        kl_coef, start, sft_eval = metadata["kl_coef"], metadata["iteration"], metadata["sft_eval"]
        print(f"[ppo] resumed from iteration {start}", flush=True)
    else:
        sft_eval = evaluate_policy(run, state, with_actor=False)
    ctx.logger.log(0, without_sample(sft_eval), prefix="ppo/eval_sft")

    bar = progress(ppo.num_iterations - start, "ppo")
    for iteration in range(start, ppo.num_iterations):
        with CompileCounter() as compiles:
            state, stats = run_iteration(run.loop, state, iteration, kl_coef)
        stats["compiles"] = compiles.count  # 0 after the first iteration: nothing recompiles
        check_bad_steps(
            stats, ctx.config.max_bad_steps, f"[ppo] iteration {iteration + 1}", checkpointer.describe_latest()
        )
        require_kept_rows(stats, iteration + 1)
        if ppo.adaptive_kl:
            kl_coef = float(
                adaptive_kl_update(
                    kl_coef, stats["kl"], ppo.prompts_per_iteration, target=ppo.kl_target, horizon=ppo.kl_horizon
                )
            )
        bar.update(1)
        done = iteration + 1
        if done % ctx.config.log_every == 0 or done == ppo.num_iterations or iteration == start:
            ctx.logger.log(done, stats, prefix="ppo")
        metadata = {
            "iteration": done,
            "kl_coef": kl_coef,
            "sft_eval": sft_eval,
            "position": dataclasses.asdict(run.loop.prompts.position),
            "ptx_position": dataclasses.asdict(run.loop.ptx_rows.position) if run.loop.ptx_rows else None,
        }
        if checkpointer.save(done, state.checkpoint_tree(), metadata, force=done == ppo.num_iterations):
            maybe_kill_after_checkpoint(done)
    bar.close()
    checkpointer.close()

    ppo_eval = evaluate_policy(run, state, with_actor=True)
    ctx.logger.log(ppo.num_iterations, without_sample(ppo_eval), prefix="ppo/eval_ppo")
    print(f"[ppo] sample before: {sft_eval.get('sample', '')!r}\n[ppo] sample after:  {ppo_eval.get('sample', '')!r}")
    export_roles(ctx, run, state)
    return summary_values(sft_eval, ppo_eval)


def prepare_run(ctx: RunContext, hooks: TaskHooks) -> tuple[PPORun, PPOState]:
    """Loads the prompts and the four roles, builds the optimizers, the jitted functions and the
    iterators: everything the loop needs, and the initial training state."""
    config, ppo = ctx.config, ctx.config.ppo
    roles = load_roles(ctx)
    tokenizer = load_tokenizer(roles.sources["actor"])
    data = ctx.step_data("ppo")
    train_prompts, _ = tokenize_prompts(
        data.train, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt, cache_dir=ctx.cache_dir
    )
    held_out = held_out_prompts(ctx, data.eval, tokenizer)
    print(
        f"[ppo] {len(train_prompts['prompt_ids'])} train prompts, {len(held_out.texts)} eval prompts; {data.report}",
        flush=True,
    )

    actor, reference, critic, reward_model = roles.actor, roles.reference, roles.critic, roles.reward_model
    graphs = roles.graphs()
    sizes = {"actor": count_params(actor.states), "critic": count_params(critic.states)}
    updates_total = max(ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, 1)
    actor_optimizer = make_optimizer(ppo.actor_optimizer, updates_total)
    critic_optimizer = make_optimizer(ppo.critic_optimizer, updates_total)
    ema = jax.tree.map(jnp.copy, actor.states.params) if ppo.ema_decay > 0 else None
    state = PPOState(
        init_train_state(actor.states.params, actor.states.frozen, actor_optimizer),
        init_train_state(critic.states.params, critic.states.frozen, critic_optimizer),
        ema,
    )
    del actor.states, critic.states  # donated into the train state

    engine = HybridEngine(
        graphs.actor,
        (state.actor.params, state.actor.frozen),
        ctx.mesh,
        config.generation.tensor_parallel,
        sampling_settings(config, tokenizer),
        ctx.generation_rules,
    )
    loop = PPOLoop(
        engine=engine,
        experience_fn=make_experience_fn(graphs, RewardSettings.from_config(ppo), ppo.max_prompt_seq_len),
        update_fn=make_ppo_update(
            graphs.actor,
            graphs.critic,
            actor_optimizer,
            critic_optimizer,
            UpdateSettings.from_config(ppo),
            shardings_of(state),
        ),
        reference=None if reference is None else reference.states,
        reward_model=reward_model.states,
        prompts=batch_iterator(train_prompts, ppo.prompts_per_iteration, seed=config.data.seed + 3),
        ptx_rows=pretraining_rows(ctx, data.train, tokenizer, hooks),
        device_batch=ctx.device_batch,
        key=jax.random.key(config.seed),
        num_minibatches=ppo.num_minibatches,
        ppo_epochs=ppo.ppo_epochs,
        prompt_len=ppo.max_prompt_seq_len,
        sizes=sizes,
    )
    run = PPORun(loop=loop, graphs=graphs, tokenizer=tokenizer, sources=roles.sources, held_out=held_out, hooks=hooks)
    return run, state


def sampling_settings(config, tokenizer) -> SamplingSettings:
    """Rollout sampling from the run's generation section; answers up to ppo.max_answer_seq_len."""
    generation = config.generation
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
    )


def batch_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> BatchIterator:
    return BatchIterator(
        arrays, batch_size, seed=seed, process_index=jax.process_index(), process_count=jax.process_count()
    )


def held_out_prompts(ctx: RunContext, records, tokenizer) -> HeldOutPrompts:
    """This process's rows of the evaluation prompts (a multiple of the data-parallel size), and all their texts."""
    ppo = ctx.config.ppo
    arrays, kept = tokenize_prompts(
        records, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt, cache_dir=ctx.cache_dir
    )
    replicas = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    count = min(ppo.eval_prompts, len(kept)) // replicas * replicas
    rows = count // jax.process_count()  # each process feeds its own rows of the global eval batch
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    return HeldOutPrompts(
        {name: arrays[name][:count][mine] for name in ("prompt_ids", "prompt_mask")},
        [records[int(i)].prompt for i in kept[:count]],
    )


def pretraining_rows(ctx: RunContext, records, tokenizer, hooks: TaskHooks) -> BatchIterator | None:
    """Rows for the PTX loss: the task's own pretraining texts, else the PPO slice's prompt + chosen."""
    config, ppo = ctx.config, ctx.config.ppo
    if ppo.unsup_coef <= 0:
        return None
    if hooks.pretraining_texts is not None:
        texts = hooks.pretraining_texts(4 * ppo.prompts_per_iteration * 8, config.data.seed)
    else:
        texts = [record.prompt + record.chosen for record in records]
    rows = tokenize_pretraining(
        texts, tokenizer, ppo.max_prompt_seq_len + ppo.max_answer_seq_len, cache_dir=ctx.cache_dir
    )
    return batch_iterator(rows, ppo.prompts_per_iteration, seed=config.data.seed + 4)


def evaluate_policy(run: PPORun, state: PPOState, with_actor: bool) -> dict:
    """Samples answers to the held-out prompts (the same key every time) from the actor, or from
    the reference (the SFT policy), and scores them by the reward model and the gold reward."""
    loop = run.loop
    states = loop.role_states(state)
    policy = states.actor if with_actor else states.reference
    prompts = loop.device_batch(run.held_out.arrays)
    out, _ = loop.engine.generate(
        (policy.params, policy.frozen),
        prompts["prompt_ids"],
        prompts["prompt_mask"],
        jax.random.fold_in(loop.key, 10**6),
    )
    _, stats = loop.experience_fn(states, out.tokens, out.attention_mask, 0.0)
    result = {
        "rm_score": float(stats["score"]),
        "kl_to_sft": float(stats["kl"]) if with_actor else 0.0,
        "answer_length": float(stats["answer_length"]),
    }
    if run.hooks.gold_reward is not None:
        answers = decode_answers(run.tokenizer, to_host(out.tokens), to_host(out.attention_mask), loop.prompt_len)
        gold = [run.hooks.gold_reward(prompt, answer) for prompt, answer in zip(run.held_out.texts, answers)]
        result["gold"], result["gold_se"] = mean_and_se(gold)
        result["sample"] = run.held_out.texts[0].strip() + " ->" + answers[0]
    return result


def export_roles(ctx: RunContext, run: PPORun, state: PPOState) -> None:
    """HF exports of the actor, the EMA actor, the critic and the reward model under <output_dir>/ppo/,
    and the plot of the run's curves."""
    models = {**merged_models(run.graphs, state), "reward_model": run.loop.reward_model.model(run.graphs.reward_model)}
    for role, model in models.items():
        export_model(model, ctx.step_dir("ppo", role), run.sources[role])
    if jax.process_index() == 0:
        plot_metrics(
            f"{ctx.output_dir}/metrics.jsonl",
            "ppo",
            ["score", "kl", "actor_loss", "critic_loss", "clipfrac", "entropy"],
            f"{ctx.output_dir}/ppo/ppo.png",
        )


def summary_values(sft_eval: dict, ppo_eval: dict) -> dict[str, float]:
    summary = {
        "ppo.rm_score_sft": sft_eval["rm_score"],
        "ppo.rm_score_ppo": ppo_eval["rm_score"],
        "ppo.kl_to_sft": ppo_eval["kl_to_sft"],
        "ppo.answer_length_ppo": ppo_eval["answer_length"],
    }
    if "gold" in ppo_eval:
        summary.update(
            {
                "ppo.gold_reward_sft": sft_eval["gold"],
                "ppo.gold_reward_sft_se": sft_eval["gold_se"],
                "ppo.gold_reward_ppo": ppo_eval["gold"],
                "ppo.gold_reward_ppo_se": ppo_eval["gold_se"],
            }
        )
    return summary


def require_kept_rows(stats: dict, iteration: int) -> None:
    """Stops a run that trains on nothing: every answer of the iteration was dropped."""
    if stats["kept_fraction"] == 0:
        raise ValueError(
            f"[ppo] iteration {iteration}: every answer was dropped (answers of one token or less are dropped), "
            "so nothing trains; raise ppo.max_answer_seq_len or generation.min_new_tokens, or set "
            "ppo.short_answer=penalize"
        )


def without_sample(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if k != "sample"}


def mean_and_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
