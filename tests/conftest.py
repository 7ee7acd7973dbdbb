"""Test session set-up: eight host devices for every sharding layout, CPU only; the default run,
started in the background as soon as a collected test needs it.

Tests over ~20 s carry `@pytest.mark.slow` (pyproject.toml registers it). CI runs every test;
`python -m pytest tests -q -m "not slow"` is the quick local loop (a few minutes on a laptop).
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


DEFAULT_RUN_SECONDS = 1500
_SESSION = f"{os.getpid()}-{time.time_ns()}"  # names this session's default run (without pytest-xdist)
_STARTED: list = []  # (directory, process) of the default run this process started


def _default_run_dir() -> Path:
    """Where this test session's default run goes: one per session, shared by pytest-xdist's
    workers (they share PYTEST_XDIST_TESTRUNUID)."""
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID") or _SESSION
    return Path(tempfile.gettempdir()) / f"jaxrlhf-default-run-{session}"


def _start_default_run(directory: Path) -> None:
    """Starts `python -m jaxrlhf.train` (no argument but the output directory, one CPU device) in
    the background, unless this session has started it already; its exit code lands in <dir>/rc."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(directory / "started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a plain CPU run
    env["JAX_PLATFORMS"] = "cpu"
    out, stdout, stderr, rc = (shlex.quote(str(directory / name)) for name in ("out", "stdout", "stderr", "rc"))
    train = f"{shlex.quote(sys.executable)} -m jaxrlhf.train output_dir={out}"  # in bash's process group
    command = f"{train} > {stdout} 2> {stderr}; echo $? > {rc}.tmp && mv {rc}.tmp {rc}"
    _STARTED.append((directory, subprocess.Popen(["bash", "-c", command], env=env, start_new_session=True)))


def pytest_sessionfinish(session, exitstatus):
    """A session that stops early (-x, Ctrl-C) stops its default run too and removes it; not under
    pytest-xdist, whose other workers may still be reading it (the run ends by itself there)."""
    if os.environ.get("PYTEST_XDIST_TESTRUNUID"):
        return
    for directory, process in _STARTED:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """The default run starts as soon as a collected test needs it, and runs beside the tests that
    do not (most of the suite, on a second core)."""
    if any("default_run" in item.fixturenames for item in items):
        _start_default_run(_default_run_dir())


@pytest.fixture(scope="session")
def default_run():
    """The default pipeline, once per test session, as a user starts it: `python -m jaxrlhf.train`
    with no argument (only the output directory moved), on one CPU device. Returns (output
    directory, summary.json, stdout). Its SFT and reward-model exports (<out>/sft/model,
    <out>/rm/model) are the starting points of tests of the later steps, which write their runs
    elsewhere (they may share <out>/cache as their tokenized-data cache; the run itself has none)."""
    directory = _default_run_dir()
    _start_default_run(directory)
    deadline = time.monotonic() + DEFAULT_RUN_SECONDS + 60
    while not (directory / "rc").exists():
        assert time.monotonic() < deadline, f"the default run did not finish in {DEFAULT_RUN_SECONDS} s"
        time.sleep(1)
    stderr = (directory / "stderr").read_text()
    assert (directory / "rc").read_text().strip() == "0", stderr[-4000:]
    out = directory / "out"
    return out, json.load(open(out / "summary.json")), (directory / "stdout").read_text()
