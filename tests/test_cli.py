"""Bad input at the command line: exit code 2, one line on stderr naming the culprit, no work done."""

import json
import os
import subprocess
import sys

import pytest
from hf_fixtures import save_tiny_model, train_tiny_tokenizer

from jaxrlhf.models import ValueModel, load_pretrained, save_pretrained


def cli(*argv, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", *argv], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize(
    "override, named",
    [
        ("sft.bogus=1", "sft.bogus"),
        ("sft.max_steps=abc", "sft.max_steps"),
        ("steps=[sft,foo]", "steps"),
        ("ppo.preset=bar", "ppo.preset"),
        ("data.sources=[{path: /nope.jsonl, layout: rm-static}]", "/nope.jsonl"),
        ("sft.optimizer.learning_rate=-1", "sft.optimizer.learning_rate"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, override, named):
    out = tmp_path / "run"
    result = cli("jaxrlhf.train", f"output_dir={out}", override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], result.stderr
    assert not out.exists()  # nothing was started


def test_missing_config_file(tmp_path):
    result = cli("jaxrlhf.train", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "missing.yaml" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A random reward model with a tokenizer, exported as transformers' SequenceClassification."""
    root = tmp_path_factory.mktemp("rm")
    model = load_pretrained(
        save_tiny_model("llama_gqa_llama3", str(root)), model_cls=ValueModel, untrained_head="zeros"
    )
    path = str(root / "rm")
    save_pretrained(model, path, extra_config={"pad_token_id": 0})
    train_tiny_tokenizer(path)
    return path


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_rw_eval_scores_a_pairs_file(reward_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(
        pairs, [{"prompt": "\n\nHuman: hello\n\nAssistant:", "chosen": " hi there", "rejected": " go away"}] * 3
    )
    result = cli("jaxrlhf.cli.rw_eval", reward_model_dir, "--pairs", str(pairs), "--layout", "rm-static")
    assert result.returncode == 0, result.stderr
    assert "3 pairs from" in result.stdout and "accuracy" in result.stdout


@pytest.mark.parametrize(
    "bad_row",
    [{"prompt": "a", "chosen": "b"}, {"prompt": "a", "chosen": "b", "rejected": ""}],
    ids=["missing-rejected", "empty-rejected"],
)
def test_rw_eval_names_the_malformed_row(reward_model_dir, tmp_path, bad_row):
    bad = tmp_path / "bad.jsonl"
    good_row = {"prompt": "a", "chosen": "b", "rejected": "c"}
    write_jsonl(bad, [good_row, good_row, bad_row])
    result = cli("jaxrlhf.cli.rw_eval", reward_model_dir, "--pairs", str(bad), "--layout", "rm-static")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:3" in lines[0] and "rejected" in lines[0], result.stderr  # 1-based line


def test_rw_eval_counts_ties_apart_from_accuracy(tmp_path, capsys):
    """Identical chosen and rejected texts (and equal scores) are ties: warned about, and left out
    of the accuracy, which is over the decided pairs only."""
    from hf_fixtures import random_reward_model

    from jaxrlhf.cli import rw_eval
    from jaxrlhf.data.records import Record

    model = random_reward_model(str(tmp_path), str(tmp_path / "cache"))
    prompt = "\n\nHuman: hello\n\nAssistant:"
    answers = [(" hi there", " go away"), (" hi there", " hi there"), (" yes", " no"), (" ok", " ok"), (" a", " bb")]
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": prompt, "chosen": c, "rejected": r} for c, r in answers])
    assert rw_eval.main([model, "--pairs", str(pairs), "--layout", "rm-static"]) == 0
    captured = capsys.readouterr()
    chosen, rejected = rw_eval.score_pairs(model, [Record(prompt, c, r) for c, r in answers])
    decided = [c > r for c, r, (a, b) in zip(chosen, rejected, answers) if a != b]
    assert len(decided) == 3 and all(chosen[i] != rejected[i] for i in (0, 2, 4))
    assert f"accuracy {sum(decided) / 3:.4f} over 3 decided pairs, 2 ties" in captured.out
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:") and "2 tie pairs" in warning[0]
    assert "first pairs 2, 4" in warning[0]
