"""The run configuration: the typed schema (`schema`, built from `sections` and `steps`), the PPO
presets (`presets`), loading from YAML and the command line (`loading`)."""

from jaxrlhf.config.checks import ConfigError
from jaxrlhf.config.loading import (
    changed_settings,
    config_yaml,
    load_config,
    main_config_or_exit,
    save_resolved_config,
)
from jaxrlhf.config.presets import PRESETS
from jaxrlhf.config.schema import RunConfig
from jaxrlhf.config.sections import (
    PREVIOUS_STAGE,
    CheckpointConfig,
    DataConfig,
    DataSourceConfig,
    DistributedConfig,
    LoRAConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    PlanConfig,
)
from jaxrlhf.config.steps import DPOConfig, GenerationConfig, PPOConfig, RMConfig, SFTConfig, SupervisedStepConfig

__all__ = [
    "PRESETS",
    "PREVIOUS_STAGE",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSourceConfig",
    "DistributedConfig",
    "GenerationConfig",
    "LoRAConfig",
    "DPOConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PlanConfig",
    "PPOConfig",
    "RMConfig",
    "RunConfig",
    "SFTConfig",
    "SupervisedStepConfig",
    "changed_settings",
    "config_yaml",
    "load_config",
    "main_config_or_exit",
    "save_resolved_config",
]
