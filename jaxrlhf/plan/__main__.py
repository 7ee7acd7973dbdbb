"""python -m jaxrlhf.plan CONFIG.yaml [key=value ...] [--compile] [--devices N] [--json PATH]

Prints, for every configured step, the bytes per device of each role (weights, gradients,
optimizer state, activations under each remat policy, logits, the generation copy and its KV
cache) on the configured mesh, and the remat and gradient accumulation `remat: auto` takes.
Reads each model's config.json only. `--devices N` plans for N devices (simulated CPU devices
for `--compile`); `--compile` also compiles the real jitted programs from shapes (SFT, RM and
DPO steps; PPO generate, experience and update) and prints XLA's memory_analysis() beside the
estimate. Exits 2 with a one-line reason on bad input (config file, key, model directory), when
a step cannot fit the device memory, or when its batch sizes would be refused by train's preflight.
"""

from __future__ import annotations

import json
import os
import sys


def parse_flags(argv: list[str]) -> tuple[list[str], dict]:
    flags, rest, i = {"compile": False, "devices": None, "json": None}, [], 0
    while i < len(argv):
        if argv[i] == "--compile":
            flags["compile"] = True
        elif argv[i] in ("--devices", "--json") and i + 1 < len(argv):
            flags[argv[i][2:]] = argv[i + 1]
            i += 1
        else:
            rest.append(argv[i])
        i += 1
    dangling = [flag for flag in ("--devices", "--json") if flag in rest]
    if dangling:
        refuse(f"{dangling[0]} needs a value")
    if flags["devices"] is not None:
        if not flags["devices"].isdigit() or int(flags["devices"]) < 1:
            refuse(f"--devices must be a positive integer, got {flags['devices']!r}")
        flags["devices"] = int(flags["devices"])
    return rest, flags


def refuse(message: str):
    """`error: <one line>` on stderr and exit code 2, as the config loader does."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def batch_size_refusals(config, plans, devices) -> list[str]:
    """What train's preflight says of the batch sizes, as planned (gradient accumulation
    resolved), on these devices' mesh: [] when every batch divides over them."""
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.plan.planner import resolved
    from jaxrlhf.preflight import check_batch_sizes
    from jaxrlhf.run_context import RunContext

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    try:
        check_batch_sizes(RunContext(resolved(config, plans), mesh, logger=None))
    except ValueError as error:
        return [str(error)]
    return []


def main(argv: list[str] | None = None) -> int:
    argv, flags = parse_flags(list(sys.argv[1:] if argv is None else argv))
    if flags["devices"]:  # simulated host devices: set before jax starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={flags['devices']}"
        )
    from jaxrlhf.config import main_config_or_exit

    config = main_config_or_exit(argv, check_data_files=False)
    import jax

    from jaxrlhf.plan.report import dry_run_rows, plan_for_devices

    devices = jax.devices()[: flags["devices"]] if flags["devices"] else jax.devices()
    try:
        plans = plan_for_devices(config, devices)
        refusals = batch_size_refusals(config, plans, devices)
    except (FileNotFoundError, ValueError) as error:
        refuse(error)
    for plan in plans:
        print(plan.table(), flush=True)
    results = {
        plan.step: {
            "choice": plan.choice(),
            "estimate_gib": plan.peak / 2**30,
            "fits": plan.fits,
            "budget_gib": plan.budget / 2**30 if plan.budget else None,
        }
        for plan in plans
    }
    if flags["compile"] and not refusals:  # steps the preflight would refuse are not compiled
        print(f"dry run: compiling from shapes on {len(devices)} {devices[0].platform} device(s) ...", flush=True)
        for step, phase, xla, estimate in dry_run_rows(config, plans, devices):
            print(
                f"  {step:<4} {phase:<10} XLA memory_analysis {xla / 2**30:8.2f} GiB per device, "
                f"planner (same platform) {estimate / 2**30:8.2f} GiB ({estimate / xla:.2f}x)",
                flush=True,
            )
            results[step].setdefault("dry_run_gib", {})[phase] = xla / 2**30
            results[step].setdefault("estimate_same_platform_gib", {})[phase] = estimate / 2**30
    if flags["json"]:
        try:
            with open(flags["json"], "w") as f:
                json.dump(results, f, indent=1)
        except OSError as error:
            refuse(f"--json {flags['json']}: {error.strerror}")
    refusals += [
        f"step {plan.step} needs {plan.peak / 2**30:.1f} GiB per device at best ({plan.choice()}), "
        f"more than the {plan.budget / 2**30:.1f} GiB usable"
        for plan in plans
        if not plan.fits
    ]
    for refusal in refusals:
        print(f"error: {refusal}", file=sys.stderr)
    return 2 if refusals else 0


if __name__ == "__main__":
    sys.exit(main())
