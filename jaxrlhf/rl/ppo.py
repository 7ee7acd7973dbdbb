"""Step 3: the actor trained against the reward, by PPO with a critic or a critic-free algorithm.

Each iteration (`rl.iteration.run_iteration`): the hybrid engine generates n answers to each of a
batch of prompts in the tensor-parallel layout; the reward functions score them on the host; one
jitted function scores them with the roles in the training layout and makes the advantages with
the algorithm's estimator (`rl/algorithms.py`); one jitted function runs the whole update. Before
the first iteration, every `eval_every` iterations and after the last, the policy answers the same
held-out prompts with the same sampling settings and keys, scored by the training reward and,
where the task has one, by a gold reward that training never sees (`evaluation.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.checkpoint import maybe_kill_after_checkpoint
from jaxrlhf.data.batches import BatchIterator, BatchPosition
from jaxrlhf.data.tokenize import tokenize_pretraining, tokenize_prompts
from jaxrlhf.evaluation import (
    HeldOutPrompts,
    append_to_curve,
    evaluate_policy,
    held_out_prompts,
    plot_curve,
    rewind_curve,
    sampling_settings,
    without_sample,
)
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.metrics import CompileCounter, count_params, plot_metrics, progress
from jaxrlhf.models import export_model, load_tokenizer
from jaxrlhf.models.lora import adapters_off
from jaxrlhf.rl.algorithms import ALGORITHMS
from jaxrlhf.rl.experience import RewardSettings, make_evaluation_fn, make_experience_fn
from jaxrlhf.rl.iteration import PPOLoop, merged_models, run_iteration
from jaxrlhf.rl.ppo_math import adaptive_kl_update
from jaxrlhf.rl.rewards import RewardMix
from jaxrlhf.rl.roles import ModelStates, RoleGraphs, load_model, load_roles
from jaxrlhf.rl.update import PPOState, UpdateSettings, make_ppo_update
from jaxrlhf.run_context import RunContext
from jaxrlhf.train_state import check_bad_steps, check_trained, init_train_state, make_optimizer, shardings_of


@dataclasses.dataclass(frozen=True)
class TaskHooks:
    """What step 3 may know of the task beyond its prompts (the built-in task has both)."""

    gold_reward: Callable[[str, str], float] | None = None  # (prompt, answer) -> score; evaluation only
    pretraining_texts: Callable[[int, int], list[str]] | None = None  # (count, seed) -> texts for PTX


@dataclasses.dataclass
class PPORun:
    """One step-3 run, set up: the iteration loop, the models' graphs and sources, the evaluation."""

    loop: PPOLoop
    graphs: RoleGraphs
    tokenizer: object
    sources: dict[str, str]  # where each exported role's config and tokenizer come from
    held_out: HeldOutPrompts
    hooks: TaskHooks
    evaluation_fn: Callable  # (RoleStates, tokens, mask, function_scores) -> per-answer score, kl, length
    eval_reference: ModelStates | None = None  # the SFT policy for evaluation, when training has no reference


def run_ppo(ctx: RunContext, hooks: TaskHooks = TaskHooks()) -> dict[str, float]:
    """Sets up, resumes or evaluates the SFT policy, iterates, evaluates, exports; returns the summary."""
    ppo = ctx.config.ppo
    run, state = prepare_run(ctx, hooks)
    checkpointer, latest = ctx.open_checkpoints("ppo")
    curve = f"{ctx.step_dir('ppo')}/eval_curve.jsonl"
    kl_coef, start = ppo.kl_coef, 0
    if latest is not None:
        _, restored, metadata = checkpointer.restore_latest(state.checkpoint_tree())
        state = state.restored(restored)
        run.loop.prompts.position = BatchPosition(**metadata["position"])
        if run.loop.ptx_rows is not None:
            run.loop.ptx_rows.position = BatchPosition(**metadata["ptx_position"])
        kl_coef, start, sft_eval = metadata["kl_coef"], metadata["iteration"], metadata["sft_eval"]
        ctx.add_earlier_seconds("ppo", metadata.get("seconds", 0.0))
        print(f"[ppo] resumed from iteration {start}", flush=True)
        rewind_curve(curve, start)
    # what this run logs again goes: the records after the checkpoint, or all when ppo starts over
    after = start if latest is not None else -1
    ctx.logger.rewind({"ppo": after, "ppo/eval": after, "ppo/eval_sft": min(after, 0), "ppo/eval_ppo": -1})
    if latest is None:
        sft_eval = evaluate_sft(run, state)
        append_to_curve(curve, 0, sft_eval)
        ctx.logger.log(0, without_sample(sft_eval), prefix="ppo/eval_sft")

    bar = progress(ppo.num_iterations - start, ppo.algorithm)
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
        if ppo.eval_every and done % ppo.eval_every == 0 and done < ppo.num_iterations:
            evaluation = evaluate_policy(run.loop, run, run.loop.role_states(state).actor, eval_states(ctx, run, state))
            append_to_curve(curve, done, evaluation)
            ctx.logger.log(done, without_sample(evaluation), prefix="ppo/eval")
        metadata = {
            "iteration": done,
            "kl_coef": kl_coef,
            "sft_eval": sft_eval,
            "position": dataclasses.asdict(run.loop.prompts.position),
            "ptx_position": dataclasses.asdict(run.loop.ptx_rows.position) if run.loop.ptx_rows else None,
            "seconds": ctx.step_seconds("ppo"),
        }
        if checkpointer.save(done, state.checkpoint_tree(), metadata, force=done == ppo.num_iterations):
            maybe_kill_after_checkpoint(done)
    bar.close()
    checkpointer.close()

    ppo_eval = evaluate_policy(run.loop, run, run.loop.role_states(state).actor, eval_states(ctx, run, state))
    append_to_curve(curve, ppo.num_iterations, ppo_eval)
    ctx.logger.log(ppo.num_iterations, without_sample(ppo_eval), prefix="ppo/eval_ppo")
    print(f"[ppo] sample before: {sft_eval.get('sample', '')!r}\n[ppo] sample after:  {ppo_eval.get('sample', '')!r}")
    check_trained("ppo", state.actor, "ppo.actor_model.path", sft_eval, ppo_eval, ppo.actor_optimizer.learning_rate)
    export_roles(ctx, run, state)
    if jax.process_index() == 0:
        plot_curve(curve, f"{ctx.step_dir('ppo')}/eval_curve.png")
    return summary_values(ppo.algorithm, sft_eval, ppo_eval)


def initial_state(ppo, roles) -> tuple[PPOState, tuple]:
    """The trained roles' states (the actor, the critic if any, the EMA) and their optimizers; the
    loaded weights are donated into the state."""
    updates_total = max(ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, 1)
    actor, critic = roles.actor, roles.critic
    actor_optimizer = make_optimizer(ppo.actor_optimizer, updates_total)
    critic_optimizer = make_optimizer(ppo.critic_optimizer, updates_total) if critic else None
    ema = jax.tree.map(jnp.copy, actor.states.params) if ppo.ema_decay > 0 else None
    state = PPOState(
        init_train_state(actor.states.params, actor.states.frozen, actor_optimizer),
        init_train_state(critic.states.params, critic.states.frozen, critic_optimizer) if critic else None,
        ema,
    )
    del actor.states  # donated into the train state
    if critic:
        del critic.states
    return state, (actor_optimizer, critic_optimizer)


def evaluate_sft(run: PPORun, state: PPOState) -> dict:
    """The SFT policy on the held-out prompts: the reference, or the actor before its first update."""
    states = run.loop.role_states(state)
    policy = states.reference if states.reference is not None else states.actor
    return evaluate_policy(run.loop, run, policy, dataclasses.replace(states, reference=None))


def eval_states(ctx: RunContext, run: PPORun, state: PPOState):
    """The roles that score an evaluation, with a reference for the KL to the SFT policy: without one
    in training (kl_coef 0), the SFT model is loaded for it."""
    states = run.loop.role_states(state)
    if states.reference is not None:
        return states
    ppo = ctx.config.ppo
    if ppo.actor_lora.rank:
        return dataclasses.replace(states, reference=ModelStates(adapters_off(state.actor.params), state.actor.frozen))
    if run.eval_reference is None:
        run.eval_reference = load_model(ctx, run.sources["actor"], ppo.actor_model).states
    return dataclasses.replace(states, reference=run.eval_reference)


def prepare_run(ctx: RunContext, hooks: TaskHooks) -> tuple[PPORun, PPOState]:
    """Loads the prompts and the roles the algorithm and the reward use, builds the optimizers, the
    jitted functions and the iterators: everything the loop needs, and the initial training state."""
    config, ppo = ctx.config, ctx.config.ppo
    algorithm = ALGORITHMS[ppo.algorithm]
    rewards = RewardMix.from_config(ppo.reward, ppo.reward_weights, "ppo.reward")
    roles = load_roles(ctx, needs_critic=algorithm.needs_critic, uses_reward_model=rewards.uses_model)
    tokenizer = load_tokenizer(roles.sources["actor"])
    data = ctx.step_data("ppo")
    train_prompts, _ = tokenize_prompts(
        data.train, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt, cache_dir=ctx.cache_dir
    )
    held_out = held_out_prompts(ctx, data.eval, tokenizer)
    print(
        f"[ppo] {ppo.algorithm}: {len(train_prompts['prompt_ids'])} train prompts x {ppo.samples_per_prompt} "
        f"samples, {len(held_out.texts)} eval prompts; roles: {', '.join(roles.sources)}; {data.report}",
        flush=True,
    )

    graphs = roles.graphs()
    sizes = {
        "actor": count_params(roles.actor.states),
        "critic": count_params(roles.critic.states) if roles.critic else 0,
        "trained": sum(count_params(role.states.params) for role in (roles.actor, roles.critic) if role),
    }
    state, (actor_optimizer, critic_optimizer) = initial_state(ppo, roles)
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
        experience_fn=make_experience_fn(
            graphs, RewardSettings.from_config(ppo, rewards.model_weight), ppo.max_prompt_seq_len
        ),
        update_fn=make_ppo_update(
            graphs.actor,
            graphs.critic,
            actor_optimizer,
            critic_optimizer,
            UpdateSettings.from_config(ppo),
            shardings_of(state),
        ),
        reference=None if roles.reference is None else roles.reference.states,
        uses_reference=roles.uses_reference,
        reward_model=None if roles.reward_model is None else roles.reward_model.states,
        rewards=rewards,
        tokenizer=tokenizer,
        prompts=batch_iterator(
            train_prompts, ppo.prompts_per_iteration + ppo.oversample_prompts, seed=config.data.seed + 3
        ),
        ptx_rows=pretraining_rows(ctx, data.train, tokenizer, hooks),
        device_batch=ctx.device_batch,
        global_batch=ctx.global_batch,
        key=jax.random.key(config.seed),
        num_minibatches=ppo.num_minibatches,
        ppo_epochs=ppo.ppo_epochs,
        prompt_len=ppo.max_prompt_seq_len,
        samples_per_prompt=ppo.samples_per_prompt,
        sizes=sizes,
    )
    evaluation_graphs = dataclasses.replace(graphs, reference=graphs.reference or graphs.actor)
    run = PPORun(
        loop=loop,
        graphs=graphs,
        tokenizer=tokenizer,
        sources=roles.sources,
        held_out=held_out,
        hooks=hooks,
        evaluation_fn=make_evaluation_fn(evaluation_graphs, rewards.model_weight, ppo.max_prompt_seq_len),
    )
    return run, state


def batch_iterator(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> BatchIterator:
    return BatchIterator(
        arrays, batch_size, seed=seed, process_index=jax.process_index(), process_count=jax.process_count()
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


def export_roles(ctx: RunContext, run: PPORun, state: PPOState) -> None:
    """HF exports of the actor, the EMA actor, and (where the run has them) the critic and the reward
    model under <output_dir>/ppo/, and the plot of the run's curves."""
    models = merged_models(run.graphs, state)
    if run.loop.reward_model is not None:
        models["reward_model"] = run.loop.reward_model.model(run.graphs.reward_model)
    for role, model in models.items():
        export_model(
            model, ctx.step_dir("ppo", role), run.sources[role], max_shard_size=ctx.config.export_max_shard_size
        )
    if jax.process_index() == 0:
        curves = ["score", "kl", "actor_loss", "clipfrac", "entropy"]
        if state.critic is not None:
            curves.insert(3, "critic_loss")
        plot_metrics(f"{ctx.output_dir}/metrics.jsonl", "ppo", curves, f"{ctx.output_dir}/ppo/ppo.png")


def summary_values(algorithm: str, sft_eval: dict, ppo_eval: dict) -> dict:
    """The same keys for every algorithm: the training reward and (where the task has one) the gold
    reward of the SFT and the trained policy on the held-out prompts, and the KL between them."""
    summary = {
        "ppo.algorithm": algorithm,
        "ppo.reward_score_sft": sft_eval["reward_score"],
        "ppo.reward_score_sft_se": sft_eval["reward_score_se"],
        "ppo.reward_score_ppo": ppo_eval["reward_score"],
        "ppo.reward_score_ppo_se": ppo_eval["reward_score_se"],
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
    """Stops a run that trains on nothing: every answer of the iteration was dropped for being too
    short. Groups dropped by dynamic sampling (all their rewards equal) are a batch with no signal,
    not a broken setting: that iteration just teaches nothing."""
    if stats["kept_fraction"] == 0 and stats.get("uniform_group_share", 0.0) < 1.0:
        raise ValueError(
            f"[ppo] iteration {iteration}: every answer was dropped (answers of one token or less are dropped), "
            "so nothing trains; raise ppo.max_answer_seq_len or generation.min_new_tokens, or set "
            "ppo.short_answer=penalize"
        )
