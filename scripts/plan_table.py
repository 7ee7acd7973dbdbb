"""The memory table of docs/memory.md: every shipped large-model recipe planned and dry-run.

For each config: `python -m jaxrlhf.plan CONFIG --devices N --compile --json ...` (shapes only,
simulated CPU devices), then one markdown row per step: the planner's estimate for the GPU, its
choice, whether it fits, and XLA's compiled figure with the planner's figure for the same (CPU)
platform. About 10 minutes on 2 cores.

    python scripts/plan_table.py > /tmp/table.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

RECIPES = [  # config, devices
    ("configs/dschat-opt-1.3b.yaml", 1),
    ("configs/dschat-opt-13b.yaml", 8),
    ("configs/dschat-opt-66b.yaml", 64),
    ("configs/llama3-8b-lora.yaml", 1),
    ("configs/llama2-70b.yaml", 64),
]


def main() -> None:
    print(
        "| config | devices | step | planner (GPU), GiB/device | fits 72 of 80 GiB | chosen | "
        "XLA dry run (CPU), GiB/device by phase | planner for CPU, by phase |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for config, devices in RECIPES:
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "plan.json")
            command = [
                sys.executable,
                "-m",
                "jaxrlhf.plan",
                config,
                "--devices",
                str(devices),
                "--compile",
                "--json",
                path,
            ]
            subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
            with open(path) as f:
                results = json.load(f)
        for step, result in results.items():
            phases = lambda key, result=result: ", ".join(
                f"{phase} {value:.1f}" for phase, value in result[key].items()
            )
            print(
                f"| {os.path.basename(config)} | {devices} | {step} | {result['estimate_gib']:.1f} | "
                f"{'yes' if result['fits'] else 'no'} | {result['choice']} | {phases('dry_run_gib')} | "
                f"{phases('estimate_same_platform_gib')} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
