"""The run configuration's schema: typed dataclasses, each checking its own values.

Every check raises `ConfigError` with one line naming the dotted key (`data.sources[0].layout`),
before any work starts. Loading (YAML, presets, overrides) is in `jaxrlhf.config.loading`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Literal

from jaxrlhf.config.presets import PRESETS
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.data.sources import LAYOUT_NAMES
from jaxrlhf.data.split import STEPS

Step = Literal[STEPS]  # the steps, in the order they run
DataLayout = Literal[LAYOUT_NAMES]
Dtype = Literal["float32", "bfloat16"]
PREVIOUS_STAGE = ""  # model path meaning "the output of the earlier step of this run"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the offending key or file."""


@dataclass
class MeshConfig:
    """Device mesh axis sizes; their product is the device count."""

    data: int = 1  # replicated-parameter data parallelism
    fsdp: int = -1  # parameters, gradients and optimizer state sharded; -1 = all remaining devices
    tensor: int = 1  # tensor parallelism inside each layer

    def validate(self, key: str) -> None:
        sizes = dataclasses.asdict(self)
        for name, size in sizes.items():
            _require(size >= 1 or size == -1, f"{key}.{name}", f"must be a positive size or -1, got {size}")
        _require(list(sizes.values()).count(-1) <= 1, key, "at most one axis may be -1")


@dataclass
class DistributedConfig:
    """JAX multi-controller start-up; unset fields are detected from SLURM, TPU pods or Kubernetes."""

    initialize: Literal["auto", "always", "never"] = "auto"  # auto: only under a cluster launcher
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self, key: str) -> None:
        if self.num_processes is not None:
            _at_least(self, key, 1, "num_processes")
        if self.process_id is not None:
            _at_least(self, key, 0, "process_id")
            _require(self.num_processes is None or self.process_id < self.num_processes, f"{key}.process_id",
                     f"must be below num_processes={self.num_processes}, got {self.process_id}")


@dataclass
class ModelConfig:
    """Which weights to start from and the precision to run them in."""

    path: str = BUILTIN  # a Hugging Face model directory, or "builtin" for the tiny built-in model
    dtype: Dtype = "float32"  # compute dtype
    param_dtype: Dtype = "float32"  # storage dtype of the weights
    remat: Literal["none", "block"] = "none"  # "block": recompute each block in the backward pass

    def validate(self, key: str) -> None:
        _require(self.path in (BUILTIN, PREVIOUS_STAGE) or os.path.isdir(self.path), f"{key}.path",
                 f"model directory not found: {self.path}")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the named projections; the base weights stay frozen."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # adapters are scaled by alpha / rank
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))

    def validate(self, key: str) -> None:
        _at_least(self, key, 0, "rank")
        _require(self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        _require(self.rank == 0 or bool(self.target_modules), f"{key}.target_modules", "is empty but rank > 0")


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
        _at_least(self, key, 0, "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm")
        for name in ("b1", "b2", "min_lr_ratio"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")
        _require(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")


@dataclass
class DataSourceConfig:
    """One data set on disk (or the built-in task) and how its columns are read."""

    path: str = BUILTIN  # a local file or directory, or "builtin" for the generated task
    layout: DataLayout = "builtin"  # which columns hold prompt / chosen / rejected
    weight: float = 1.0  # times each record is used on average (0.5: a seeded half, 2: twice)

    def validate(self, key: str) -> None:
        _require(self.weight > 0, f"{key}.weight", f"must be > 0, got {self.weight}")
        _require((self.path == BUILTIN) == (self.layout == BUILTIN), key,
                 f"path {self.path!r} and layout {self.layout!r} disagree: 'builtin' goes with 'builtin'")
        _require(self.path == BUILTIN or os.path.exists(self.path), f"{key}.path",
                 f"data file not found: {self.path}")


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
        _require(bool(self.sources), f"{key}.sources", "is empty")
        for index, source in enumerate(self.sources):
            source.validate(f"{key}.sources[{index}]")
        for index, source in enumerate(self.eval_sources):
            source.validate(f"{key}.eval_sources[{index}]")
        shares = self.data_split.split(",")
        _require(len(shares) == 3 and all(_is_non_negative_number(share) for share in shares)
                 and sum(float(share) for share in shares) > 0, f"{key}.data_split",
                 f"must be three non-negative numbers like '2,4,4' with a positive sum, got {self.data_split!r}")
        _require(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        _at_least(self, key, 1, "builtin_size")


@dataclass
class SupervisedStepConfig:
    """What steps 1 and 2 share: the model, its optimizer and adapters, the batch and the loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    batch_size: int = 32  # sequences (SFT) or pairs (RM) per optimizer step, over all devices
    grad_accum_steps: int = 1  # micro-batches per optimizer step; must divide batch_size
    max_seq_len: int = 48
    max_steps: int = 400  # optimizer steps; when > 0 it wins over num_epochs
    num_epochs: int = 1  # used only when max_steps == 0
    eval_every: int = 100  # optimizer steps between evaluations; 0 = none during training
    eval_batches: int = 8

    def validate(self, key: str) -> None:
        self.model.validate(f"{key}.model")
        self.optimizer.validate(f"{key}.optimizer")
        self.lora.validate(f"{key}.lora")
        _at_least(self, key, 1, "batch_size", "grad_accum_steps", "num_epochs", "eval_batches")
        _at_least(self, key, 2, "max_seq_len")
        _at_least(self, key, 0, "max_steps", "eval_every")
        _require_master_weights(self.model, self.lora, f"{key}.model")
        _require(self.batch_size % self.grad_accum_steps == 0, f"{key}.grad_accum_steps",
                 f"{self.grad_accum_steps} does not divide batch_size={self.batch_size}")


@dataclass
class SFTConfig(SupervisedStepConfig):
    """Step 1: supervised fine-tuning on prompt + chosen response."""

    loss_on: Literal["response", "all"] = "response"  # which tokens the language-model loss covers
    packing: bool = False  # concatenate examples into full-length rows

    def validate(self, key: str) -> None:
        _require(self.model.path != PREVIOUS_STAGE, f"{key}.model.path",
                 "must be a model directory or 'builtin' (SFT has no earlier step to start from)")
        super().validate(key)


@dataclass
class RMConfig(SupervisedStepConfig):
    """Step 2: a reward model trained on (chosen, rejected) pairs."""

    # Model path "" = this run's SFT output (the built-in model when the run has no SFT step).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    max_steps: int = 300
    loss: Literal["final_token", "deepspeed_chat"] = "final_token"  # score at the last token / over the divergent span
    centering_coef: float = 0.0  # weight of a mean(reward^2) penalty that keeps rewards near 0

    def validate(self, key: str) -> None:
        super().validate(key)
        _at_least(self, key, 0, "centering_coef")


@dataclass
class GenerationConfig:
    """Sampling for PPO rollouts and evaluation."""

    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens are out
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    greedy: bool = False  # argmax decoding; ignores temperature, top_k and top_p
    tensor_parallel: int = 1  # tensor-parallel degree of the rollout copy of the actor
    attention: Literal["auto", "reference", "pallas"] = "auto"  # decode step: XLA, the Mosaic GPU kernel (bf16), or auto (the reference until a GPU benchmark shows the kernel faster)

    def validate(self, key: str) -> None:
        _at_least(self, key, 1, "tensor_parallel")
        _at_least(self, key, 0, "min_new_tokens", "top_k")

        _require(self.temperature > 0, f"{key}.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class PPOConfig:
    """Step 3: PPO of the actor (from SFT) against the reward model, with a critic (from RM)."""

    # Model paths "" mean this run's outputs: the actor (and the frozen reference) start from SFT,
    # the critic (and the frozen reward model) from RM.
    actor_model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    critic_model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    actor_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=1e-4))
    critic_optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=5e-4))
    actor_lora: LoRAConfig = field(default_factory=LoRAConfig)
    critic_lora: LoRAConfig = field(default_factory=LoRAConfig)
    preset: str = "stable"  # named values for the fields below (jaxrlhf/config/presets.py); these defaults are "stable"
    kl_coef: float = 0.1  # weight of the per-token KL penalty to the reference (SFT) policy
    kl_estimator: Literal["k1", "k3"] = "k1"  # log-ratio, or the unbiased non-negative k3
    adaptive_kl: bool = False  # steer kl_coef towards kl_target (Ziegler et al.)
    kl_target: float = 6.0
    kl_horizon: int = 10000
    clip_reward_value: float = 5.0  # reward-model scores are clipped to +-this
    cliprange: float = 0.2  # policy-ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout values
    gamma: float = 1.0
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True
    score_position: Literal["last_token", "after_last"] = "last_token"  # which token receives the score
    dual_clip: float | None = 3.0  # dual-clip PPO bound on negative advantages (> 1); None = off
    entropy_coef: float = 0.0
    ppo_epochs: int = 2  # passes over each rollout batch
    num_minibatches: int = 4  # optimizer steps per pass; must divide prompts_per_iteration
    grad_accum_steps: int = 1  # micro-batches per minibatch
    prompts_per_iteration: int = 64  # rollouts generated per iteration, over all devices
    num_iterations: int = 60
    max_prompt_seq_len: int = 24
    max_answer_seq_len: int = 24
    long_prompt: Literal["drop", "truncate"] = "drop"  # prompts longer than max_prompt_seq_len
    short_answer: Literal["drop", "penalize"] = "drop"  # answers of one token or less (DeepSpeed-Chat drops them)
    short_answer_penalty: float = -1.0  # the reward given to a penalized answer
    unsup_coef: float = 0.0  # weight of the pretraining (PTX) loss; 0 = none
    ema_decay: float = 0.9  # exponential moving average of the actor; 0 = off
    eval_prompts: int = 256

    def validate(self, key: str) -> None:
        _require(self.preset in PRESETS, f"{key}.preset",
                 f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        for section in ("actor_model", "critic_model"):
            getattr(self, section).validate(f"{key}.{section}")
        for section in ("actor_optimizer", "critic_optimizer"):
            getattr(self, section).validate(f"{key}.{section}")
        for section in ("actor_lora", "critic_lora"):
            getattr(self, section).validate(f"{key}.{section}")
        _at_least(self, key, 0, "kl_coef", "entropy_coef", "unsup_coef", "num_iterations")
        _at_least(self, key, 1, "eval_prompts")
        _require_master_weights(self.actor_model, self.actor_lora, f"{key}.actor_model")
        _require_master_weights(self.critic_model, self.critic_lora, f"{key}.critic_model")
        _at_least(self, key, 1, "kl_horizon", "ppo_epochs", "num_minibatches", "grad_accum_steps",
                  "prompts_per_iteration", "max_prompt_seq_len", "max_answer_seq_len")
        for name in ("kl_target", "clip_reward_value", "cliprange", "cliprange_value"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"must be > 0, got {value}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")
        _require(self.dual_clip is None or self.dual_clip > 1, f"{key}.dual_clip",
                 f"must be > 1 or null, got {self.dual_clip}")
        _require(0 <= self.ema_decay < 1, f"{key}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _require(self.prompts_per_iteration % self.num_minibatches == 0, f"{key}.num_minibatches",
                 f"{self.num_minibatches} does not divide prompts_per_iteration={self.prompts_per_iteration}")


@dataclass
class CheckpointConfig:
    """Periodic checkpoints under <output_dir>/<step>/checkpoints for exact resume."""

    every_steps: int = 100
    keep: int = 2  # the most recent checkpoints kept; older ones are deleted

    def validate(self, key: str) -> None:
        _at_least(self, key, 1, "every_steps", "keep")


@dataclass
class RunConfig:
    """One run of the pipeline: which steps, where outputs go, and every step's settings."""

    steps: list[Step] = field(default_factory=lambda: list(STEPS))
    output_dir: str = "runs/default"
    seed: int = 0
    resume: Literal["auto", "always", "never"] = "auto"  # auto: from the latest checkpoint if there is one
    log_every: int = 10  # optimizer steps between metric lines
    tensorboard: bool = True
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def validate(self) -> None:
        _require(bool(self.steps), "steps", "is empty")
        _require(len(set(self.steps)) == len(self.steps)
                 and self.steps == sorted(self.steps, key=STEPS.index), "steps",
                 f"must be distinct and in pipeline order {', '.join(STEPS)}, got {', '.join(self.steps)}")
        _require(bool(self.output_dir), "output_dir", "is empty")
        _at_least(self, "", 1, "log_every")
        for section in ("mesh", "distributed", "data", "generation", "checkpoint", "sft", "rm"):
            getattr(self, section).validate(section)
        self.ppo.validate("ppo")
        _require(self.generation.min_new_tokens <= self.ppo.max_answer_seq_len, "generation.min_new_tokens",
                 f"must not exceed ppo.max_answer_seq_len={self.ppo.max_answer_seq_len}, "
                 f"got {self.generation.min_new_tokens}")


# ---------------------------------------------------------------------------------------------
# Validation helpers.

def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {problem}")


def _at_least(section: object, key: str, minimum: float, *names: str) -> None:
    """Each named field of `section` (found at dotted `key`) must be >= minimum."""
    for name in names:
        value = getattr(section, name)
        _require(value >= minimum, f"{key}.{name}" if key else name, f"must be >= {minimum}, got {value}")


def _require_master_weights(model: ModelConfig, lora: LoRAConfig, key: str) -> None:
    """Trained weights stay float32 (Adam updates vanish in bfloat16); a bfloat16 base is fine
    only when LoRA freezes it. Compute in bfloat16 with dtype=bfloat16."""
    _require(model.param_dtype == "float32" or lora.rank > 0, f"{key}.param_dtype",
             f"must be float32 for full fine-tuning (master weights), got {model.param_dtype}; "
             "use dtype=bfloat16 for bfloat16 compute, or LoRA to keep a bfloat16 base frozen")


def _is_non_negative_number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False
