"""A resume notices data changed under the same path: each step keeps a fingerprint of its data (file
sizes, modification times, a hash of the records it read) beside its checkpoints; other records are
refused unless resume=force, a touched file is a warning. A resumed step logs each step once."""

import json
import os
import types

import pytest
from pipeline_helpers import train

from jaxrlhf.checkpoint import SIGKILL_AFTER_CHECKPOINT
from jaxrlhf.data.fingerprint import FINGERPRINT_FILE, data_fingerprint, write_fingerprint
from jaxrlhf.data.split import step_records
from jaxrlhf.preflight import check_data_unchanged

SFT = ["steps=[sft]", "data.data_split=1,0,0", "checkpoint.every_steps=2", "checkpoint.keep=3"]


def write_data(path, rows: int, answer: str = "Hello there.") -> None:
    with open(path, "w") as file:
        for row in range(rows):
            file.write(
                json.dumps({"prompt": f"\n\nHuman: Say hi {row}.\n\nAssistant:", "response": f" {answer}"}) + "\n"
            )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def killed_run(tmp_path, cache, kill_at: int):
    """A run of steps=[sft] on a small prompt-response file, killed right after checkpoint `kill_at`."""
    data = tmp_path / "x.jsonl"
    write_data(data, 120)
    source = f"data.sources=[{{path: {data}, layout: prompt-response}}]"
    out = tmp_path / "run"
    killed = train(out, cache, *SFT, source, env_extra={SIGKILL_AFTER_CHECKPOINT: str(kill_at)})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    return out, data, source


def listing(directory):
    return sorted(
        (os.path.relpath(os.path.join(root, name), directory), os.stat(os.path.join(root, name)).st_mtime_ns)
        for root, _, names in os.walk(directory)
        for name in names
    )


@pytest.mark.slow  # ~30 s: a killed run, then two resumes
def test_rewritten_data_is_refused_unless_forced(tmp_path, cache):
    out, data, source = killed_run(tmp_path, cache, 2)
    checkpoints = out / "sft" / "checkpoints"
    before = listing(checkpoints)
    write_data(data, 100, answer="Go away.")  # fewer rows, other answers, same path

    refused = train(out, cache, *SFT, source)
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sft would resume from"), refused.stderr
    assert str(data) in lines[0] and "size" in lines[0] and "the records it reads differ" in lines[0]
    assert listing(checkpoints) == before  # nothing written, nothing removed

    forced = train(out, cache, *SFT, source, "resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "but its data changed" in forced.stdout and "resumed from step 2" in forced.stdout


@pytest.mark.slow  # ~30 s: a killed run, then a resume
def test_touched_data_resumes_with_a_warning_and_logs_each_step_once(tmp_path, cache):
    out, data, source = killed_run(tmp_path, cache, 4)
    checkpoints = out / "sft" / "checkpoints"
    (checkpoints / "4").rename(tmp_path / "lost")  # as if killed between checkpoints 2 and 4: 3, 4 run again
    os.utime(data, (1e9, 1e9))  # same content, other modification time
    with open(checkpoints / "2" / "metadata" / "metadata") as file:
        seconds_before_kill = json.load(file)["seconds"]

    resumed = train(out, cache, *SFT, source)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    assert "warning: sft: data files changed, the records it reads did not" in resumed.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    for prefix in ("sft", "sft/eval"):
        steps = [record["step"] for record in records if record["prefix"] == prefix]
        assert len(steps) == len(set(steps)), (prefix, steps)
    assert [record["step"] for record in records if record["prefix"] == "sft"] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft.seconds"] > seconds_before_kill


def fake_context(fingerprint: dict, resume: str = "auto"):
    """What `check_data_unchanged` reads of a RunContext: the resume policy and the current fingerprint."""
    return types.SimpleNamespace(config=types.SimpleNamespace(resume=resume), data_fingerprint=lambda step: fingerprint)


def test_the_check_against_a_stored_fingerprint(tmp_path, capsys):
    saved = {"files": [{"path": "d.jsonl", "size": 10, "mtime": 1e9}], "records_sha256": "a"}
    check_data_unchanged(fake_context(saved), "rm", str(tmp_path))  # made before fingerprints
    assert f"has no {FINGERPRINT_FILE}" in capsys.readouterr().out
    write_fingerprint(str(tmp_path), saved)
    check_data_unchanged(fake_context(saved), "rm", str(tmp_path))
    assert capsys.readouterr().out == ""
    touched = {"files": [{"path": "d.jsonl", "size": 10, "mtime": 2e9}], "records_sha256": "a"}
    check_data_unchanged(fake_context(touched), "rm", str(tmp_path))
    assert "warning: rm: data files changed" in capsys.readouterr().out
    changed = {"files": [{"path": "d.jsonl", "size": 7, "mtime": 2e9}], "records_sha256": "b"}
    with pytest.raises(ValueError, match=r"rm would resume .* its data changed: d.jsonl \(size 10 -> 7, modified"):
        check_data_unchanged(fake_context(changed), "rm", str(tmp_path))
    check_data_unchanged(fake_context(changed, resume="force"), "rm", str(tmp_path))
    assert "(resume=force)" in capsys.readouterr().out


def test_the_builtin_task_is_fingerprinted_by_its_records():
    builtin = types.SimpleNamespace(path="builtin:200", layout="builtin", weight=1.0)
    small = types.SimpleNamespace(path="builtin:150", layout="builtin", weight=1.0)
    first, again = (data_fingerprint([builtin], step_records([builtin], "sft", "2,4,4", 0.05, 0)) for _ in range(2))
    other = data_fingerprint([small], step_records([small], "sft", "2,4,4", 0.05, 0))
    assert first == again and first["files"] == []
    assert other["records_sha256"] != first["records_sha256"]
