"""Read DeepSpeed-Chat's dataset layouts from local files into normalized `Record`s.

A source is any object with `path: str`, `layout: str` and `weight: float` (the config's
`DataSourceConfig`). Files are read through the `datasets` library: .json, .jsonl, .parquet,
or a directory written by `Dataset.save_to_disk` (a saved `DatasetDict` contributes its
"train" split). Text formats follow DeepSpeed-Chat's raw_datasets.py: prompts end in
"Assistant:" and responses start with a space.

Rows that cannot become a record (missing or null field, empty text, wrong type) are skipped
and counted in a `BadRecordReport`; webgpt ties are dropped and counted separately.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import datasets

from jaxrlhf.data.builtin import BUILTIN, DEFAULT_SIZE, builtin_records
from jaxrlhf.data.records import BadRecordReport, Record


class DataSource(Protocol):
    path: str
    layout: str
    weight: float


class BadRecord(Exception):
    """A row that cannot become a record; the message is the reason."""


@dataclass(frozen=True)
class Layout:
    """The columns a layout needs, and how one row becomes a Record (None: a dropped tie)."""

    columns: tuple[str, ...]
    parse: Callable[[dict], Record | None]


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRecord(f"missing field '{key}'")
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' is not a string (got {type(value).__name__})")
    if not value.strip():
        raise BadRecord(f"empty '{key}'")
    return value


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    if value is None:
        raise BadRecord(f"missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"'{key}' is not a number (got {type(value).__name__})")
    return float(value)


def _as_is(row: dict) -> Record:
    """Dahoas/rm-static and Dahoas/full-hh-rlhf: already in "\\n\\nHuman: ... Assistant:" form."""
    return Record(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))


def _plain_question(row: dict) -> Record:
    """Dahoas/synthetic-instruct-gptj-pairwise: a bare question and two answers."""
    return Record(
        prompt=f" Human: {_text(row, 'prompt')} Assistant:",
        chosen=" " + _text(row, "chosen"),
        rejected=" " + _text(row, "rejected"),
    )


def _without_citations(answer: str) -> str:
    """Drop webgpt's "[1]"-style citations (and any parenthesis), as DeepSpeed-Chat does."""
    answer = re.sub(r" [\(\[].*?[\)\]]", "", answer)
    return re.sub(r"[\(\[].*?[\)\]]", "", answer)


def _webgpt(row: dict) -> Record | None:
    """openai/webgpt_comparisons: two scored answers to a question; ties are dropped."""
    question = row.get("question")
    if not isinstance(question, dict):
        raise BadRecord("'question' is not a dict with 'full_text'")
    prompt = f" Human: {_text(question, 'full_text')} Assistant:"
    answers = []
    for key in ("answer_0", "answer_1"):
        answer = _without_citations(_text(row, key))
        if not answer.strip():
            raise BadRecord(f"empty '{key}' after removing citations")
        answers.append(" " + answer)
    score_0, score_1 = _number(row, "score_0"), _number(row, "score_1")
    if score_0 == score_1:
        return None
    chosen, rejected = answers if score_0 > score_1 else answers[::-1]
    return Record(prompt, chosen, rejected)


def _shp(row: dict) -> Record:
    """stanfordnlp/SHP: a post and two human replies; labels == 1 means reply A is preferred."""
    prompt = f" Human: {_text(row, 'history')} Assistant:"
    reply_a, reply_b = " " + _text(row, "human_ref_A"), " " + _text(row, "human_ref_B")
    label = row.get("labels")
    if label is None:
        raise BadRecord("missing field 'labels'")
    if label not in (0, 1):
        raise BadRecord(f"'labels' is not 0 or 1 (got {label!r})")
    chosen, rejected = (reply_a, reply_b) if label == 1 else (reply_b, reply_a)
    return Record(prompt, chosen, rejected)


def _prompt_response(row: dict) -> Record:
    """Single-response SFT data, used as is: fields prompt and response."""
    return Record(_text(row, "prompt"), _text(row, "response"), None)


LAYOUTS = {
    "rm-static": Layout(("prompt", "chosen", "rejected"), _as_is),
    "full-hh-rlhf": Layout(("prompt", "chosen", "rejected"), _as_is),
    "synthetic-instruct-gptj-pairwise": Layout(("prompt", "chosen", "rejected"), _plain_question),
    "webgpt_comparisons": Layout(("question", "answer_0", "answer_1", "score_0", "score_1"), _webgpt),
    "shp": Layout(("history", "human_ref_A", "human_ref_B", "labels"), _shp),
    "prompt-response": Layout(("prompt", "response"), _prompt_response),
}
LAYOUT_NAMES = (*LAYOUTS, BUILTIN)  # every value a source's `layout` may take


def _read_table(path: str) -> datasets.Dataset:
    datasets.disable_progress_bars()  # our own report says what was read; keep stderr for errors
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source not found: {path}")
    if os.path.isdir(path):
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise ValueError(f"{path}: saved DatasetDict has no 'train' split ({list(table)})")
            table = table["train"]
        return table
    if path.endswith((".json", ".jsonl")):
        return datasets.load_dataset("json", data_files=path, split="train")
    if path.endswith(".parquet"):
        return datasets.load_dataset("parquet", data_files=path, split="train")
    raise ValueError(f"{path}: unsupported file type; use .json, .jsonl, .parquet or a save_to_disk directory")


def _builtin_size(path: str) -> int:
    """'builtin' or '' for the default size, 'builtin:<records>' for another."""
    if path in ("", BUILTIN):
        return DEFAULT_SIZE
    prefix, _, size = path.partition(":")
    if prefix != BUILTIN or not size.isdigit():
        raise ValueError(f"builtin source path must be 'builtin' or 'builtin:<records>', got {path!r}")
    return int(size)


def load_source(source: DataSource, seed: int) -> tuple[list[Record], BadRecordReport]:
    """All valid records of one source, in file order, and the report of the rest.

    `seed` only matters for the builtin layout, whose records are generated from it.
    """
    if source.layout == BUILTIN:
        records = builtin_records(size=_builtin_size(source.path), seed=seed)
        return records, BadRecordReport(rows=len(records), kept=len(records))
    if source.layout not in LAYOUTS:
        raise ValueError(f"unknown data layout {source.layout!r}; valid layouts: {', '.join(LAYOUT_NAMES)}")
    layout = LAYOUTS[source.layout]
    table = _read_table(source.path)
    missing = [column for column in layout.columns if column not in table.column_names]
    if missing:
        raise ValueError(f"{source.path}: layout {source.layout!r} needs columns {layout.columns}, missing {missing}")

    columns = table.select_columns(list(layout.columns)).to_dict()  # {column: [value per row]}
    rows = (dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True))
    report = BadRecordReport(rows=len(table))
    records = []
    for row_index, row in enumerate(rows):
        try:
            record = layout.parse(row)
        except BadRecord as bad:
            report.add_bad(source.path, row_index, str(bad))
            continue
        if record is None:
            report.ties_dropped += 1
        else:
            records.append(record)
    report.kept = len(records)
    if not records:
        raise ValueError(f"{source.path}: no valid record for layout {source.layout!r}\n{report}")
    return records, report
