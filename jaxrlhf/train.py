"""python -m jaxrlhf.train [CONFIG.yaml] [key=value ...]: runs the configured steps (sft, rm, ppo).

With no argument it runs the whole pipeline at tiny size on the built-in task. Config errors
exit with code 2 before any work; every step writes its HF export under <output_dir>/<step>/model
and its numbers into <output_dir>/summary.json. `--print-config` prints the resolved config
(defaults, preset, file and overrides applied) and exits.
"""

from __future__ import annotations

import os
import sys

from jaxrlhf.config import config_yaml, main_config_or_exit, save_resolved_config
from jaxrlhf.failure_report import one_line, quiet_library_logs, report_failure, report_interrupt


def run(config) -> dict[str, float]:
    """Runs `config.steps` in order and returns the merged summary (also in summary.json)."""
    import jax

    from jaxrlhf.metrics import MetricsLogger, format_summary_table, update_summary
    from jaxrlhf.parallel import make_mesh, maybe_initialize_distributed
    from jaxrlhf.preflight import preflight
    from jaxrlhf.run_context import RunContext
    from jaxrlhf.run_lock import hold_run_lock
    from jaxrlhf.steps.reward_model import run_reward_model
    from jaxrlhf.steps.sft import run_sft

    maybe_initialize_distributed(
        config.distributed.initialize,
        config.distributed.coordinator_address,
        config.distributed.num_processes,
        config.distributed.process_id,
        config.distributed.heartbeat_timeout_s,
    )
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    config = planned(config)  # remat: auto and gradient accumulation resolved; refused if it cannot fit
    ctx = RunContext(config, mesh, logger=None)
    preflight(ctx)  # before anything is written
    with hold_run_lock(config.output_dir):  # one run per output_dir: a second stops here (RunLocked, exit 2)
        os.makedirs(config.output_dir, exist_ok=True)
        if jax.process_index() == 0:
            save_resolved_config(config, config.output_dir)
        runners = {"sft": run_sft, "rm": run_reward_model}
        if "dpo" in config.steps:
            from jaxrlhf.steps.dpo import run_dpo

            runners["dpo"] = lambda ctx: run_dpo(ctx, task_hooks(config).gold_reward)
        if "ppo" in config.steps:
            from jaxrlhf.rl.ppo import run_ppo

            runners["ppo"] = lambda ctx: run_ppo(ctx, task_hooks(config))
        logger = ctx.logger = MetricsLogger(config.output_dir, tensorboard=config.tensorboard)
        print(
            f"jaxrlhf: steps {', '.join(config.steps)} on {mesh.devices.size} device(s) "
            f"(mesh {dict(mesh.shape)}), output in {config.output_dir}",
            flush=True,
        )
        summary: dict[str, float] = {}
        try:
            for step in config.steps:
                ctx.start_clock(step)
                with ctx.activation_sharding():
                    values = runners[step](ctx)
                values[f"{step}.seconds"] = ctx.step_seconds(step)  # with the attempts before a resume
                summary.update(values)
                update_summary(config.output_dir, values)
        finally:
            logger.close()
        print(format_summary_table(summary), flush=True)
        return summary


def planned(config):
    """The config with each step's remat and gradient accumulation as the memory planner chose
    them (printed), or PlanError (its table printed) when a step cannot fit the device."""
    import jax

    from jaxrlhf.plan.planner import GIB, PlanError, refuse_unfit, resolved
    from jaxrlhf.plan.report import plan_for_devices

    plans = plan_for_devices(config, jax.devices())
    try:
        refuse_unfit(plans)
    except PlanError as error:
        if jax.process_index() == 0:
            print(error.table, file=sys.stderr, flush=True)
        raise
    if jax.process_index() == 0:
        for plan in plans:
            budget = f" of {plan.budget / GIB:.1f} usable" if plan.budget else ""
            print(
                f"[plan] {plan.step}: {plan.choice()} (estimated peak {plan.peak / GIB:.2f} GiB{budget} "
                "per device; python -m jaxrlhf.plan for the table)",
                flush=True,
            )
    return resolved(config, plans)


def task_hooks(config):
    """What step 3 may use of the task: the built-in task's gold reward (evaluation only) and
    pretraining texts when every data source is the built-in task; nothing otherwise."""
    from jaxrlhf.data.builtin import BUILTIN, builtin_pretraining_texts, gold_reward
    from jaxrlhf.rl.ppo import TaskHooks

    if all(source.layout == BUILTIN for source in config.data.sources):
        return TaskHooks(gold_reward=gold_reward, pretraining_texts=builtin_pretraining_texts)
    return TaskHooks()


def main(argv: list[str] | None = None) -> int:
    """The CLI: a bad config exits 2 before any work; whatever stops the run is one line on stderr (its
    traceback in <output_dir>/error.log; `JAXRLHF_DEBUG=1` raises it instead), see `failure_report`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print_only = "--print-config" in argv
    config = main_config_or_exit([arg for arg in argv if arg != "--print-config"])
    if print_only:
        print(config_yaml(config), end="")
        return 0
    debug = bool(os.environ.get("JAXRLHF_DEBUG"))
    if not debug:
        quiet_library_logs()
    try:
        return start(config)
    except KeyboardInterrupt:
        if debug:
            raise
        return report_interrupt(config)
    except Exception as error:
        if debug:
            raise
        return report_failure(config, error)


def start(config) -> int:
    """Runs the config unless another run holds its output directory (exit code 2 at once)."""
    from jaxrlhf.run_lock import RunLocked, refuse_if_held

    try:
        refuse_if_held(config.output_dir)  # before the heavy start-up: a second run stops at once
    except RunLocked as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
