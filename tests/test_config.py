"""Config loading: defaults, precedence (defaults < preset < file < command line), errors, round trip."""

import dataclasses

import pytest

from jaxrlhf.config import (
    PRESETS,
    ConfigError,
    DataSourceConfig,
    ModelConfig,
    PPOConfig,
    RunConfig,
    changed_settings,
    load_config,
    main_config_or_exit,
    save_resolved_config,
)

REAL_PRESETS = PRESETS
TEST_PRESETS = {
    "stable": {"kl_coef": 0.05, "cliprange": 0.3, "lam": 0.9},
    "deepspeed_chat": {"kl_coef": 0.1, "score_position": "after_last", "whiten_advantages": False},
}


@pytest.fixture(autouse=True)
def fake_presets(monkeypatch):
    """Presets whose values differ from the schema's defaults, so that precedence shows."""
    monkeypatch.setattr("jaxrlhf.config.loading.PRESETS", TEST_PRESETS)
    monkeypatch.setattr("jaxrlhf.config.steps.PRESETS", TEST_PRESETS)


def test_the_schema_defaults_are_the_stable_preset():
    defaults = dataclasses.asdict(PPOConfig())
    assert {name: defaults[name] for name in REAL_PRESETS["stable"]} == REAL_PRESETS["stable"]
    # the presets' own values (and that each sets the same fields): test_ppo_math.py, against DeepSpeed-Chat's


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_no_arguments_give_the_tiny_builtin_run_equal_to_configs_tiny_yaml():
    config = load_config([])
    assert isinstance(config, RunConfig) and isinstance(config.sft.model, ModelConfig)
    assert config.steps == ["sft", "rm", "ppo"]
    assert config.sft.model.path == "builtin"
    assert config.data.sources == [DataSourceConfig(path="builtin", layout="builtin", weight=1.0)]
    assert config.rm.model.path == "" and config.ppo.actor_model.path == ""
    assert config.data.split_fractions == pytest.approx((0.2, 0.4, 0.4))  # "2,4,4" / 10
    assert load_config(["configs/tiny.yaml"]) == config


def test_precedence_defaults_then_preset_then_file_then_command_line(tmp_path):
    path = write(tmp_path, "run.yaml", "ppo:\n  kl_coef: 0.2\n  gamma: 0.9\nsft:\n  batch_size: 8\n")
    config = load_config([path, "ppo.cliprange=0.25", "sft.optimizer.learning_rate=1e-4"])
    assert config.ppo.kl_coef == 0.2  # file beats preset (0.05)
    assert config.ppo.cliprange == 0.25  # command line beats preset (0.3)
    assert config.ppo.lam == 0.9  # preset beats the schema default (0.95)
    assert config.ppo.gamma == 0.9 and config.sft.batch_size == 8  # file beats defaults
    assert config.sft.optimizer.learning_rate == 1e-4
    assert config.ppo.cliprange_value == 0.2  # untouched default


def test_preset_named_on_command_line_replaces_the_default_preset(tmp_path):
    path = write(tmp_path, "run.yaml", "ppo: {preset: stable, cliprange: 0.15}\n")
    config = load_config([path, "ppo.preset=deepspeed_chat"])
    assert config.ppo.score_position == "after_last" and config.ppo.kl_coef == 0.1
    assert config.ppo.whiten_advantages is False and config.ppo.lam == 0.95  # only the chosen preset applies
    assert config.ppo.cliprange == 0.15


def test_list_and_nested_overrides(tmp_path):
    data_file = write(tmp_path, "pairs.jsonl", "{}\n")
    config = load_config(
        [
            "steps=[sft]",
            f"data.sources=[{{path: {data_file}, layout: rm-static}}, {{path: builtin}}]",
            "data.sources[1].weight=3",
            "ppo.dual_clip=3.0",
            "distributed.num_processes=2",
        ]
    )
    assert config.steps == ["sft"]
    assert config.data.sources == [
        DataSourceConfig(data_file, "rm-static", 1.0),
        DataSourceConfig("builtin", "builtin", 3.0),
    ]
    assert config.ppo.dual_clip == 3.0 and config.distributed.num_processes == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["steps=[sft,foo]"], r"^steps\[1\]: .*'foo'.*\['sft', 'rm', 'dpo', 'ppo'\]"),
        (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], r"^dpo\.label_smoothing: applies to loss=sigmoid only"),
        (["steps=[dpo,sft]"], r"^steps: must be distinct and in pipeline order sft, rm, dpo, ppo"),
        (["steps=[rm,sft]"], r"^steps: must be distinct and in pipeline order"),
        (["sft.optimizer.learning_rate=-1e-3"], r"^sft\.optimizer\.learning_rate: must be > 0"),
        (["ppo.preset=bar"], r"^ppo\.preset: 'bar' is not one of stable, deepspeed_chat$"),
        (["data.sources=[{path: builtin, layout: nope}]"], r"^data\.sources\[0\]\.layout: .*'nope'.*'rm-static'"),
        (["data.sources[0].layout=shp"], r"^data\.sources\[0\]: path 'builtin' and layout 'shp' disagree"),
        (
            ["data.sources=[{path: /no/such/file.jsonl, layout: shp}]"],
            r"^data\.sources\[0\]\.path: data file not found: /no/such/file\.jsonl",
        ),
        (["sft.lerning_rate=1"], r"^sft\.lerning_rate: Key 'lerning_rate' not in 'SFTConfig'"),
        (["sft.batch_size=abc"], r"^sft\.batch_size: .*'abc'.*Integer"),
        (["sft.model=builtin"], r"^sft\.model: must be a mapping of settings"),
        (["sft.model.dtype=float16"], r"^sft\.model\.dtype: .*\['float32', 'bfloat16'\]"),
        (["sft.model.path="], r"^sft\.model\.path: "),
        (["rm.model.path=/no/such/model"], r"^rm\.model\.path: model directory not found"),
        (["data.data_split=2,4"], r"^data\.data_split: must be three non-negative numbers"),
        (["mesh.data=-1"], r"^mesh: at most one axis may be -1"),
        (["sft.grad_accum_steps=5"], r"^sft\.grad_accum_steps: 5 does not divide batch_size=32"),
        (["ppo.num_minibatches=3"], r"^ppo\.num_minibatches: 3 does not divide the 64 answers of an iteration"),
        (
            ["ppo.algorithm=grpo"],
            r"^ppo\.samples_per_prompt: grpo compares the answers to one prompt: needs at least 2",
        ),
        (["ppo.reward=[model,no_such_module:fn]"], r"^ppo\.reward\[1\]: cannot import module 'no_such_module'"),
        (
            ["ppo.reward=[jaxrlhf.data.builtin:nothing]"],
            r"^ppo\.reward\[0\]: module 'jaxrlhf\.data\.builtin' has no attribute",
        ),
        (["ppo.reward=[model]", "ppo.reward_weights=[1,2]"], r"^ppo\.reward_weights: 2 weights for 1 sources"),
        (["ppo.oversample_prompts=8"], r"^ppo\.oversample_prompts: refills the groups drop_uniform_groups drops"),
        (["ppo.algorithm=sarsa"], r"^ppo\.algorithm"),
        (["generation.top_p=0"], r"^generation\.top_p: must be in \(0, 1\]"),
        (["steps=[sft"], r"^command line 'steps=\[sft': value is not valid YAML"),
        (["sft.batch_size"], r"is not a dotted\.key=value override"),
        (["missing.yaml"], r"^config file not found: missing\.yaml$"),
    ],
)
def test_bad_configs_raise_one_line_errors_naming_the_key(argv, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(argv)
    assert "\n" not in str(error.value)


def test_errors_inside_a_yaml_file_name_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "data:\n  sources:\n    - {path: builtin}\n    - {path: x, lay: shp}\n")
    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.lay: .*Did you mean: 'layout'.*bad\.yaml"):
        load_config([path])
    path = write(tmp_path, "broken.yaml", "sft: {batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config([path])


def test_entry_point_prints_error_and_exits_with_code_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_config_or_exit(["ppo.preset=bar"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: ppo.preset: 'bar' is not one of stable, deepspeed_chat\n"


def test_saved_config_loads_back_identical_and_fingerprint_tracks_changes(tmp_path):
    config = load_config(["ppo.preset=deepspeed_chat", "ppo.kl_coef=0.02", "output_dir=" + str(tmp_path)])
    path = save_resolved_config(config, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config([str(path)]) == config  # no preset re-applied over the written values
    changed = dataclasses.replace(config, sft=dataclasses.replace(config.sft, max_steps=7, eval_every=3))
    assert changed_settings(path.read_text(), changed, "sft") == ["sft.max_steps: 400 -> 7"]  # eval_every: no effect
    assert changed_settings(path.read_text(), changed, "rm") == []
    # a config saved by an older version lacks later keys: their defaults are no change, other values are
    older = "\n".join(line for line in path.read_text().splitlines() if "samples_per_prompt" not in line)
    assert changed_settings(older, config, "ppo") == []
    more = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, samples_per_prompt=2))
    assert changed_settings(older, more, "ppo") == ["ppo.samples_per_prompt: 1 -> 2"]
