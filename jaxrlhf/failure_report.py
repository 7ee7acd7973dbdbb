"""How `python -m jaxrlhf.train` ends when something stops it: the cause first, in one line on stderr,
and the full traceback appended to <output_dir>/error.log instead of printed.

Exit codes: 2 bad input (and a full disk), 3 a diverged run, 1 anything unexpected (an orbax, JAX or
absl error), 130 Ctrl-C. `JAXRLHF_DEBUG=1` re-raises instead (in `jaxrlhf.train.main`).
"""

from __future__ import annotations

import errno
import os
import sys
import time
import traceback

ERROR_LOG = "error.log"


def quiet_library_logs() -> None:
    """Orbax and JAX log through absl: their INFO and WARNING lines stay off stderr, errors still show."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def one_line(error: BaseException) -> str:
    """An error as one line: its message, or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def newest_checkpoint(config) -> str | None:
    """The newest committed checkpoint of the run (`<output_dir>/<step>/checkpoints/<n>`), or None.

    Orbax commits a checkpoint by renaming its temporary directory to the bare step number, so a
    half-written one never counts."""
    found = []
    for step in config.steps:
        directory = os.path.join(config.output_dir, step, "checkpoints")
        names = os.listdir(directory) if os.path.isdir(directory) else []
        for name in (name for name in names if name.isdigit()):
            path = os.path.join(directory, name)
            found.append((os.path.getmtime(path), int(name), path))
    return max(found)[2] if found else None


def report_interrupt(config) -> int:
    """Ctrl-C: one line naming the checkpoint a rerun resumes from; exit code 130."""
    from jaxrlhf.metrics import close_progress_bars

    close_progress_bars()
    print(f"interrupted: the last checkpoint is {newest_checkpoint(config) or 'none yet'}", file=sys.stderr, flush=True)
    return 130


def report_failure(config, error: Exception) -> int:
    """One `error:` line on stderr for the exception that stopped the run, its traceback appended to
    <output_dir>/error.log (which an unexpected error creates, and which is named in its line); returns
    the exit code."""
    import jax

    from jaxrlhf.checkpoint import NonFiniteValues
    from jaxrlhf.metrics import close_progress_bars
    from jaxrlhf.run_lock import RunLocked
    from jaxrlhf.train_state import TrainingDiverged

    close_progress_bars()
    if isinstance(error, (TrainingDiverged, NonFiniteValues)):
        code, message = 3, one_line(error)
    elif is_disk_full(error):
        code, message = 2, disk_full_line(config, error)
    elif isinstance(error, (FileNotFoundError, ValueError, OSError)):
        code, message = 2, one_line(error)
    elif isinstance(error, jax.errors.JaxRuntimeError) and jax.process_count() > 1:
        code = 2
        message = (
            f"process {jax.process_index()}: a collective failed; another process of this run may have died "
            f"({one_line(error)[:200]})"
        )
    else:
        code, message = 1, f"{type(error).__name__}: {first_line(error)}"
    if not isinstance(error, RunLocked):  # that output directory belongs to the run holding it
        logged = write_error_log(config.output_dir, error, create=code == 1)
        if code == 1:
            message += f" ({logged})"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def write_error_log(output_dir: str, error: BaseException, create: bool) -> str:
    """Appends the error's full traceback, under a timestamp, to <output_dir>/error.log; says where in
    words, or why not. The directory is made only when `create` (bad input leaves nothing behind)."""
    path = os.path.join(output_dir, ERROR_LOG)
    if not create and not os.path.isdir(output_dir):
        return f"no traceback written: {output_dir} does not exist"
    header = f"==== {time.strftime('%Y-%m-%d %H:%M:%S %z')} pid {os.getpid()}: {type(error).__name__}\n"
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(path, "a") as log:
            log.write(header + "".join(traceback.format_exception(error)) + "\n")
    except OSError as log_error:
        return f"the traceback could not be written to {path}: {one_line(log_error)}; JAXRLHF_DEBUG=1 prints it"
    return f"full traceback in {path}"


def is_disk_full(error: BaseException | None) -> bool:
    """Whether the error, or one it was raised from, is a full disk (ENOSPC, or a library's words for it)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_line(config, error: BaseException) -> str:
    """What a full disk stopped writing, and which checkpoints are still intact."""
    path = getattr(error, "filename", None) or f"in {config.output_dir}"
    newest = newest_checkpoint(config)
    if newest is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the checkpoints in {os.path.dirname(newest)} up to step {os.path.basename(newest)} are intact"
    return f"no space left on device writing {path}; {kept}"
