"""Step 3's algorithms on the same work, one after the other: PPO (with its critic) against the
critic-free GRPO, RLOO and REINFORCE++, each answering 64 rollouts per iteration (PPO: 64 prompts;
the others: 16 prompts x 4 samples, each prompt prefilled once) with the same epochs and
minibatches, from the same SFT and reward models. Prints each one's median seconds per phase and
samples/s after the first (compiling) iteration, and the ratio to PPO.

    python scripts/bench_step3.py --run runs/default     # a finished default run (its sft/ and rm/)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ALGORITHMS = {
    "ppo": ["ppo.prompts_per_iteration=64"],
    "grpo": ["ppo.algorithm=grpo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=16"],
    "rloo": ["ppo.algorithm=rloo", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=16"],
    "reinforce_pp": ["ppo.algorithm=reinforce_pp", "ppo.samples_per_prompt=4", "ppo.prompts_per_iteration=16"],
}
PHASES = ("time/generation_s", "time/experience_s", "time/train_s", "time/iteration_s", "samples_per_s")


def run_step3(run_dir: str, output_dir: str, iterations: int, overrides: list[str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device
    env.setdefault("JAX_PLATFORMS", "cpu")
    argv = [
        sys.executable, "-m", "jaxrlhf.train", "steps=[ppo]", f"output_dir={output_dir}",
        f"ppo.actor_model.path={run_dir}/sft/model", f"ppo.critic_model.path={run_dir}/rm/model",
        f"data.cache_dir={run_dir}/cache", f"ppo.num_iterations={iterations}", "ppo.ppo_epochs=2",
        "ppo.num_minibatches=4", "ppo.eval_prompts=8", "log_every=1", "tensorboard=false", *overrides,
    ]  # fmt: skip
    subprocess.run(argv, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(f"{output_dir}/metrics.jsonl")]
    iterations = [row for row in rows if row.get("prefix") == "ppo" and "time/iteration_s" in row][1:]
    return {phase: statistics.median(row[phase] for row in iterations) for phase in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run's output_dir (its sft/model and rm/model)")
    parser.add_argument("--iterations", type=int, default=12)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in ALGORITHMS.items():
            print(f"[bench] {name} ...", flush=True)
            results[name] = run_step3(args.run, f"{scratch}/{name}", args.iterations, overrides)
    print("| algorithm | generation s | experience s | update s | iteration s | samples/s | vs PPO |")
    print("|---|---|---|---|---|---|---|")
    for name, times in results.items():
        speedup = times["samples_per_s"] / results["ppo"]["samples_per_s"]
        cells = " | ".join(f"{times[phase]:.3f}" for phase in PHASES[:4])
        print(f"| {name} | {cells} | {times['samples_per_s']:.1f} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
