"""The run configuration: the typed schema (`schema`), the PPO presets (`presets`), loading (`loading`)."""

from jaxrlhf.config.loading import (
    config_fingerprint,
    config_yaml,
    load_config,
    main_config_or_exit,
    save_resolved_config,
)
from jaxrlhf.config.presets import PRESETS
from jaxrlhf.config.schema import (
    PREVIOUS_STAGE,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DataSourceConfig,
    DistributedConfig,
    GenerationConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PPOConfig,
    RMConfig,
    RunConfig,
    SFTConfig,
    SupervisedStepConfig,
)

__all__ = [
    "PRESETS", "PREVIOUS_STAGE", "CheckpointConfig", "ConfigError", "DataConfig", "DataSourceConfig",
    "DistributedConfig", "GenerationConfig", "LoRAConfig", "MeshConfig", "ModelConfig", "OptimizerConfig", "PPOConfig",
    "RMConfig", "RunConfig", "SFTConfig", "SupervisedStepConfig", "config_fingerprint", "config_yaml", "load_config",
    "main_config_or_exit", "save_resolved_config",
]
