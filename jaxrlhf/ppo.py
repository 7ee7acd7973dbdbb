"""Step 3: PPO of the actor against the reward model, with a critic and a frozen reference.

Each iteration: the hybrid engine generates answers to a batch of prompts in the tensor-parallel
layout; one jitted function scores them with the four roles in the training layout (experience:
log-probs, values, scores, KL-penalized rewards, GAE); one jitted function runs the whole PPO
update. Before the first and after the last iteration the SFT policy and the PPO policy answer
the same held-out prompts with the same sampling settings and keys, scored by the gold reward
where the data has one (the built-in task) and by the reward model always.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.compile_counter import CompileCounter
from jaxrlhf.data.batches import BatchIterator, BatchPosition
from jaxrlhf.data.builtin import builtin_pretraining_texts, gold_reward
from jaxrlhf.data.tokenize import tokenize_pretraining, tokenize_prompts
from jaxrlhf.experience import RewardSettings, make_experience_fn
from jaxrlhf.export import export_model
from jaxrlhf.generation.generate import SamplingSettings
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.generation.prompting import decode_answers
from jaxrlhf.metrics import plot_metrics, progress
from jaxrlhf.models import ValueModel, load_pretrained, load_tokenizer
from jaxrlhf.parallel.mesh import to_host
from jaxrlhf.parallel.rules import TRAINING_RULES
from jaxrlhf.ppo_math import adaptive_kl_update
from jaxrlhf.ppo_update import PPOState, UpdateSettings, make_ppo_update
from jaxrlhf.runtime import RunContext, count_params, maybe_kill_after_checkpoint
from jaxrlhf.training import init_train_state, make_optimizer, split_for_training


@dataclasses.dataclass
class Role:
    """One model of PPO: its graph and its (trainable, frozen) states."""

    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State


def load_role(ctx: RunContext, path: str, model_config, lora, model_cls=None) -> Role:
    kwargs = {"model_cls": model_cls} if model_cls else {}
    model = load_pretrained(path, mesh=ctx.mesh, rules=TRAINING_RULES, dtype=model_config.dtype,
                            param_dtype=model_config.param_dtype, remat=model_config.remat, **kwargs)
    if lora is not None:
        ctx.add_lora(model, lora)
    return Role(*split_for_training(model, lora.rank if lora is not None else 0))


def adapters_off(params: nnx.State) -> nnx.State:
    """The actor's trainable state with every LoRA B set to zero: exactly the frozen base model,
    which serves as the reference policy without a second copy of the weights."""
    flat = [(path, v.replace(value=jnp.zeros_like(v.get_value())) if path[-1] == "lora_b" else v)
            for path, v in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def sampling_settings(config, tokenizer) -> SamplingSettings:
    g = config.generation
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    return SamplingSettings(eos_id=tokenizer.eos_token_id, pad_id=pad,
                            max_new_tokens=config.ppo.max_answer_seq_len, min_new_tokens=g.min_new_tokens,
                            temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, greedy=g.greedy,
                            attention=g.attention)


def mean_and_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def run_ppo(ctx: RunContext) -> dict[str, float]:
    config, ppo = ctx.config, ctx.config.ppo
    actor_path = ctx.model_path(ppo.actor_model.path, previous_step="sft")
    critic_path = ctx.model_path(ppo.critic_model.path, previous_step="rm")
    tokenizer = load_tokenizer(actor_path)
    is_builtin = all(source.layout == "builtin" for source in config.data.sources)

    # Prompts: training prompts and held-out evaluation prompts, left padded.
    data = ctx.step_data("ppo")
    train_prompts, _ = tokenize_prompts(data.train, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt,
                                        cache_dir=ctx.cache_dir)
    eval_arrays, eval_kept = tokenize_prompts(data.eval, tokenizer, ppo.max_prompt_seq_len, ppo.long_prompt,
                                              cache_dir=ctx.cache_dir)
    replicas = ctx.mesh.shape["data"] * ctx.mesh.shape["fsdp"]
    n_eval = min(ppo.eval_prompts, len(eval_kept)) // replicas * replicas
    rows = n_eval // jax.process_count()  # each process feeds its own rows of the global eval batch
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    eval_batch = {name: eval_arrays[name][:n_eval][mine] for name in ("prompt_ids", "prompt_mask")}
    eval_texts = [data.eval[int(i)].prompt for i in eval_kept[:n_eval]]
    print(f"[ppo] {len(train_prompts['prompt_ids'])} train prompts, {n_eval} eval prompts; {data.report}", flush=True)

    # The four roles, each in the training (FSDP) layout.
    actor = load_role(ctx, actor_path, ppo.actor_model, ppo.actor_lora)
    reference = None if ppo.actor_lora.rank > 0 else load_role(ctx, actor_path, ppo.actor_model, None)
    critic = load_role(ctx, critic_path, ppo.critic_model, ppo.critic_lora, ValueModel)
    reward_model = load_role(ctx, critic_path, ppo.critic_model, None, ValueModel)
    sizes = {"actor": count_params((actor.params, actor.frozen)), "critic": count_params((critic.params, critic.frozen))}

    updates_total = max(ppo.num_iterations * ppo.ppo_epochs * ppo.num_minibatches, 1)
    actor_optimizer = make_optimizer(ppo.actor_optimizer, updates_total)
    critic_optimizer = make_optimizer(ppo.critic_optimizer, updates_total)
    ema = jax.tree.map(jnp.copy, actor.params) if ppo.ema_decay > 0 else None
    state = PPOState(init_train_state(actor.params, actor.frozen, actor_optimizer),
                     init_train_state(critic.params, critic.frozen, critic_optimizer), ema)
    del actor.params, actor.frozen, critic.params, critic.frozen  # donated into the train states

    settings = sampling_settings(config, tokenizer)
    reward_settings = RewardSettings(ppo.kl_estimator, ppo.clip_reward_value, ppo.score_position, ppo.gamma,
                                     ppo.lam, ppo.whiten_advantages, ppo.short_answer, ppo.short_answer_penalty)
    update_settings = UpdateSettings(ppo.ppo_epochs, ppo.num_minibatches, ppo.grad_accum_steps, ppo.cliprange,
                                     ppo.cliprange_value, ppo.dual_clip, ppo.entropy_coef, ppo.unsup_coef,
                                     ppo.ema_decay)
    graphdefs = {"actor": actor.graphdef, "reference": (reference or actor).graphdef, "critic": critic.graphdef,
                 "reward_model": reward_model.graphdef}
    experience_fn = make_experience_fn(graphdefs, reward_settings, ppo.max_prompt_seq_len)
    update_fn = make_ppo_update(actor.graphdef, critic.graphdef, actor_optimizer, critic_optimizer, update_settings)

    def role_states(state: PPOState) -> dict:
        actor_states = (state.actor.params, state.actor.frozen)
        reference_states = (adapters_off(state.actor.params), state.actor.frozen) if reference is None else (
            reference.params, reference.frozen)
        return {"actor": actor_states, "reference": reference_states,
                "critic": (state.critic.params, state.critic.frozen),
                "reward_model": (reward_model.params, reward_model.frozen)}

    engine = HybridEngine(actor.graphdef, role_states(state)["actor"], ctx.mesh, config.generation.tensor_parallel,
                          settings)
    prompt_iterator = BatchIterator(train_prompts, ppo.prompts_per_iteration, seed=config.data.seed + 3,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    ptx_iterator = None
    if ppo.unsup_coef > 0:
        texts = builtin_pretraining_texts(4 * ppo.prompts_per_iteration * 8, seed=config.data.seed) if is_builtin \
            else [record.prompt + record.chosen for record in data.train]
        ptx_rows = tokenize_pretraining(texts, tokenizer, ppo.max_prompt_seq_len + ppo.max_answer_seq_len,
                                        cache_dir=ctx.cache_dir)
        ptx_iterator = BatchIterator(ptx_rows, ppo.prompts_per_iteration, seed=config.data.seed + 4,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    key = jax.random.key(config.seed)
    eval_key = jax.random.fold_in(key, 10**6)

    def evaluate_policy(states: dict, with_actor: bool) -> dict[str, float]:
        """Samples answers to the eval prompts (same key each time) and scores them."""
        actor_states = states["actor"] if with_actor else states["reference"]
        prompts = ctx.device_batch(eval_batch)
        out, _ = engine.generate(actor_states, prompts["prompt_ids"], prompts["prompt_mask"], eval_key)
        _, stats = experience_fn(states, out.tokens, out.attention_mask, 0.0)
        result = {"rm_score": float(stats["score"]), "kl_to_sft": float(stats["kl"]) if with_actor else 0.0,
                  "answer_length": float(stats["answer_length"])}
        if is_builtin:
            answers = decode_answers(tokenizer, to_host(out.tokens), to_host(out.attention_mask),
                                     ppo.max_prompt_seq_len)
            result["gold"], result["gold_se"] = mean_and_se([gold_reward(p, a) for p, a in zip(eval_texts, answers)])
            result["sample"] = eval_texts[0].strip() + " ->" + answers[0]
        return result

    checkpointer, latest = ctx.open_checkpoints("ppo")
    saved = lambda s: {"actor": {"step": s.actor.step, "params": s.actor.params, "opt_state": s.actor.opt_state},
                       "critic": {"step": s.critic.step, "params": s.critic.params, "opt_state": s.critic.opt_state},
                       "ema": s.ema}
    kl_coef, start = ppo.kl_coef, 0
    if latest is not None:
        restored, metadata = checkpointer.restore(saved(state))
        state = PPOState(dataclasses.replace(state.actor, **restored["actor"]),
                         dataclasses.replace(state.critic, **restored["critic"]), restored["ema"])
        prompt_iterator.position = BatchPosition(**metadata["position"])
        if ptx_iterator is not None:
            ptx_iterator.position = BatchPosition(**metadata["ptx_position"])
        kl_coef, start, sft_eval = metadata["kl_coef"], metadata["iteration"], metadata["sft_eval"]
        print(f"[ppo] resumed from iteration {start}", flush=True)
    else:
        sft_eval = evaluate_policy(role_states(state), with_actor=False)
    ctx.logger.log(0, {k: v for k, v in sft_eval.items() if k != "sample"}, prefix="ppo/eval_sft")

    def iteration_step(state: PPOState, iteration: int, kl_coef: float):
        """Rollouts, experience and the PPO update of one iteration: three jitted calls."""
        iteration_key = jax.random.fold_in(key, iteration)
        prompts = ctx.device_batch(next(prompt_iterator))
        states = role_states(state)
        rollout, timing = engine.generate(states["actor"], prompts["prompt_ids"], prompts["prompt_mask"],
                                          iteration_key)
        clock = time.perf_counter()
        experience, stats = jax.block_until_ready(
            experience_fn(states, rollout.tokens, rollout.attention_mask, jnp.float32(kl_coef)))
        experience_s = time.perf_counter() - clock
        ptx = None
        if ptx_iterator is not None:
            rows = ctx.device_batch(next(ptx_iterator))
            ptx = jax.tree.map(lambda x: x.reshape(ppo.num_minibatches, -1, *x.shape[1:]), rows)
        clock = time.perf_counter()
        state, metrics = jax.block_until_ready(update_fn(state, experience, ptx, jax.random.fold_in(iteration_key, 1)))
        train_s = time.perf_counter() - clock
        stats = {k: float(v) for k, v in jax.device_get({**stats, **metrics}).items()}
        stats.update(iteration_timings(timing, experience_s, train_s, rollout, ppo, sizes))
        return state, stats

    bar = progress(ppo.num_iterations - start, "ppo")
    for iteration in range(start, ppo.num_iterations):
        with CompileCounter() as compiles:
            state, stats = iteration_step(state, iteration, kl_coef)
        stats["compiles"] = compiles.count  # 0 after the first iteration: nothing recompiles
        if ppo.adaptive_kl:
            kl_coef = float(adaptive_kl_update(kl_coef, stats["kl"], ppo.prompts_per_iteration, target=ppo.kl_target,
                                               horizon=ppo.kl_horizon))
        bar.update(1)
        done = iteration + 1
        if done % config.log_every == 0 or done == ppo.num_iterations or iteration == start:
            ctx.logger.log(done, stats, prefix="ppo")
        metadata = {"iteration": done, "kl_coef": kl_coef, "sft_eval": sft_eval,
                    "position": dataclasses.asdict(prompt_iterator.position),
                    "ptx_position": dataclasses.asdict(ptx_iterator.position) if ptx_iterator else None}
        if checkpointer.save(done, saved(state), metadata, force=done == ppo.num_iterations):
            maybe_kill_after_checkpoint(done)
    bar.close()
    checkpointer.close()

    ppo_eval = evaluate_policy(role_states(state), with_actor=True)
    ctx.logger.log(ppo.num_iterations, {k: v for k, v in ppo_eval.items() if k != "sample"}, prefix="ppo/eval_ppo")
    print(f"[ppo] sample before: {sft_eval.get('sample', '')!r}\n[ppo] sample after:  {ppo_eval.get('sample', '')!r}")
    export_roles(ctx, state, actor, critic, reward_model, actor_path, critic_path)
    if jax.process_index() == 0:
        plot_metrics(f"{ctx.output_dir}/metrics.jsonl", "ppo",
                     ["score", "kl", "actor_loss", "critic_loss", "clipfrac", "entropy"], f"{ctx.output_dir}/ppo/ppo.png")
    summary = {"ppo.rm_score_sft": sft_eval["rm_score"], "ppo.rm_score_ppo": ppo_eval["rm_score"],
               "ppo.kl_to_sft": ppo_eval["kl_to_sft"], "ppo.answer_length_ppo": ppo_eval["answer_length"]}
    if is_builtin:
        summary.update({"ppo.gold_reward_sft": sft_eval["gold"], "ppo.gold_reward_sft_se": sft_eval["gold_se"],
                        "ppo.gold_reward_ppo": ppo_eval["gold"], "ppo.gold_reward_ppo_se": ppo_eval["gold_se"]})
    return summary


def iteration_timings(timing, experience_s, train_s, rollout, ppo, sizes) -> dict[str, float]:
    """Seconds per phase, samples/s and TFLOP/s per phase, as DeepSpeed-Chat reports them."""
    batch, total_len = rollout.tokens.shape
    generated = float(jnp.sum(rollout.attention_mask[:, ppo.max_prompt_seq_len:]))
    actor, critic = sizes["actor"], sizes["critic"]
    generation_flops = 2 * actor * (batch * ppo.max_prompt_seq_len + generated)
    experience_flops = 2 * (2 * actor + 2 * critic) * batch * total_len
    train_flops = 6 * (actor + critic) * batch * total_len * ppo.ppo_epochs
    end_to_end = timing.reshard_s + timing.generate_s + experience_s + train_s
    return {
        "time/reshard_s": timing.reshard_s, "time/generation_s": timing.generate_s,
        "time/experience_s": experience_s, "time/train_s": train_s, "time/iteration_s": end_to_end,
        "samples_per_s": batch / end_to_end,
        "tflops/generation": generation_flops / max(timing.generate_s, 1e-9) / 1e12,
        "tflops/train": train_flops / max(train_s, 1e-9) / 1e12,
        "tflops/end_to_end": (generation_flops + experience_flops + train_flops) / end_to_end / 1e12,
    }


def export_roles(ctx: RunContext, state: PPOState, actor: Role, critic: Role, reward_model: Role, actor_path: str,
                 critic_path: str) -> None:
    """HF exports of the actor, the EMA actor, the critic and the reward model under <output_dir>/ppo/."""
    export_model(nnx.merge(actor.graphdef, state.actor.params, state.actor.frozen), ctx.step_dir("ppo", "actor"),
                 actor_path)
    if state.ema is not None:
        export_model(nnx.merge(actor.graphdef, state.ema, state.actor.frozen), ctx.step_dir("ppo", "actor_ema"),
                     actor_path)
    export_model(nnx.merge(critic.graphdef, state.critic.params, state.critic.frozen), ctx.step_dir("ppo", "critic"),
                 critic_path)
    export_model(nnx.merge(reward_model.graphdef, reward_model.params, reward_model.frozen),
                 ctx.step_dir("ppo", "reward_model"), critic_path)
