"""What a plan is made of: each role's bytes per device (`Line`), one step's plan under one choice
of remat and accumulation (`StepPlan`), and where it runs (`Target`)."""

from __future__ import annotations

import dataclasses
import math
import types

from jaxrlhf.parallel.rules import Rules
from jaxrlhf.plan.estimate import POLICIES, Estimate

GIB = 2**30


@dataclasses.dataclass
class Line:
    """One role's bytes per device; a trained role also has gradients, optimizer state and activations."""

    role: str
    weights: int  # trained parameters (float32 master weights, or adapters) and the frozen rest
    grads: int = 0
    optimizer: int = 0
    working: int = 0  # compute-dtype copy of the weights, one block gathered whole (FSDP)
    activations: dict[str, int] = dataclasses.field(default_factory=dict)  # per remat policy
    logits: int = 0  # the LM head's float32 logits (one chunk) and their gradient
    cache: int = 0  # generation: the KV cache


@dataclasses.dataclass
class StepPlan:
    """One step under one choice of remat and accumulation: its roles and each phase's peak."""

    step: str
    mesh_shape: dict[str, int]
    lines: list[Line]
    phases: dict[str, int]  # peak bytes per device of each phase
    remat: dict[str, str]  # trained role -> policy
    grad_accum: int
    budget: int | None  # usable bytes per device; None = unknown (no constraint)
    slots: int = 0  # step 3: the decode slots the planner chose for generation (0: the configured engine's)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def choice(self) -> str:
        policies = ", ".join(f"{role} remat={policy}" for role, policy in self.remat.items())
        slots = f", generation.slots={self.slots}" if self.slots else ""
        return f"{policies}, grad_accum_steps={self.grad_accum}{slots}"

    def table(self) -> str:
        gib = lambda n: f"{n / GIB:9.2f}" if n else f"{'-':>9}"
        devices = math.prod(self.mesh_shape.values())
        mesh = " x ".join(f"{axis}={size}" for axis, size in self.mesh_shape.items())
        budget = f"{self.budget / GIB:.1f} GiB usable" if self.budget else "device memory unknown"
        columns = ("weights", "grads", "optimizer", "working", *(f"act {p}" for p in POLICIES), "logits", "kv cache")
        rows = [
            f"[{self.step}] GiB per device on {devices} device(s) ({mesh}); {budget}",
            f"  {'role':<16}" + "".join(f"{c:>10}" for c in columns),
        ]
        for line in self.lines:
            activations = [line.activations.get(p, 0) for p in POLICIES]
            values = (line.weights, line.grads, line.optimizer, line.working, *activations, line.logits, line.cache)
            rows.append(f"  {line.role:<16}" + "".join(f" {gib(v)}" for v in values))
        phases = ", ".join(f"{phase} {peak / GIB:.2f}" for phase, peak in self.phases.items())
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"  peak by phase (GiB): {phases} -> {verdict} with {self.choice()}")
        return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the plan runs: the mesh's axis sizes, the rules, the usable bytes per device."""

    mesh_shape: dict[str, int]
    training_rules: Rules
    generation_rules: Rules
    budget: int | None
    platform: str = "gpu"  # "cpu" adds what XLA:CPU alone allocates (to compare with a CPU dry run)

    @property
    def mesh(self):  # what the estimate reads of a mesh: its shape
        return types.SimpleNamespace(shape=self.mesh_shape)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def replicas(self) -> int:
        return self.mesh_shape["data"] * self.mesh_shape["fsdp"]

    def generation_mesh(self, tensor_parallel: int):
        if self.devices % tensor_parallel:
            raise ValueError(f"generation.tensor_parallel={tensor_parallel} does not divide the {self.devices} devices")
        return types.SimpleNamespace(
            shape={"data": 1, "fsdp": self.devices // tensor_parallel, "tensor": tensor_parallel}
        )


def trained_line(role: str, estimate: Estimate) -> Line:
    return Line(
        role,
        estimate.params + estimate.frozen,
        estimate.grads,
        estimate.optimizer,
        estimate.working,
        estimate.activations,
        estimate.logits,
    )
