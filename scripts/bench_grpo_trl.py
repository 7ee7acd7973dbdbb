"""GRPO throughput: our `python -m jaxrlhf.train` GRPO against Hugging Face TRL's GRPOTrainer, same work.

Both sides train the same tiny random LLaMA (built with transformers, saved to a temp dir) with
the same tokenizer (the built-in task's BPE), on the same prompts (built-in task prompts of
exactly --prompt-len tokens, so neither side pads them), with the same reward function
(`jaxrlhf.data.builtin:format_reward`), P prompts x N samples per step, answers forced to
exactly --answer-len tokens (end-of-sequence suppressed until then), no KL term, one optimizer
step per batch. They run one after the other on one CPU device, torch with as many threads as
the CPUs JAX sees. Prints samples/s, seconds/step and mean answer length of each side (the
first --warmup steps excluded: compilation, first-call overheads) and the ratio ours/TRL.
Nothing is downloaded. Needs the `bench` extra (`pip install -e .[bench]`: trl). Example:

    python scripts/bench_grpo_trl.py                                  # the defaults, about a minute per side
    python scripts/bench_grpo_trl.py --hidden 256 --layers 4 --steps 8 --keep /tmp/grpo_bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REWARD = "jaxrlhf.data.builtin:format_reward"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (TRL's num_generations)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (prompts of exactly this length)")
    parser.add_argument("--answer-len", type=int, default=32, help="new tokens per answer (forced)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per side, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: the CPUs JAX sees")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["ours", "trl"], help="run one side only")
    parser.add_argument("--keep", help="build the model, data and run outputs in this directory and keep them")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no step after --warmup {args.warmup}")
    return args


def build_model_and_data(args, workdir: str) -> tuple[str, str, list[str]]:
    """The random LLaMA + tokenizer (one directory), a prompt-response JSONL of the prompts, and the prompts."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from jaxrlhf.data.builtin import builtin_records, builtin_tokenizer

    model_dir = os.path.join(workdir, "model")
    builtin_tokenizer(model_dir, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_len + args.answer_len,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)

    # Prompts of exactly prompt_len tokens: our side left-pads to max_prompt_seq_len, TRL pads to the
    # longest prompt of the batch; with equal lengths both see the same [rows, prompt_len] prompts.
    needed = args.prompts * args.steps + args.prompts  # + a held-out share for our evaluation
    records, seen = [], set()
    for record in builtin_records(size=20_000, seed=args.seed):
        if record.prompt in seen or len(tokenizer(record.prompt)["input_ids"]) != args.prompt_len:
            continue
        seen.add(record.prompt)
        records.append(record)
    if len(records) < needed:
        raise SystemExit(
            f"only {len(records)} distinct built-in prompts have exactly {args.prompt_len} tokens, "
            f"{needed} needed; try --prompt-len between 14 and 21"
        )
    records = records[: max(needed, 200)]
    data_path = os.path.join(workdir, "prompts.jsonl")
    with open(data_path, "w") as out:
        for record in records:
            out.write(json.dumps({"prompt": record.prompt, "response": record.chosen}) + "\n")
    return model_dir, data_path, [record.prompt for record in records]


def run_ours(args, model_dir: str, data_path: str, workdir: str, prompts: int) -> dict:
    """`python -m jaxrlhf.train steps=[ppo]` with GRPO in a subprocess; per-iteration times from metrics.jsonl."""
    output_dir = os.path.join(workdir, "ours")
    shutil.rmtree(output_dir, ignore_errors=True)
    eval_fraction = args.prompts / prompts  # held out for the evaluation our PPO step runs before and after
    overrides = [
        "steps=[ppo]",
        f"output_dir={output_dir}",
        f"seed={args.seed}",
        "tensorboard=false",
        "log_every=1",
        f"ppo.actor_model.path={model_dir}",
        "ppo.actor_model.remat=none",  # TRL runs without gradient checkpointing too
        "ppo.algorithm=grpo",
        f"ppo.samples_per_prompt={args.n}",
        f"ppo.prompts_per_iteration={args.prompts}",
        f"ppo.num_iterations={args.steps}",
        f"ppo.reward=[{REWARD}]",
        "ppo.kl_coef=0",
        "ppo.ppo_epochs=1",
        "ppo.num_minibatches=1",
        "ppo.ema_decay=0",
        "ppo.loss_aggregation=token_mean",  # TRL's default loss_type "dapo"
        "ppo.scale_rewards=group",
        f"ppo.max_prompt_seq_len={args.prompt_len}",
        f"ppo.max_answer_seq_len={args.answer_len}",
        f"ppo.eval_prompts={args.prompts}",
        f"ppo.actor_optimizer.learning_rate={args.lr}",
        f"generation.min_new_tokens={args.answer_len}",
        "generation.temperature=1.0",
        f"data.sources=[{{layout: prompt-response, path: {data_path}}}]",
        "data.data_split=0,0,1",
        f"data.eval_fraction={eval_fraction}",
    ]
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "jaxrlhf.train", *overrides]
    print("ours:", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    log_path = os.path.join(workdir, "ours.log")
    with open(log_path, "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        with open(log_path) as log:
            print(log.read()[-4000:], file=sys.stderr)
        raise SystemExit(f"our run failed (exit {result.returncode}); log: {log_path}")
    lines = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    iterations = [line for line in lines if line.get("prefix") == "ppo" and "time/iteration_s" in line]
    if len(iterations) != args.steps:
        raise SystemExit(f"expected {args.steps} ppo iterations in metrics.jsonl, found {len(iterations)}")
    timed = iterations[args.warmup :]
    phases = {
        phase: statistics.mean(line[f"time/{phase}_s"] for line in timed)
        for phase in ("reshard", "generation", "reward_fn", "experience", "train")
        if f"time/{phase}_s" in timed[0]
    }
    length_key = next((k for k in ("answer_length", "answer_len_mean") if k in timed[0]), None)
    return {
        "step_s": statistics.mean(line["time/iteration_s"] for line in timed),
        "step_times": [line["time/iteration_s"] for line in iterations],
        "answer_len": statistics.mean(line[length_key] for line in timed) if length_key else None,
        "phases": phases,
        "wall_s": wall,
        "log": log_path,
    }


def run_trl(args, model_dir: str, prompts: list[str], workdir: str, threads: int) -> dict:
    """TRL's GRPOTrainer on the same model, prompts and reward; each optimizer step timed by a callback."""
    import datasets
    import torch
    import transformers
    import trl

    from jaxrlhf.data.builtin import format_reward

    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    def reward(prompts, completions, **kwargs):  # TRL calls f(prompts=, completions=, **columns)
        return format_reward(prompts, completions)

    reward.__name__ = "format_reward"

    class StepTimer(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = trl.GRPOConfig(
        output_dir=os.path.join(workdir, "trl"),
        per_device_train_batch_size=args.prompts * args.n,  # completions, a multiple of num_generations
        gradient_accumulation_steps=1,
        num_generations=args.n,
        max_completion_length=args.answer_len,
        generation_kwargs={"min_new_tokens": args.answer_len},  # no early end-of-sequence, as on our side
        temperature=1.0,
        learning_rate=args.lr,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,  # GRPOConfig's default is on; ours runs with remat=none
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    if trainer.args.activation_checkpointing:
        raise SystemExit("TRL: activation checkpointing is on; this comparison runs without it")
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    if len(timer.times) != args.steps:
        raise SystemExit(f"expected {args.steps} TRL steps, timed {len(timer.times)}")
    timed_lengths = timer.lengths[args.warmup :]
    return {
        "step_s": statistics.mean(timer.times[args.warmup :]),
        "step_times": timer.times,
        "answer_len": statistics.mean(timed_lengths) if timed_lengths else None,
        "wall_s": wall,
    }


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    return {name: metadata.version(name) for name in ("jax", "torch", "transformers", "trl")}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_grpo_trl_")
    os.makedirs(workdir, exist_ok=True)
    try:
        model_dir, data_path, prompts = build_model_and_data(args, workdir)
        rows = args.prompts * args.n
        print(
            f"LLaMA hidden {args.hidden}, {args.layers} layers, {args.heads} heads; {args.prompts} prompts x "
            f"{args.n} samples = {rows} answers/step, prompt {args.prompt_len} + answer {args.answer_len} tokens, "
            f"{args.steps} steps ({args.warmup} warm-up); torch threads {threads}; {versions()}",
            flush=True,
        )
        results = {}
        if args.only in (None, "ours"):
            results["ours (jaxrlhf)"] = run_ours(args, model_dir, data_path, workdir, len(prompts))
        if args.only in (None, "trl"):
            results["TRL GRPOTrainer"] = run_trl(args, model_dir, prompts, workdir, threads)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print("| side | samples/s | s/step (mean) | s/step (median) | mean answer tokens | every step (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for side, result in results.items():
        length = "-" if result["answer_len"] is None else f"{result['answer_len']:.1f}"
        steps = ", ".join(f"{t:.2f}" for t in result["step_times"])
        print(
            f"| {side} | {rows / result['step_s']:.1f} | {result['step_s']:.3f} | "
            f"{statistics.median(result['step_times'][args.warmup :]):.3f} | {length} | {steps} | "
            f"{result['wall_s']:.0f} |"
        )
    if "ours (jaxrlhf)" in results:
        phases = results["ours (jaxrlhf)"]["phases"]
        print("ours, s/step by phase: " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items()))
    if len(results) == 2:
        ours, theirs = results["ours (jaxrlhf)"], results["TRL GRPOTrainer"]
        print(f"ratio ours/TRL (samples/s): {theirs['step_s'] / ours['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
