"""Nothing silent: each bad or faulty input ends in one clear line and exit code 2 (3 when training
diverges), early, and nothing written before stays wrong. One fresh run or call per case."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from hf_fixtures import save_tiny_model, train_tiny_tokenizer
from pipeline_helpers import train

from jaxrlhf.checkpoint import SIGKILL_AFTER_CHECKPOINT


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def no_nan_json(path: pathlib.Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
        json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_a_diverging_run_stops_with_exit_3_and_writes_no_nan(tmp_path, cache):
    import orbax.checkpoint as ocp

    result = train(
        tmp_path,
        cache,
        "steps=[sft]",
        "sft.optimizer.learning_rate=1e10",
        "sft.max_steps=60",
        "checkpoint.every_steps=5",
        "log_every=5",
    )
    assert result.returncode == 3
    line = one_error_line(result)
    assert "in a row had a non-finite loss or gradient" in line and "the last good checkpoint is step" in line
    for path in tmp_path.rglob("*.json*"):
        no_nan_json(path)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing exported
    checkpoints = [p for p in (tmp_path / "sft" / "checkpoints").iterdir() if p.name.isdigit()]
    assert checkpoints
    for checkpoint in checkpoints:
        arrays = ocp.StandardCheckpointer().restore(checkpoint / "state")
        for leaf in [x for x in _leaves(arrays) if np.issubdtype(np.asarray(x).dtype, np.floating)]:
            assert np.isfinite(leaf).all(), checkpoint


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, (list, tuple)):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def test_a_sequence_longer_than_a_learned_position_table_is_refused_before_anything_is_written(tmp_path, cache):
    import transformers

    config = transformers.OPTConfig(
        vocab_size=320,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    model_dir = str(tmp_path / "opt32")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    train_tiny_tokenizer(model_dir)
    out = tmp_path / "run"
    result = train(out, cache, "steps=[sft]", f"sft.model.path={model_dir}", "sft.max_seq_len=48")
    assert result.returncode == 2
    assert "sft.max_seq_len=48 exceeds the max_position_embeddings=32" in one_error_line(result)
    assert not out.exists()


def test_resume_refuses_changed_settings_naming_them_and_force_continues(tmp_path, cache):
    assert train(tmp_path, cache, "steps=[sft]").returncode == 0
    saved = (tmp_path / "config.yaml").read_text()
    changed = train(tmp_path, cache, "steps=[sft]", "sft.optimizer.learning_rate=5e-4", "sft.lora.rank=4")
    assert changed.returncode == 2
    line = one_error_line(changed)
    assert "sft.optimizer.learning_rate: 0.001 -> 0.0005" in line and "sft.lora.rank: 0 -> 4" in line
    assert (tmp_path / "config.yaml").read_text() == saved  # nothing overwritten
    assert train(tmp_path, cache, "steps=[sft]", "sft.eval_batches=2").returncode == 0  # no effect on results
    forced = train(tmp_path, cache, "steps=[sft]", "sft.optimizer.learning_rate=5e-4", "resume=force")
    assert forced.returncode == 0 and "(resume=force)" in forced.stdout
    assert (tmp_path / "sft" / "checkpoints" / "config.yaml").read_text() == saved  # the step's own record stays


def test_a_truncated_latest_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(tmp_path, cache):
    settings = ["steps=[sft]", "checkpoint.every_steps=2"]
    assert train(tmp_path / "straight", cache, *settings).returncode == 0
    killed = train(tmp_path / "resumed", cache, *settings, env_extra={SIGKILL_AFTER_CHECKPOINT: "4"})
    assert killed.returncode == -9
    latest = tmp_path / "resumed" / "sft" / "checkpoints" / "4"
    for path in (p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 64 and "METADATA" not in p.name):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    resumed = train(tmp_path / "resumed", cache, *settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint 4" in resumed.stdout and "unreadable" in resumed.stdout
    assert "resumed from step 2" in resumed.stdout
    straight_weights = (tmp_path / "straight" / "sft" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "sft" / "model" / "model.safetensors").read_bytes() == straight_weights


def test_data_errors_stop_the_run_before_any_model_loads(tmp_path, cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": ""}\nnot json\n')
    out = tmp_path / "run"
    result = train(out, cache, "steps=[sft,rm]", f"data.sources=[{{path: {bad}, layout: rm-static}}]")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "bad.jsonl: no valid record for layout 'rm-static'" in line and "bad.jsonl:2: not valid JSON" in line
    assert not out.exists()


def test_a_causal_lm_is_refused_as_critic_or_reward_model(tmp_path, cache):
    result = train(tmp_path, cache, "steps=[ppo]", "ppo.critic_model.path=builtin")
    assert result.returncode == 2
    assert "no trained score head" in one_error_line(result)


def test_rw_eval_refuses_a_causal_lm_unless_allowed(tmp_path):
    import subprocess
    import sys

    model_dir = save_tiny_model("llama_gqa_llama3", str(tmp_path))
    train_tiny_tokenizer(model_dir)
    command = [sys.executable, "-m", "jaxrlhf.cli.rw_eval", model_dir]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "no trained score head" in one_error_line(refused)
    allowed = subprocess.run([*command, "--allow-untrained-head"], capture_output=True, text=True, env=env, timeout=300)
    assert allowed.returncode == 0 and "warning:" in allowed.stdout and "+0.0000" in allowed.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.max_answer_seq_len=1", "ppo.max_answer_seq_len: is 1, but answers of one token or less are dropped"),
        ("max_bad_steps=0", "max_bad_steps: must be >= 1"),
        ("distributed.heartbeat_timeout_s=0", "distributed.heartbeat_timeout_s: must be >= 1"),
    ],
)
def test_settings_that_would_train_on_nothing_are_config_errors(tmp_path, cache, override, message):
    result = train(tmp_path, cache, override)
    assert result.returncode == 2 and message in one_error_line(result)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, cache):
    (tmp_path / "taken").write_text("")
    result = train(tmp_path / "taken", cache, "steps=[sft]")
    assert result.returncode == 2 and "output_dir: " in one_error_line(result)


def test_disk_full_is_one_line_and_exit_2(monkeypatch, capsys):
    from jaxrlhf import train as train_module

    def full(config):
        raise OSError(28, "No space left on device", "/runs/x/metrics.jsonl")

    monkeypatch.setattr(train_module, "run", full)
    assert train_module.main(["steps=[sft]"]) == 2
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: '/runs/x/metrics.jsonl'\n"


def test_damaged_model_files_name_the_file(tmp_path):
    from jaxrlhf.models import load_pretrained

    model_dir = save_tiny_model("opt", str(tmp_path))
    weights = os.path.join(model_dir, "model.safetensors")
    intact = tmp_path / "intact.safetensors"
    shutil.copy(weights, intact)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: its tensors need \d+ bytes"):
        load_pretrained(model_dir)
    shutil.copy(intact, weights)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        f.write('{"model_type": "opt",')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_pretrained(model_dir)


def test_chat_arguments_out_of_range_are_one_line(capsys):
    from jaxrlhf.cli import chat

    for argv, message in (
        (["m", "--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1, got -5"),
        (["m", "--temperature", "-1"], "--temperature: must be >= 0.0, got -1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            chat.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_batches_the_data_parallel_devices_cannot_split_are_refused_up_front():
    import jax

    from jaxrlhf.config import load_config
    from jaxrlhf.parallel import make_mesh
    from jaxrlhf.preflight import check_batch_sizes
    from jaxrlhf.run_context import RunContext

    mesh = make_mesh(fsdp=8, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"sft.batch_size=12 / grad_accum_steps=1 = 12 rows .* 8 data-parallel"):
        check_batch_sizes(RunContext(load_config(["sft.batch_size=12"]), mesh, None))
    with pytest.raises(ValueError, match=r"ppo: 64 answers \(prompts_per_iteration x samples_per_prompt\) / num_min"):
        check_batch_sizes(RunContext(load_config(["ppo.grad_accum_steps=4"]), mesh, None))
    check_batch_sizes(RunContext(load_config([]), mesh, None))  # the defaults fit 8 devices
    # rollouts split over devices / generation.tensor_parallel: 12 prompts over 4 generation replicas
    # fit; over 8 (tensor-parallel 1) they do not, which used to surface as a raw sharding error in step 3
    tp2 = ["ppo.prompts_per_iteration=12", "ppo.num_minibatches=3", "generation.tensor_parallel=2"]
    with pytest.raises(ValueError, match=r"prompts_per_iteration=12 .* do not divide over the 8 generation replicas"):
        check_batch_sizes(RunContext(load_config(tp2[:2]), mesh, None))
    with pytest.raises(ValueError, match=r"36 answers .* num_minibatches=3 / grad_accum_steps=1 .* 8 data-parallel"):
        check_batch_sizes(RunContext(load_config([*tp2, "ppo.samples_per_prompt=3"]), mesh, None))


def test_a_ppo_iteration_that_keeps_no_answer_stops_the_run():
    from jaxrlhf.rl.ppo import require_kept_rows

    require_kept_rows({"kept_fraction": 0.25}, 3)
    with pytest.raises(ValueError, match=r"iteration 3: every answer was dropped"):
        require_kept_rows({"kept_fraction": 0.0}, 3)
