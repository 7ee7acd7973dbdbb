"""The config of each step: SFT and the reward model (on one shared base), generation, PPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxrlhf.config.checks import at_least, require
from jaxrlhf.config.presets import PRESETS
from jaxrlhf.config.sections import PREVIOUS_STAGE, LoRAConfig, ModelConfig, OptimizerConfig, require_master_weights


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
        at_least(self, key, 1, "batch_size", "grad_accum_steps", "num_epochs", "eval_batches")
        at_least(self, key, 2, "max_seq_len")
        at_least(self, key, 0, "max_steps", "eval_every")
        require_master_weights(self.model, self.lora, f"{key}.model")
        require(
            self.batch_size % self.grad_accum_steps == 0,
            f"{key}.grad_accum_steps",
            f"{self.grad_accum_steps} does not divide batch_size={self.batch_size}",
        )


@dataclass
class SFTConfig(SupervisedStepConfig):
    """Step 1: supervised fine-tuning on prompt + chosen response."""

    loss_on: Literal["response", "all"] = "response"  # which tokens the language-model loss covers
    packing: bool = False  # concatenate examples into full-length rows

    def validate(self, key: str) -> None:
        require(
            self.model.path != PREVIOUS_STAGE,
            f"{key}.model.path",
            "must be a model directory or 'builtin' (SFT has no earlier step to start from)",
        )
        super().validate(key)


@dataclass
class RMConfig(SupervisedStepConfig):
    """Step 2: a reward model trained on (chosen, rejected) pairs."""

    # Model path "" = the SFT output in output_dir (of this run, or an earlier one when steps has no sft).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    max_steps: int = 300
    loss: Literal["final_token", "deepspeed_chat"] = "final_token"  # score at the last token / over the divergent span
    centering_coef: float = 0.0  # weight of a mean(reward^2) penalty that keeps rewards near 0

    def validate(self, key: str) -> None:
        super().validate(key)
        at_least(self, key, 0, "centering_coef")


@dataclass
class DPOConfig(SupervisedStepConfig):
    """DPO, DeepSpeed-Chat's alternative to steps 2 and 3: the SFT policy trained directly on the
    reward model's preference pairs against its frozen self (the reference)."""

    # Model path "" = the SFT output in output_dir (of this run, or an earlier one when steps has no sft).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    # The defaults suit the built-in task; for billion-parameter models DPO's usual beta 0.1 and a
    # learning rate near 5e-7 are the place to start.
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(learning_rate=3e-5))
    max_steps: int = 300
    beta: float = 0.5  # strength of the KL tie to the reference (larger: closer to it)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's log-sigmoid, or IPO's squared margin
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped labels

    def validate(self, key: str) -> None:
        super().validate(key)
        require(self.beta > 0, f"{key}.beta", f"must be > 0, got {self.beta}")
        require(
            0 <= self.label_smoothing < 0.5,
            f"{key}.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        require(
            self.loss == "sigmoid" or self.label_smoothing == 0,
            f"{key}.label_smoothing",
            "applies to loss=sigmoid only (IPO has no label smoothing)",
        )


@dataclass
class GenerationConfig:
    """Sampling for PPO rollouts and evaluation."""

    min_new_tokens: int = 0  # end-of-sequence is suppressed until this many tokens are out
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    greedy: bool = False  # argmax decoding; ignores temperature, top_k and top_p
    tensor_parallel: int = 1  # tensor-parallel degree of the rollout copy of the actor
    # Decode-step attention: XLA, the Mosaic GPU kernel (bf16), or auto (the reference until a GPU
    # benchmark shows the kernel faster).
    attention: Literal["auto", "reference", "pallas"] = "auto"
    # Decoding engine: "static" decodes every row until the longest answer of the batch ends;
    # "refill" decodes `slots` rows at a time and refills a finished row's slot from the queue of
    # rows (continuous batching, jaxrlhf/generation/refill.py; the same tokens). "auto": refill where
    # the rows' KV cache does not fit and the memory planner gives fewer slots than rows, static
    # otherwise. On a compute-bound device (CPU, large models) refill with slots < rows also pays
    # on long-tailed answers: docs/benchmarks.md.
    engine: Literal["auto", "static", "refill"] = "auto"
    slots: int = 0  # refill: rows decoded at once; 0: the memory planner's (one per row where all fit)
    refill_chunk: int = 0  # refill: most rows admitted per refill; 0: an eighth of the slots

    def validate(self, key: str) -> None:
        at_least(self, key, 1, "tensor_parallel")
        at_least(self, key, 0, "min_new_tokens", "top_k", "slots", "refill_chunk")
        if self.slots and self.refill_chunk:
            require(
                self.refill_chunk <= self.slots,
                f"{key}.refill_chunk",
                f"must be <= {key}.slots ({self.slots}), got {self.refill_chunk}",
            )

        require(self.temperature > 0, f"{key}.temperature", f"must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"{key}.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class PPOConfig:
    """Step 3: the actor (from SFT) trained against the reward (model and/or functions) by PPO with a
    critic (from RM), or by a critic-free algorithm over n samples per prompt (`algorithm`)."""

    # ppo: clipped PPO with a critic and GAE (InstructGPT, DeepSpeed-Chat); grpo: group-normalised
    # advantages, KL as a loss term; rloo: leave-one-out baseline; reinforce_pp: REINFORCE++
    # (jaxrlhf/rl/algorithms.py). The critic-free ones load, train and export no critic.
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    samples_per_prompt: int = 1  # n answers per prompt (each its own key stream; the prompt prefilled once)
    # What scores an answer: "model" (the reward model) and/or Python functions "module.path:function"
    # (jaxrlhf/rl/rewards.py), summed with `reward_weights` (empty: every weight 1).
    reward: list[str] = field(default_factory=lambda: ["model"])
    reward_weights: list[float] = field(default_factory=list)
    scale_rewards: Literal["group", "batch", "none"] = (
        "group"  # grpo: divide by the group's std, the batch's, or not (Dr. GRPO)
    )
    # How the token losses become one number: over all tokens (DAPO), per answer then over answers
    # (GRPO), or over rows x max_answer_seq_len (Dr. GRPO). PPO's is token_mean.
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    cliprange_high: float | None = None  # upper ratio clip (DAPO's clip-higher, e.g. 0.28); None = cliprange
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"  # the KL loss term's estimator (grpo)
    group_baseline: bool = False  # reinforce_pp: subtract each prompt's mean score first (n > 1)
    drop_uniform_groups: bool = False  # DAPO dynamic sampling: groups whose n rewards are all equal train nothing
    oversample_prompts: int = (
        0  # ... and this many extra prompts per iteration refill the batch with informative groups
    )
    overlong_buffer: int = 0  # DAPO soft overlong penalty: the last this-many answer tokens before the limit
    overlong_penalty: float = 1.0  # ... cost up to this much, growing linearly, at the limit
    # Rollout correction for the generation copy (bf16) vs the training forward: truncated importance
    # sampling min(ratio, cap) per token, or masking tokens whose ratio leaves [1/cap, cap].
    rollout_correction: Literal["none", "tis", "mask"] = "none"
    rollout_correction_cap: float = 2.0
    eval_every: int = 0  # evaluate on the held-out prompts every k iterations (ppo/eval_curve.jsonl); 0 = ends only

    # Model paths "" mean this run's outputs: the actor (and the frozen reference) start from SFT,
    # the critic from RM; the frozen reward model, "" = the critic's starting checkpoint (as in
    # DeepSpeed-Chat, where both come from the step-2 model).
    actor_model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    critic_model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
    reward_model: ModelConfig = field(default_factory=lambda: ModelConfig(path=PREVIOUS_STAGE))
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
        require(self.preset in PRESETS, f"{key}.preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        for section in ("actor_model", "critic_model", "reward_model"):
            getattr(self, section).validate(f"{key}.{section}")
        for section in ("actor_optimizer", "critic_optimizer"):
            getattr(self, section).validate(f"{key}.{section}")
        for section in ("actor_lora", "critic_lora"):
            getattr(self, section).validate(f"{key}.{section}")
        at_least(self, key, 0, "kl_coef", "entropy_coef", "unsup_coef", "num_iterations")
        at_least(self, key, 1, "eval_prompts")
        require_master_weights(self.actor_model, self.actor_lora, f"{key}.actor_model")
        require_master_weights(self.critic_model, self.critic_lora, f"{key}.critic_model")
        at_least(
            self,
            key,
            1,
            "kl_horizon",
            "ppo_epochs",
            "num_minibatches",
            "grad_accum_steps",
            "prompts_per_iteration",
            "max_prompt_seq_len",
            "max_answer_seq_len",
        )
        for name in ("kl_target", "clip_reward_value", "cliprange", "cliprange_value"):
            value = getattr(self, name)
            require(value > 0, f"{key}.{name}", f"must be > 0, got {value}")
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{key}.{name}", f"must be in [0, 1], got {value}")
        require(
            self.dual_clip is None or self.dual_clip > 1,
            f"{key}.dual_clip",
            f"must be > 1 or null, got {self.dual_clip}",
        )
        require(0 <= self.ema_decay < 1, f"{key}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        rows = self.prompts_per_iteration * self.samples_per_prompt
        require(
            rows % self.num_minibatches == 0,
            f"{key}.num_minibatches",
            f"{self.num_minibatches} does not divide the {rows} answers of an iteration "
            f"(prompts_per_iteration x samples_per_prompt)",
        )
        self.validate_algorithm(key)
        require(
            self.short_answer == "penalize" or self.max_answer_seq_len >= 2,
            f"{key}.max_answer_seq_len",
            f"is {self.max_answer_seq_len}, but answers of one token or less are dropped (short_answer=drop): "
            "every answer would be dropped",
        )

    def validate_algorithm(self, key: str) -> None:
        """The critic-free algorithms' settings: enough samples per prompt, a reward, sane ranges."""
        from jaxrlhf.rl.algorithms import ALGORITHMS
        from jaxrlhf.rl.rewards import RewardMix

        algorithm = ALGORITHMS[self.algorithm]
        at_least(self, key, 1, "samples_per_prompt")
        at_least(self, key, 0, "overlong_buffer", "eval_every", "oversample_prompts")
        require(
            self.drop_uniform_groups or not self.oversample_prompts,
            f"{key}.oversample_prompts",
            "refills the groups drop_uniform_groups drops: set ppo.drop_uniform_groups=true",
        )
        require(
            self.samples_per_prompt >= algorithm.min_samples_per_prompt,
            f"{key}.samples_per_prompt",
            f"{self.algorithm} compares the answers to one prompt: needs at least "
            f"{algorithm.min_samples_per_prompt}, got {self.samples_per_prompt}",
        )
        require(
            not (self.group_baseline or self.drop_uniform_groups) or self.samples_per_prompt >= 2,
            f"{key}.samples_per_prompt",
            "group_baseline and drop_uniform_groups need groups: at least 2 samples per prompt",
        )
        require(
            self.overlong_buffer < self.max_answer_seq_len,
            f"{key}.overlong_buffer",
            f"must be below max_answer_seq_len={self.max_answer_seq_len}, got {self.overlong_buffer}",
        )
        require(
            self.cliprange_high is None or self.cliprange_high > 0,
            f"{key}.cliprange_high",
            f"must be > 0 or null, got {self.cliprange_high}",
        )
        require(
            self.rollout_correction_cap >= 1,
            f"{key}.rollout_correction_cap",
            f"must be >= 1, got {self.rollout_correction_cap}",
        )
        RewardMix.from_config(self.reward, self.reward_weights, f"{key}.reward")  # imports each function
