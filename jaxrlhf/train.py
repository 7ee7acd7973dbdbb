"""python -m jaxrlhf.train [CONFIG.yaml] [key=value ...]: runs the configured steps (sft, rm, ppo).

With no argument it runs the whole pipeline at tiny size on the built-in task. Config errors
exit with code 2 before any work; every step writes its HF export under <output_dir>/<step>/model
and its numbers into <output_dir>/summary.json.
"""

from __future__ import annotations

import os
import sys
import time

from jaxrlhf.config import main_config_or_exit, save_resolved_config


def run(config) -> dict[str, float]:
    """Runs `config.steps` in order and returns the merged summary (also in summary.json)."""
    import jax

    from jaxrlhf.metrics import MetricsLogger, format_summary_table, update_summary
    from jaxrlhf.parallel import make_mesh, maybe_initialize_distributed
    from jaxrlhf.reward import run_reward_model
    from jaxrlhf.runtime import RunContext
    from jaxrlhf.sft import run_sft

    maybe_initialize_distributed(config.distributed.initialize, config.distributed.coordinator_address,
                                 config.distributed.num_processes, config.distributed.process_id)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    os.makedirs(config.output_dir, exist_ok=True)
    if jax.process_index() == 0:
        save_resolved_config(config, config.output_dir)
    runners = {"sft": run_sft, "rm": run_reward_model}
    if "ppo" in config.steps:
        from jaxrlhf.ppo import run_ppo

        runners["ppo"] = run_ppo
    logger = MetricsLogger(config.output_dir, tensorboard=config.tensorboard)
    ctx = RunContext(config, mesh, logger)
    print(f"jaxrlhf: steps {', '.join(config.steps)} on {mesh.devices.size} device(s) "
          f"(mesh {dict(mesh.shape)}), output in {config.output_dir}", flush=True)
    summary: dict[str, float] = {}
    try:
        for step in config.steps:
            started = time.perf_counter()
            values = runners[step](ctx)
            values[f"{step}.seconds"] = time.perf_counter() - started
            summary.update(values)
            update_summary(config.output_dir, values)
    finally:
        logger.close()
    print(format_summary_table(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    config = main_config_or_exit(sys.argv[1:] if argv is None else argv)
    try:
        run(config)
    except (FileNotFoundError, ValueError) as error:
        if os.environ.get("JAXRLHF_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
