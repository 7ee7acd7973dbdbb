"""One run per output directory: a second run on a directory in use stops at once (exit 2, one line
naming the holder) without writing; a lock left by a dead process is taken over; a released lock
lets the next run in."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pipeline_helpers import TINY

from jaxrlhf.run_lock import LOCK_NAME, RunLocked, acquire


def modified(directory) -> dict[str, int]:
    """Every file under `directory` with its modification time."""
    return {
        str(path.relative_to(directory)): path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()
    }


def wait_for_holder(path, process, timeout_s=120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the first run ended early (exit {process.returncode})"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"{path} was not written within {timeout_s} s")


def test_a_second_run_on_a_directory_in_use_stops_at_once_without_writing(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "jaxrlhf.train", *TINY, f"output_dir={out}", f"data.cache_dir={cache}"]
    argv += ["steps=[sft]", "sft.max_steps=200", "checkpoint.every_steps=50"]
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe nobody drains (progress bars fill one)
    first = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        holder = wait_for_holder(out / LOCK_NAME, first)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        while not (out / "config.yaml").exists():  # the first run's first write after the lock
            assert first.poll() is None
            time.sleep(0.1)
        first.send_signal(signal.SIGSTOP)  # holds the lock, writes nothing, leaves the CPUs to the second
        before = modified(out)
        started = time.monotonic()
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second was refused: make it longer"
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert str(out) in errors[0] and f"pid {first.pid}" in errors[0] and "since" in errors[0], errors[0]
        assert "jaxrlhf: steps" not in second.stdout and "step 1 " not in second.stdout, second.stdout[-2000:]
        print(f"second run refused after {took:.1f} s (start-up, planning and preflight)")
        assert modified(out) == before  # not a file written, added or touched
        assert json.loads((out / LOCK_NAME).read_text()) == holder
    finally:
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=30)
        log.close()
    assert first.poll() is not None


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_with_a_warning(tmp_path, capsys):
    pid = dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "since": "2020-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    lock = acquire(str(tmp_path))
    try:
        warning = capsys.readouterr().out.strip()
        assert warning.startswith("warning:") and f"stale run lock on {tmp_path} from pid {pid}" in warning
        assert len(warning.splitlines()) == 1
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_the_lock_is_exclusive_and_released_after_a_run(tmp_path, capsys):
    for _ in range(2):
        lock = acquire(str(tmp_path))
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            acquire(str(tmp_path))  # a second holder, even in this process, is refused
        lock.release()
        lock.release()  # twice is harmless
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: no stale warning next time
    assert "warning" not in capsys.readouterr().out


def test_without_flock_the_file_itself_is_the_lock(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = acquire(str(tmp_path))
    with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
        acquire(str(tmp_path))
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "since": "x"}))
    acquire(str(tmp_path)).release()
    assert "stale run lock" in capsys.readouterr().out
