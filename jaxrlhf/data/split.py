"""DeepSpeed-Chat's data_split: disjoint shares of every source for SFT, reward model and PPO.

For each source, a permutation seeded by (seed, path) is cut into three contiguous slices
proportional to `data_split` ("2,4,4": 20% SFT, 40% reward model, 40% PPO), so the steps
see disjoint records and the cut is the same in every run with the same seed and data.
The eval records are the explicit `eval_sources` (all their records, not split), or else the
last `eval_fraction` of each source's step slice (a seeded random subset, since the slice
comes from a seeded permutation).

Source weights then mix the training slices: a source's weight is how many times, on
average, each of its records appears in the step's training set. 1.0 uses every record once,
0.5 a seeded half, 2.5 every record twice plus a seeded half. Eval records are not weighted.
"""

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxrlhf.data.records import BadRecordReport, Record
from jaxrlhf.data.sources import DataSource, load_source

STEPS = ("sft", "rm", "ppo")  # the three slices of data_split, named by the step that reads each
SLICE_OF = {"dpo": "rm"}  # DPO learns from the reward model's preference pairs


@dataclass(frozen=True)
class StepData:
    """The records one training step sees, and what happened to the rows read."""

    train: list[Record]
    eval: list[Record]
    report: BadRecordReport


def parse_data_split(data_split: str) -> tuple[float, float, float]:
    """ "2,4,4" -> (0.2, 0.4, 0.4): the three steps' shares, normalized to sum to 1."""
    try:
        parts = tuple(float(part) for part in data_split.split(","))
    except ValueError:
        parts = ()
    if len(parts) != len(STEPS) or min(parts) < 0 or sum(parts) <= 0:
        raise ValueError(f"data_split must be three non-negative numbers like '2,4,4', got {data_split!r}")
    total = sum(parts)
    return tuple(part / total for part in parts)


def slice_bounds(size: int, shares: Sequence[float]) -> list[int]:
    """Cut points of `size` items into contiguous slices proportional to `shares`."""
    bounds = [round(size * cumulative) for cumulative in np.cumsum(shares)]
    return [0] + bounds[:-1] + [size]


def _source_rng(seed: int, path: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(path.encode())])


def _weighted_sample(records: list[Record], weight: float, rng: np.random.Generator) -> list[Record]:
    """Each record floor(weight) times, plus a seeded sample of the fractional part."""
    whole_copies = int(weight)
    extra = round((weight - whole_copies) * len(records))
    extra_rows = rng.choice(len(records), size=extra, replace=False)
    return records * whole_copies + [records[row] for row in sorted(extra_rows)]


def step_records(
    sources: Sequence[DataSource],
    step: str,
    data_split: str,
    eval_fraction: float,
    seed: int,
    eval_sources: Sequence[DataSource] = (),
) -> StepData:
    """The training and eval records of `step` ("sft", "rm" or "ppo"; "dpo" reads the rm slice);
    see the module docstring."""
    step = SLICE_OF.get(step, step)
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid steps: {', '.join(STEPS)}")
    if not sources:
        raise ValueError("no data sources given")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    for source in sources:
        if not source.weight > 0:
            raise ValueError(f"data source {source.path!r}: weight must be positive, got {source.weight}")
    shares = parse_data_split(data_split)
    step_index = STEPS.index(step)

    train, held_out, report = [], [], BadRecordReport()
    for source in sources:
        records, source_report = load_source(source, seed)
        report = report.merge(source_report)
        rng = _source_rng(seed, source.path)
        order = rng.permutation(len(records))
        bounds = slice_bounds(len(records), shares)
        step_slice = [records[row] for row in order[bounds[step_index] : bounds[step_index + 1]]]
        if not eval_sources:
            cut = len(step_slice) - round(eval_fraction * len(step_slice))
            held_out += step_slice[cut:]
            step_slice = step_slice[:cut]
        train += _weighted_sample(step_slice, source.weight, rng)
    if not train:
        raise ValueError(
            f"data_split {data_split!r} leaves no training records for step {step!r}: 0 records of "
            f"{report.rows} rows read; {report.malformed()}"
        )

    mixed_order = np.random.default_rng([seed, step_index]).permutation(len(train))
    train = [train[row] for row in mixed_order]
    for source in eval_sources:
        records, source_report = load_source(source, seed)
        report = report.merge(source_report)
        held_out += records
    return StepData(train=train, eval=held_out, report=report)
