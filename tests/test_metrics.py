"""Metric outputs: stdout lines, metrics.jsonl, TensorBoard events, summary.json, plots, tables."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.metrics import MetricsLogger, format_number, format_summary_table, plot_metrics, progress, update_summary


@pytest.mark.parametrize(
    "value, text",
    [(2.31234, "2.312"), (12345.6, "1.235e4"), (0.0123, "0.0123"), (3e-5, "3e-5"), (42, "42"), (-1e6, "-1e6")],
)
def test_numbers_have_four_significant_digits_and_short_exponents(value, text):
    assert format_number(value) == text


def test_logger_writes_stdout_jsonl_and_tensorboard(tmp_path, capsys):
    with MetricsLogger(tmp_path / "run") as logger:
        logger.log(120, {"loss": jnp.float32(2.5), "tok/s": np.float64(12345.6)}, prefix="sft")
        logger.log(130, {"loss": 2.25}, prefix="sft")
    assert capsys.readouterr().out.splitlines() == [
        "[sft] step 120 | loss 2.5 | tok/s 1.235e4",
        "[sft] step 130 | loss 2.25",
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 120, "prefix": "sft", "loss": 2.5, "tok/s": 12345.6},
        {"step": 130, "prefix": "sft", "loss": 2.25},
    ]
    event_files = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].stat().st_size > 0


def test_logger_rejects_a_non_numeric_metric(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="metric 'name' is not a scalar number"):
            logger.log(1, {"name": "abc"}, prefix="rm")


def test_summary_merges_nested_values_and_leaves_no_temporary_file(tmp_path):
    update_summary(tmp_path, {"sft": {"loss": 2.0, "steps": 300}, "run": "tiny"})
    merged = update_summary(tmp_path, {"sft": {"loss": 1.5}, "rm": {"accuracy": 0.75}})
    expected = {"sft": {"loss": 1.5, "steps": 300}, "rm": {"accuracy": 0.75}, "run": "tiny"}
    assert merged == expected
    assert json.loads((tmp_path / "summary.json").read_text()) == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["summary.json"]


def test_summary_table_aligns_dotted_keys():
    table = format_summary_table({"sft": {"loss": 1.23456, "steps": 300}, "rm": {"accuracy": 0.75}})
    assert table == ("sft.loss     1.235\nsft.steps    300\nrm.accuracy  0.75")


def test_plot_writes_a_png_with_one_panel_per_key(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    lines = [{"step": step, "prefix": "ppo", "reward": step / 10, "kl": 0.1} for step in range(1, 6)]
    lines += [{"step": 1, "prefix": "sft", "loss": 3.0}]
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = plot_metrics(jsonl, "ppo", ["reward", "kl", "never_logged"], tmp_path / "plots" / "ppo.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    with pytest.raises(ValueError, match="no records with prefix 'rm'"):
        plot_metrics(jsonl, "rm", ["loss"], tmp_path / "rm.png")


def test_progress_bar_counts_and_writes_to_stderr(capsys):
    with progress(total=4, desc="rollouts") as bar:
        bar.update(4)
        assert bar.n == 4
    captured = capsys.readouterr()
    assert "rollouts" in captured.err and captured.out == ""
