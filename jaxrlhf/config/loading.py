"""Loading the run configuration: a YAML file and `key=value` overrides over the typed schema.

    python -m jaxrlhf.train [CONFIG.yaml] [sft.optimizer.learning_rate=1e-4 steps=[sft] ...]

Precedence, lowest first: the schema's defaults < the chosen PPO preset < the YAML file < the
command line, so a value the user wrote always wins over the preset. An unknown key, a wrong
type, a value outside its choices or range, or a missing file raises `ConfigError` with one
line naming the dotted key; the entry point prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxrlhf.config.checks import CHECK_DATA_FILES, ConfigError
from jaxrlhf.config.presets import PRESETS
from jaxrlhf.config.schema import RunConfig


def load_config(argv: Sequence[str], check_data_files: bool = True) -> RunConfig:
    """The validated run config from `[CONFIG.yaml] [dotted.key=value ...]`; raises ConfigError.
    `check_data_files=False` (the planner) accepts data paths that do not exist here."""
    file_layer, overrides = _read_arguments(argv)
    chosen_preset = _merge_layers([file_layer], overrides).ppo.preset  # phase 1: which preset?
    preset_layer = (
        [(f"ppo preset {chosen_preset!r}", OmegaConf.create({"ppo": PRESETS[chosen_preset]}))]
        if chosen_preset in PRESETS
        else []
    )  # an unknown name is reported by validate
    config = _merge_layers(preset_layer + [file_layer], overrides)  # phase 2
    checking = CHECK_DATA_FILES.set(check_data_files)
    try:
        config.validate()
    finally:
        CHECK_DATA_FILES.reset(checking)
    return config


def main_config_or_exit(argv: Sequence[str], check_data_files: bool = True) -> RunConfig:
    """load_config for the entry point: a bad config prints `error: <message>` and exits with code 2."""
    try:
        return load_config(argv, check_data_files)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def save_resolved_config(config: RunConfig, output_dir: str | os.PathLike) -> Path:
    """Writes the complete config to <output_dir>/config.yaml (atomically); call it from process 0 only.

    Loading that file back gives the same config: every field is written, so no preset applies on top.
    """
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".yaml.tmp")
    temporary.write_text(config_yaml(config))
    os.replace(temporary, path)
    return path


def config_yaml(section: object) -> str:
    """Any config dataclass (RunConfig or one of its sections) as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(section))


# The settings that change what a step computes (so a checkpoint made under others must not be
# continued with these), and the keys inside them that do not.
RESULT_SECTIONS = {
    "sft": ("seed", "data", "sft"),
    "rm": ("seed", "data", "rm"),
    "dpo": ("seed", "data", "dpo"),
    "ppo": ("seed", "data", "generation", "ppo"),
}
# How a step runs, not what it computes: what is recomputed, which attention kernel, how many
# micro-batches an optimizer step is split into (the memory planner may raise it on another device).
HOW_NOT_WHAT = (".remat", ".attention", ".grad_accum_steps")
NO_EFFECT_ON_RESULTS = (
    "data.cache_dir",
    "sft.eval_every",
    "sft.eval_batches",
    "rm.eval_every",
    "rm.eval_batches",
    "dpo.eval_every",
    "dpo.eval_batches",
    "ppo.eval_prompts",
)


def step_settings(config_values: Mapping, step: str) -> dict[str, object]:
    """The dotted keys and values of `config_values` (a RunConfig as a mapping) that change the
    result of `step`."""
    flat = {}

    def walk(value, key):
        if isinstance(value, Mapping):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif key not in NO_EFFECT_ON_RESULTS and not key.endswith(HOW_NOT_WHAT):
            flat[key] = value

    for section in RESULT_SECTIONS[step]:
        walk({section: config_values.get(section)}, "")
    return flat


def changed_settings(saved_yaml: str, config: RunConfig, step: str) -> list[str]:
    """`key: old -> new` for each result-affecting setting of `step` that differs between a saved
    config (the YAML written when the step started) and `config`."""
    old = step_settings(yaml.safe_load(saved_yaml) or {}, step)
    new = step_settings(yaml.safe_load(config_yaml(config)), step)
    # a key the saved config predates had its default then (a setting added by a newer version)
    defaults = step_settings(yaml.safe_load(config_yaml(RunConfig())), step)
    old = {**{key: defaults[key] for key in new.keys() - old.keys() if key in defaults}, **old}
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


# ---------------------------------------------------------------------------------------------
# Merging and error reporting.

Layer = tuple[str, DictConfig]  # (where the values came from, the values)


def _read_arguments(argv: Sequence[str]) -> tuple[Layer, list[str]]:
    """Splits argv into the YAML file's values (empty without a file) and the key=value overrides."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        path, overrides = argv[0], list(argv[1:])
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            values = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException) as error:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
        if not isinstance(values, DictConfig):
            raise ConfigError(f"{path}: must hold a mapping of settings, not a {type(values).__name__}")
        file_layer = (path, values)
    else:
        file_layer, overrides = ("no config file", OmegaConf.create({})), list(argv)
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ConfigError(
                f"command-line argument {override!r} is not a dotted.key=value override"
                " (a config file must come first and end in .yaml or .yml)"
            )
    return file_layer, overrides


def _merge_layers(layers: list[Layer], overrides: list[str]) -> RunConfig:
    """The dataclass defaults with each layer and then each override merged on top, in order."""
    merged = OmegaConf.structured(RunConfig)
    for source, values in layers:
        _check_structure(RunConfig, OmegaConf.to_container(values), "", source)
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as error:
            raise _config_error(error, source) from None
    for override in overrides:
        source = f"command line {override!r}"
        try:
            _check_structure(RunConfig, OmegaConf.to_container(OmegaConf.from_dotlist([override])), "", source)
            merged.merge_with_dotlist([override])
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: value is not valid YAML: {_yaml_problem(error)}") from None
        except OmegaConfBaseException as error:
            raise _config_error(error, source) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _config_error(error, "config") from None


def _check_structure(schema: object, values: object, key: str, source: str) -> None:
    """Reports, with the full dotted key, the shape errors OmegaConf would name poorly.

    A non-mapping given for a section (`sft: [1]`) and an error inside an item of a list of
    dataclasses (`data.sources[1].layout`) come out of OmegaConf without their path.
    """
    if not (dataclasses.is_dataclass(schema) and isinstance(values, Mapping)):
        return
    field_types = typing.get_type_hints(schema)
    for name, value in values.items():
        if name not in field_types:
            continue  # an unknown key: the merge itself reports it with its full path
        field_type, field_key = field_types[name], f"{key}.{name}" if key else str(name)
        item_type = typing.get_args(field_type)[0] if typing.get_origin(field_type) is list else None
        if dataclasses.is_dataclass(field_type) and not isinstance(value, Mapping):
            raise ConfigError(f"{field_key}: must be a mapping of settings, got {value!r} (from {source})")
        if dataclasses.is_dataclass(item_type) and isinstance(value, list):
            for index, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ConfigError(
                        f"{field_key}[{index}]: must be a mapping of settings, got {item!r} (from {source})"
                    )
                try:
                    OmegaConf.merge(OmegaConf.structured(item_type), item)
                except OmegaConfBaseException as error:
                    raise _config_error(error, source, prefix=f"{field_key}[{index}].") from None
        _check_structure(field_type, value, field_key, source)


def _config_error(error: OmegaConfBaseException, source: str, prefix: str = "") -> ConfigError:
    """A one-line ConfigError from an OmegaConf error: full key, OmegaConf's reason, and the source."""
    key = prefix + (getattr(error, "full_key", None) or "")
    return ConfigError(f"{key or '<top level>'}: {_first_line(error)} (from {source})")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]  # OmegaConf's further lines repeat the key and class


def _yaml_problem(error: Exception) -> str:
    """What a YAML parser error found and where, on one line."""
    mark = getattr(error, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return (getattr(error, "problem", None) or _first_line(error)) + where
