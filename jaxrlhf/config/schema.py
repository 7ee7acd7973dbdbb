"""The run configuration's schema: one typed dataclass per section, each checking its own values.

Every check raises `ConfigError` with one line naming the dotted key (`data.sources[0].layout`),
before any work starts. Loading (YAML, presets, overrides) is in `jaxrlhf.config.loading`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from jaxrlhf.config.checks import ConfigError, at_least, require
from jaxrlhf.config.sections import CheckpointConfig, DataConfig, DistributedConfig, MeshConfig, PlanConfig
from jaxrlhf.config.steps import DPOConfig, GenerationConfig, PPOConfig, RMConfig, SFTConfig
from jaxrlhf.data.split import STEPS
from jaxrlhf.models.safetensors_io import parse_shard_size

PIPELINE = ("sft", "rm", "dpo", "ppo")  # every step, in the order they run (the default run: STEPS)
Step = Literal[PIPELINE]


@dataclass
class RunConfig:
    """One run of the pipeline: which steps, where outputs go, and every step's settings."""

    steps: list[Step] = field(default_factory=lambda: list(STEPS))
    output_dir: str = "runs/default"
    seed: int = 0
    # auto: from the latest checkpoint if there is one, refusing one made with other settings;
    # always: the same, and a checkpoint must exist; never: start over; force: resume whatever changed
    resume: Literal["auto", "always", "never", "force"] = "auto"
    log_every: int = 10  # optimizer steps between metric lines
    max_bad_steps: int = 10  # optimizer steps in a row with a non-finite loss or gradient (skipped) before stopping
    tensorboard: bool = True
    # the most bytes per safetensors file of a step's HF export, in transformers' notation (5GB, 500MB,
    # 2GiB or bytes); an export that needs more is split into files with an index, as transformers does
    export_max_shard_size: str = "5GB"
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self) -> None:
        require(bool(self.steps), "steps", "is empty")
        require(
            len(set(self.steps)) == len(self.steps) and self.steps == sorted(self.steps, key=PIPELINE.index),
            "steps",
            f"must be distinct and in pipeline order {', '.join(PIPELINE)}, got {', '.join(self.steps)}",
        )
        require(bool(self.output_dir), "output_dir", "is empty")
        require(  # metrics, checkpoints, exports, config and lock are written with os and pathlib
            not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", self.output_dir),
            "output_dir",
            f"{self.output_dir} is a remote path; remote output directories are not supported yet: write to a "
            "local or mounted path (e.g. gcsfuse) and copy",
        )
        require(
            not os.path.exists(self.output_dir) or os.path.isdir(self.output_dir),
            "output_dir",
            f"{self.output_dir} exists and is not a directory",
        )
        at_least(self, "", 1, "log_every", "max_bad_steps")
        try:
            shard_size = parse_shard_size(self.export_max_shard_size)
        except ValueError as error:
            raise ConfigError(f"export_max_shard_size: {error}") from None
        require(shard_size > 0, "export_max_shard_size", f"must be more than 0 bytes, got {self.export_max_shard_size}")
        for section in ("mesh", "distributed", "data", "generation", "checkpoint", "plan", "sft", "rm", "dpo"):
            getattr(self, section).validate(section)
        self.ppo.validate("ppo")
        require(
            self.generation.min_new_tokens <= self.ppo.max_answer_seq_len,
            "generation.min_new_tokens",
            f"must not exceed ppo.max_answer_seq_len={self.ppo.max_answer_seq_len}, "
            f"got {self.generation.min_new_tokens}",
        )
