"""One run per output directory: an exclusive lock on `<output_dir>/.jaxrlhf.lock`, held for the
whole run. A second run on the same directory stops before writing anything, naming the holder.

The lock is an OS `flock`, which the kernel drops when the holding process dies, so a crashed run
never blocks the next one. On a filesystem without flock the file itself is the lock (created with
O_EXCL); one left by a dead process on this host is taken over.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".jaxrlhf.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP)
_warned_no_flock = False


class RunLocked(ValueError):
    """Another run holds the output directory (exit code 2 through train.main)."""


class RunLock:
    """The held lock on one output directory; `release()` lets the next run in."""

    def __init__(self, path: str, fd: int, flocked: bool):
        self.path, self.fd, self.flocked = path, fd, flocked

    def release(self) -> None:
        if self.fd < 0:
            return
        if self.flocked:
            os.ftruncate(self.fd, 0)  # an empty file = released cleanly (no stale warning next time)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        else:
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def acquire(output_dir: str) -> RunLock:
    """Takes the lock on `output_dir` (created if missing), or raises RunLocked naming the holder."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        fd, created = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLocked(f"{output_dir} is in use by another run ({describe(read_holder(path, wait_s=1.0))})") from None
    except OSError as error:
        os.close(fd)
        if error.errno not in NO_FLOCK:
            raise
        if created:  # only a probe: in the fallback whoever creates the file holds the lock
            os.unlink(path)
        return _acquire_exclusive_file(output_dir, path)
    lock = RunLock(path, fd, flocked=True)
    try:
        left = read_holder(path)
        if left:  # the previous holder died holding it (a clean release empties the file)
            _warn_stale(output_dir, left)
        _write_holder(fd)
    except BaseException:
        lock.release()
        raise
    return lock


def _acquire_exclusive_file(output_dir: str, path: str) -> RunLock:
    """The fallback without flock: whoever creates the file holds the lock; a file naming a dead
    process on this host, or naming no holder a second after it is seen, is removed and taken over."""
    global _warned_no_flock
    if not _warned_no_flock:
        _warned_no_flock = True
        print(
            f"warning: {output_dir} does not support flock; the run lock is the file {LOCK_NAME} itself "
            "(a crashed run on another host leaves it behind: delete it by hand)",
            flush=True,
        )
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path, wait_s=1.0)
            if holder and not is_dead_here(holder):
                raise RunLocked(f"{output_dir} is in use by another run ({describe(holder)})") from None
            if holder:  # else a file no holder wrote itself into: a flock-era or half-made one
                _warn_stale(output_dir, holder)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        _write_holder(fd)
        return RunLock(path, fd, flocked=False)
    raise RunLocked(f"{output_dir}: could not take the run lock {path} (other runs keep taking it)")


def refuse_if_held(output_dir: str) -> None:
    """A quick look before the run's heavy start-up (JAX, the models): RunLocked at once when
    another live run holds the directory's lock. The lock itself is taken later (`hold_run_lock`)."""
    path = os.path.join(output_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLocked(f"{output_dir} is in use by another run ({describe(read_holder(path, 1.0))})") from None
    except OSError:
        return  # no flock here: the O_EXCL fallback decides later
    finally:
        os.close(fd)  # closing drops a lock this look took


def read_holder(path: str, wait_s: float = 0.0) -> dict:
    """The holder recorded in the lock file ({} if none), waiting up to `wait_s` for a holder that
    has taken the lock but not yet written itself down."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return {}
            time.sleep(0.05)


def describe(holder: dict) -> str:
    if not holder:
        return "holder not recorded"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def is_dead_here(holder: dict) -> bool:
    """Whether the holder is a process on this host that no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _warn_stale(output_dir: str, holder: dict) -> None:
    print(
        f"warning: took over a stale run lock on {output_dir} from pid {holder.get('pid')} "
        f"(host {holder.get('host')}, since {holder.get('since')}), which ended without releasing it",
        flush=True,
    )


def _write_holder(fd: int) -> None:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    os.fsync(fd)


@contextlib.contextmanager
def hold_run_lock(output_dir: str):
    """The run lock for the whole job: process 0 takes it and tells the others, so that when it
    fails every process raises (before any of them writes) instead of waiting on a collective."""
    import jax

    if jax.process_count() == 1:
        lock = acquire(output_dir)
    else:
        lock = _acquire_on_process_0(output_dir)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _acquire_on_process_0(output_dir: str) -> RunLock | None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    lock, failure = None, None
    if jax.process_index() == 0:
        try:
            lock = acquire(output_dir)
        except Exception as error:  # told to the others first, then raised
            failure = error
    took = multihost_utils.broadcast_one_to_all(np.int32(lock is not None))
    if failure is not None:
        raise failure
    if not int(took):
        raise RunLocked(f"{output_dir}: process 0 could not take the run lock (its error names the holder)")
    return lock
