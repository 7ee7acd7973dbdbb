"""The config sections every step shares: the mesh, multi-host start-up, models, adapters,
optimizers, data and checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from jaxrlhf.config.checks import CHECK_DATA_FILES, at_least, is_non_negative_number, require
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.data.sources import LAYOUT_NAMES
from jaxrlhf.parallel.mesh import MESH_AXES
from jaxrlhf.parallel.rules import LOGICAL_AXES

DataLayout = Literal[LAYOUT_NAMES]
Dtype = Literal["float32", "bfloat16"]
PREVIOUS_STAGE = ""  # model path meaning "the output of the earlier step of this run"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MeshConfig:
    """Device mesh axis sizes (their product is the device count) and the sharding rules."""

    data: int = 1  # replicated-parameter data parallelism
    fsdp: int = -1  # parameters, gradients and optimizer state sharded; -1 = all remaining devices
    tensor: int = 1  # tensor parallelism inside each layer
    # Logical axis -> mesh axes, overriding jaxrlhf.parallel.rules' tables for the named axes
    # (e.g. {mlp: [tensor, fsdp]}; [] = replicated). MaxText's logical_axis_rules, as data.
    training_rules: dict[str, list[str]] = field(default_factory=dict)
    generation_rules: dict[str, list[str]] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            require(size >= 1 or size == -1, f"{key}.{name}", f"must be a positive size or -1, got {size}")
        require(list(sizes.values()).count(-1) <= 1, key, "at most one axis may be -1")
        for table in ("training_rules", "generation_rules"):
            for logical, mesh_axes in getattr(self, table).items():
                require(
                    logical in LOGICAL_AXES,
                    f"{key}.{table}.{logical}",
                    f"is not a logical axis; known: {', '.join(LOGICAL_AXES)}",
                )
                unknown = [axis for axis in mesh_axes if axis not in MESH_AXES]
                require(
                    not unknown,
                    f"{key}.{table}.{logical}",
                    f"{unknown} are not mesh axes; known: {', '.join(MESH_AXES)}",
                )


@dataclass
class DistributedConfig:
    """JAX multi-controller start-up; unset fields are detected from SLURM, TPU pods or Kubernetes."""

    initialize: Literal["auto", "always", "never"] = "auto"  # auto: only under a cluster launcher
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # A process that stops sending heartbeats this long is declared dead, and the others stop
    # (non-zero exit) instead of waiting on a collective forever.
    heartbeat_timeout_s: int = 30

    def validate(self, key: str) -> None:
        at_least(self, key, 1, "heartbeat_timeout_s")
        if self.num_processes is not None:
            at_least(self, key, 1, "num_processes")
        if self.process_id is not None:
            at_least(self, key, 0, "process_id")
            require(
                self.num_processes is None or self.process_id < self.num_processes,
                f"{key}.process_id",
                f"must be below num_processes={self.num_processes}, got {self.process_id}",
            )


@dataclass
class ModelConfig:
    """Which weights to start from and the precision to run them in."""

    path: str = BUILTIN  # a Hugging Face model directory, or "builtin" for the tiny built-in model
    dtype: Dtype = "float32"  # compute dtype
    param_dtype: Dtype = "float32"  # storage dtype of the weights
    # What the backward pass recomputes: "auto" (the planner's cheapest choice that fits the
    # device), "none", "dots" (keeps the weight matmuls' outputs) or "block" (keeps each block's input).
    remat: Literal["auto", "none", "dots", "block"] = "auto"
    # Training and prefill attention: "auto" (cuDNN flash attention on a GPU where it applies), "xla", "cudnn".
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # A critic may deliberately start from a causal LM (its score head then starts at zero, with a
    # warning); otherwise a value model without a trained head is refused.
    allow_untrained_head: bool = False
    # A tokenizer with more ids than the embedding table is refused; true pads the table (and an
    # untied LM head) up to the tokenizer with the mean row, as transformers' resize_token_embeddings.
    resize_embeddings: bool = False

    def validate(self, key: str) -> None:
        require(
            self.path in (BUILTIN, PREVIOUS_STAGE) or os.path.isdir(self.path),
            f"{key}.path",
            f"model directory not found: {self.path}",
        )


@dataclass
class LoRAConfig:
    """Low-rank adapters on the named projections; the base weights stay frozen."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # adapters are scaled by alpha / rank
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))

    def validate(self, key: str) -> None:
        at_least(self, key, 0, "rank")
        require(self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        require(self.rank == 0 or bool(self.target_modules), f"{key}.target_modules", "is empty but rank > 0")


@dataclass
class OptimizerConfig:
    """AdamW with global-norm clipping, linear warmup, then a decay to min_lr_ratio * learning_rate."""

    learning_rate: float = 1e-3  # peak, reached at the end of warmup
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # the decay after warmup
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 = no clipping
    min_lr_ratio: float = 0.1

    def validate(self, key: str) -> None:
        at_least(self, key, 0, "weight_decay", "warmup_steps", "max_grad_norm")
        lr = self.learning_rate
        require(0 < lr < math.inf, f"{key}.learning_rate", f"must be > 0 (0 would train nothing), got {lr}")
        for name in ("b1", "b2", "min_lr_ratio"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")
        require(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")


@dataclass
class DataSourceConfig:
    """One data set on disk (or the built-in task) and how its columns are read."""

    path: str = BUILTIN  # a local file or directory, or "builtin" for the generated task
    layout: DataLayout = BUILTIN  # which columns hold prompt / chosen / rejected
    weight: float = 1.0  # times each record is used on average (0.5: a seeded half, 2: twice)

    def validate(self, key: str) -> None:
        require(self.weight > 0, f"{key}.weight", f"must be > 0, got {self.weight}")
        require(
            (self.path == BUILTIN) == (self.layout == BUILTIN),
            key,
            f"path {self.path!r} and layout {self.layout!r} disagree: 'builtin' goes with 'builtin'",
        )
        found = self.path == BUILTIN or not CHECK_DATA_FILES.get() or os.path.exists(self.path)
        require(found, f"{key}.path", f"data file not found: {self.path}")


@dataclass
class DataConfig:
    """Where the examples come from and how they are divided between the three steps."""

    sources: list[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig()])
    eval_sources: list[DataSourceConfig] = field(default_factory=list)  # empty: hold out eval_fraction
    data_split: str = "2,4,4"  # relative shares of every source for SFT, RM, PPO (DeepSpeed-Chat's)
    eval_fraction: float = 0.05
    builtin_size: int = 10000  # examples generated for the built-in task
    seed: int = 1234  # shuffling and splitting
    cache_dir: str | None = None  # tokenized-data cache; None = no cache

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        """data_split normalized to sum to 1: the SFT, RM and PPO fractions."""
        shares = [float(share) for share in self.data_split.split(",")]
        return shares[0] / sum(shares), shares[1] / sum(shares), shares[2] / sum(shares)

    def validate(self, key: str) -> None:
        require(bool(self.sources), f"{key}.sources", "is empty")
        for index, source in enumerate(self.sources):
            source.validate(f"{key}.sources[{index}]")
        for index, source in enumerate(self.eval_sources):
            source.validate(f"{key}.eval_sources[{index}]")
        shares = self.data_split.split(",")
        require(
            len(shares) == 3
            and all(is_non_negative_number(share) for share in shares)
            and sum(float(share) for share in shares) > 0,
            f"{key}.data_split",
            f"must be three non-negative numbers like '2,4,4' with a positive sum, got {self.data_split!r}",
        )
        require(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        at_least(self, key, 1, "builtin_size")


@dataclass
class CheckpointConfig:
    """Periodic checkpoints under <output_dir>/<step>/checkpoints for exact resume."""

    every_steps: int = 100
    keep: int = 2  # the most recent checkpoints kept; older ones are deleted

    def validate(self, key: str) -> None:
        at_least(self, key, 1, "every_steps", "keep")


@dataclass
class PlanConfig:
    """The memory planner (python -m jaxrlhf.plan, and remat: auto)."""

    device_memory_gib: float | None = None  # per device; None = what the accelerator reports (unknown on CPU)
    usable_fraction: float = 0.9  # of the device memory the plan may fill (XLA and the runtime need the rest)

    def validate(self, key: str) -> None:
        require(
            self.device_memory_gib is None or self.device_memory_gib > 0,
            f"{key}.device_memory_gib",
            f"must be > 0 or null, got {self.device_memory_gib}",
        )
        fraction = self.usable_fraction
        require(0 < fraction <= 1, f"{key}.usable_fraction", f"must be in (0, 1], got {fraction}")


def require_master_weights(model: ModelConfig, lora: LoRAConfig, key: str) -> None:
    """Trained weights stay float32 (Adam updates vanish in bfloat16); a bfloat16 base is fine
    only when LoRA freezes it. Compute in bfloat16 with dtype=bfloat16."""
    require(
        model.param_dtype == "float32" or lora.rank > 0,
        f"{key}.param_dtype",
        f"must be float32 for full fine-tuning (master weights), got {model.param_dtype}; "
        "use dtype=bfloat16 for bfloat16 compute, or LoRA to keep a bfloat16 base frozen",
    )
