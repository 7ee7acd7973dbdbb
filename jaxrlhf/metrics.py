"""What a run reports: metric lines on stdout, TensorBoard scalars, metrics.jsonl, summary.json,
plots of the logged curves, progress bars; and what it measures: throughput, MFU, compilations.

Only process 0 writes, so every process may call all of this unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.monitoring
import numpy as np
from matplotlib.figure import Figure
from tensorboardX import SummaryWriter
from tqdm import tqdm

# Peak dense bf16 FLOP/s per device, for the MFU estimate (devices not listed report no MFU).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """`with CompileCounter() as c: ...` then `c.count` is the number of XLA compilations inside."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def training_flops_per_token(trainable: int, frozen: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """The matmuls' FLOPs per token, forward + backward: 6 per trainable weight (2 forward, 2 for the
    activations' gradient, 2 for its own), 4 per frozen weight (no gradient of its own: LoRA's
    base), plus attention's 12 * layers * hidden * seq."""
    return 6.0 * trainable + 4.0 * frozen + 12.0 * num_layers * hidden * seq_len


def throughput(tokens: float, seconds: float, flops_per_token: float) -> dict[str, float]:
    """tokens/s, achieved TFLOP/s and, on known devices, MFU against the peak of all devices."""
    tflops = tokens * flops_per_token / max(seconds, 1e-9) / 1e12
    stats = {"tokens_per_s": tokens / max(seconds, 1e-9), "tflops": tflops}
    peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
    if peak:
        stats["mfu"] = tflops * 1e12 / (peak * jax.device_count())
    return stats


class MetricsLogger:
    """Writes each `log` call to stdout, <output_dir>/metrics.jsonl and <output_dir>/tensorboard."""

    def __init__(self, output_dir: str | os.PathLike, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.is_writer = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if self.is_writer:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a")  # a resumed run appends
            if tensorboard:
                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, float], prefix: str) -> None:
        """Records scalar `metrics` (Python, NumPy or JAX numbers) of one `step` of stage `prefix`."""
        if not self.is_writer:
            return
        values = {name: _as_float(name, value) for name, value in metrics.items()}
        print(format_metrics_line(step, values, prefix), flush=True)
        # JSON has no NaN: a non-finite value (a skipped step's loss) is written as null
        finite = {name: value if math.isfinite(value) else None for name, value in values.items()}
        self._jsonl.write(json.dumps({"step": step, "prefix": prefix, **finite}) + "\n")
        self._jsonl.flush()  # a crash loses no logged line
        if self._tensorboard is not None:
            for name, value in finite.items():
                if value is not None:
                    self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

    def rewind(self, after: Mapping[str, int]) -> None:
        """Drops from metrics.jsonl the records of each prefix in `after` logged after its step (and a
        line cut short by a kill): a step resumed from its checkpoint at that step logs them again, so
        each step keeps one record. The file is replaced atomically."""
        if not self.is_writer:
            return
        path = self.output_dir / "metrics.jsonl"
        self._jsonl.close()
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.endswith("\n") and not _logged_after(line, after)]
        if len(kept) < len(lines):
            temporary = path.with_suffix(".jsonl.tmp")
            temporary.write_text("".join(kept))
            os.replace(temporary, path)
        self._jsonl = open(path, "a")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def format_metrics_line(step: int, metrics: Mapping[str, float], prefix: str) -> str:
    """`[sft] step 120 | loss 2.31 | tok/s 1.2e4`: every number to 4 significant digits."""
    return " | ".join(
        [f"[{prefix}] step {step}"] + [f"{name} {format_number(value)}" for name, value in metrics.items()]
    )


def format_number(value: float) -> str:
    """4 significant digits with a short exponent: 2.31, 0.0123, 1.2e4, 3e-5."""
    text = f"{value:.4g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def update_summary(output_dir: str | os.PathLike, values: Mapping) -> dict:
    """Merges `values` into <output_dir>/summary.json (nested dicts key by key) and returns the result.

    The file is replaced atomically, so a reader never sees half of it.
    """
    path = Path(output_dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    _merge_into(summary, {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()})
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, path)
    return summary


def format_summary_table(summary: Mapping) -> str:
    """The summary as two aligned columns, nested keys joined by dots, for the end of a run."""
    rows = list(_flatten(summary))
    if not rows:
        return "(empty summary)"
    width = max(len(key) for key, _ in rows)
    return "\n".join(
        f"{key:<{width}}  {format_number(value) if isinstance(value, float) else value}" for key, value in rows
    )


def plot_metrics(jsonl_path: str | os.PathLike, prefix: str, keys: Iterable[str], out_png: str | os.PathLike) -> Path:
    """One subplot per metric in `keys` against step, from the `prefix` records of a metrics.jsonl.

    A step logged twice (a resumed run repeats steps since its checkpoint) keeps its last value.
    """
    keys = list(keys)
    curves: dict[str, dict[int, float]] = {key: {} for key in keys}
    with open(jsonl_path) as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    records = [record for record in records if record.get("prefix") == prefix]
    if not records:
        raise ValueError(f"{jsonl_path}: no records with prefix {prefix!r}")
    for record in records:
        for key in keys:
            if key in record:
                curves[key][record["step"]] = record[key]

    figure = Figure(figsize=(6, 2.2 * len(keys)), layout="constrained")  # no pyplot: no global state
    axes = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for axis, key in zip(axes, keys):
        steps = sorted(curves[key])
        axis.plot(steps, [curves[key][step] for step in steps], marker="." if len(steps) < 50 else None)
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        if not steps:
            axis.text(0.5, 0.5, "not logged", transform=axis.transAxes, ha="center", va="center")
    axes[0].set_title(f"{prefix}")
    axes[-1].set_xlabel("step")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    return out_png


def progress(total: int, desc: str) -> tqdm:
    """A progress bar on stderr, shown by process 0 only; redrawn at most every 30 s into a log file."""
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        disable=jax.process_index() != 0,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        dynamic_ncols=True,
    )


def close_progress_bars() -> None:
    """Ends every open progress bar's line, so that what is printed next starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _logged_after(line: str, after: Mapping[str, int]) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    prefix = record.get("prefix") if isinstance(record, dict) else None
    return prefix in after and isinstance(record.get("step"), int) and record["step"] > after[prefix]


def _as_float(name: str, value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} is not a scalar number: {value!r}") from None


def _merge_into(target: dict, values: Mapping) -> None:
    """Recursively updates `target` with `values`: nested dicts merge, anything else replaces."""
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def _flatten(tree: Mapping, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
