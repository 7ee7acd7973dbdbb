"""Metric outputs: stdout lines, metrics.jsonl, TensorBoard events, summary.json, plots, tables."""

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import metrics
from jaxrlhf.metrics import (
    MetricsLogger,
    close_progress_bars,
    format_number,
    format_summary_table,
    plot_metrics,
    progress,
    update_summary,
)


def tensorboard_scalars(directory) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the one TensorBoard event file under `directory`,
    read from its TFRecord framing (u64 length, u32 crc, event proto, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    (path,) = directory.glob("events.out.tfevents.*")
    data, offset, scalars = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        scalars += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return scalars


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
        logger.log(130, {"accuracy": 0.75}, prefix="rm/eval")
    assert capsys.readouterr().out.splitlines() == [
        "[sft] step 120 | loss 2.5 | tok/s 1.235e4",
        "[sft] step 130 | loss 2.25",
        "[rm/eval] step 130 | accuracy 0.75",
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 120, "prefix": "sft", "loss": 2.5, "tok/s": 12345.6},
        {"step": 130, "prefix": "sft", "loss": 2.25},
        {"step": 130, "prefix": "rm/eval", "accuracy": 0.75},
    ]
    assert tensorboard_scalars(tmp_path / "run" / "tensorboard") == [
        ("sft/loss", 120, 2.5),
        ("sft/tok/s", 120, pytest.approx(12345.6)),
        ("sft/loss", 130, 2.25),
        ("rm/eval/accuracy", 130, 0.75),
    ]


def test_a_non_finite_metric_is_null_in_jsonl_and_absent_from_tensorboard(tmp_path, capsys):
    """JSON has no NaN: a skipped step's loss is written as null, so every line stays valid JSON."""
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": jnp.float32(np.inf), "lr": 1e-3}, prefix="sft")
    assert capsys.readouterr().out == "[sft] step 1 | loss nan | grad_norm inf | lr 0.001\n"

    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}")

    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {
        "step": 1,
        "prefix": "sft",
        "loss": None,
        "grad_norm": None,
        "lr": 1e-3,
    }
    assert tensorboard_scalars(tmp_path / "tensorboard") == [("sft/lr", 1, pytest.approx(1e-3))]


def test_a_resumed_logger_appends_and_rewind_keeps_one_record_per_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(5):
            logger.log(step, {"loss": 1.0}, prefix="sft")
            logger.log(step, {"loss": 1.0}, prefix="rm")
    with MetricsLogger(tmp_path, tensorboard=False) as logger:  # a resumed run appends to the same file
        logger._jsonl.write('{"step": 5, "pre')  # a line cut short by a kill
        logger.rewind({"sft": 2, "ppo": 0})  # a prefix never logged: nothing to drop
        logger.log(3, {"loss": 0.5}, prefix="sft")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in records if r["prefix"] == "sft"] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5)]
    assert [r["step"] for r in records if r["prefix"] == "rm"] == [0, 1, 2, 3, 4]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left

    before = (tmp_path / "metrics.jsonl").read_bytes()
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.rewind({"sft": 3, "rm": 10})  # nothing logged after those steps
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


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


def test_summary_writes_a_non_finite_value_as_null(tmp_path):
    update_summary(tmp_path, {"ppo.kl_to_sft": float("nan"), "ppo.algorithm": "grpo"})

    def refuse(constant):
        raise AssertionError(f"summary.json holds {constant}")

    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse) == {
        "ppo.kl_to_sft": None,
        "ppo.algorithm": "grpo",
    }


def test_summary_table_aligns_dotted_keys():
    table = format_summary_table({"sft": {"loss": 1.23456, "steps": 300}, "rm": {"accuracy": 0.75}})
    assert table == ("sft.loss     1.235\nsft.steps    300\nrm.accuracy  0.75")
    # flat dotted keys (as summary.json holds them), floats to 4 digits, other values as they are
    table = format_summary_table({"ppo.algorithm": "grpo", "ppo.gold_reward_ppo": 3.27083, "ppo.seconds": 1.2e5})
    assert table.splitlines() == [
        "ppo.algorithm        grpo",
        "ppo.gold_reward_ppo  3.271",
        "ppo.seconds          1.2e5",
    ]
    assert format_summary_table({}) == "(empty summary)"


def test_plot_writes_a_png_with_one_panel_per_key(tmp_path, monkeypatch):
    figures = []

    class RecordedFigure(metrics.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(metrics, "Figure", RecordedFigure)
    jsonl = tmp_path / "metrics.jsonl"
    lines = [{"step": step, "prefix": "ppo", "reward": step / 10, "kl": 0.1} for step in range(1, 6)]
    lines += [{"step": 1, "prefix": "sft", "loss": 3.0}, {"step": 3, "prefix": "ppo", "reward": 9.0}]  # 3 again
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = plot_metrics(jsonl, "ppo", ["reward", "kl", "never_logged"], tmp_path / "plots" / "ppo.png")
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (600, 660)  # 6 x 2.2 in/panel
    (figure,) = figures
    reward, kl, never_logged = figure.axes
    assert [axis.get_ylabel() for axis in figure.axes] == ["reward", "kl", "never_logged"]
    # the ppo records only, by step; a step logged twice (a resumed run) keeps its last value
    assert reward.lines[0].get_xydata().tolist() == [[1, 0.1], [2, 0.2], [3, 9.0], [4, 0.4], [5, 0.5]]
    assert kl.lines[0].get_xydata().tolist() == [[step, 0.1] for step in range(1, 6)]
    assert not len(never_logged.lines[0].get_xydata()) and [t.get_text() for t in never_logged.texts] == ["not logged"]
    with pytest.raises(ValueError, match="no records with prefix 'rm'"):
        plot_metrics(jsonl, "rm", ["loss"], tmp_path / "rm.png")


def test_progress_bars_write_to_stderr_and_close_on_error(capsys):
    """Metric lines own stdout; an error message printed after a bar starts a line of its own."""
    bar = progress(total=4, desc="rollouts")
    bar.update(1)
    close_progress_bars()  # what train.py does before it prints an error
    captured = capsys.readouterr()
    assert "rollouts" in captured.err and captured.err.endswith("\n") and captured.out == ""
    assert bar.disable  # closed: a later update writes nothing
    bar.update(1)
    assert capsys.readouterr().err == ""
