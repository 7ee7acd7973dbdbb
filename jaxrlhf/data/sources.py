"""Read DeepSpeed-Chat's dataset layouts from local files into normalized `Record`s.

A source is any object with `path: str`, `layout: str` and `weight: float` (the config's
`DataSourceConfig`). JSON Lines (.jsonl, or .json with an object per line) and JSON arrays
(.json, or a .jsonl holding one array) are read line by line, a leading UTF-8 BOM ignored;
.parquet files and directories written by `Dataset.save_to_disk` (a saved `DatasetDict`
contributes its "train" split) through the `datasets` library. Text formats follow
DeepSpeed-Chat's raw_datasets.py: prompts end in "Assistant:" and responses start with a space.

Rows that cannot become a record (malformed JSON, bytes that are not UTF-8, a missing or null
field, empty text, a wrong type) are skipped and counted in a `BadRecordReport` with their
1-based line; webgpt ties are dropped and counted separately. A file with no valid row is an error.
"""

import json
import os
import re
from collections.abc import Callable, Iterator
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


def _rows(path: str) -> Iterator[tuple[int, dict | BadRecord]]:
    """Each row of a file as (its 1-based line or row number, the row as a dict, or why it is
    not one). JSON Lines (.jsonl, or .json holding one object per line) is read line by line, so
    a malformed line or one that is not UTF-8 is a bad row named by its line, not a failed load."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source not found: {path}")
    if os.path.isdir(path) or path.endswith(".parquet"):
        yield from enumerate(_read_table(path), start=1)
        return
    if not path.endswith((".json", ".jsonl")):
        raise ValueError(f"{path}: unsupported file type; use .json, .jsonl, .parquet or a save_to_disk directory")
    with open(path, "rb") as f:
        data = f.read().removeprefix(b"\xef\xbb\xbf")  # the UTF-8 BOM that Windows tools write
    if not data.strip():
        raise ValueError(f"{path}: empty file")
    if _holds_one_array(path, data):
        yield from _json_array_rows(path, data)
        return
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            yield number, _json_object(line)


def _holds_one_array(path: str, data: bytes) -> bool:
    """Whether a file is one JSON array: a .json that starts with "[", or a .jsonl that does (a tool
    wrote an array where JSON Lines was expected) unless its first line is a whole value of its own."""
    if data.lstrip()[:1] != b"[":
        return False
    lines = [line for line in data.splitlines() if line.strip()]
    if path.endswith(".json") or len(lines) == 1:
        return True
    try:
        json.loads(lines[0])
    except ValueError:  # "[" alone, or "[{...}," on the first line: an array spread over lines
        return True
    return False


def _json_object(line: bytes) -> dict | BadRecord:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return BadRecord(f"not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1})")
    except json.JSONDecodeError as error:
        return BadRecord(f"not valid JSON ({error.msg} at column {error.colno})")
    return value if isinstance(value, dict) else BadRecord(f"not a JSON object (got {type(value).__name__})")


def _json_array_rows(path: str, data: bytes) -> Iterator[tuple[int, dict | BadRecord]]:
    """The objects of a JSON array, each with the line it starts on; a syntax error ends the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {data[error.start]:#04x})") from None
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        yield line, value if isinstance(value, dict) else BadRecord(f"not a JSON object (got {type(value).__name__})")


def _read_table(path: str) -> Iterator[dict]:
    """The rows of a parquet file or a save_to_disk directory (its "train" split)."""
    datasets.disable_progress_bars()  # our own report says what was read; keep stderr for errors
    if os.path.isdir(path):
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            if "train" not in table:
                raise ValueError(f"{path}: saved DatasetDict has no 'train' split ({list(table)})")
            table = table["train"]
    else:
        table = datasets.load_dataset("parquet", data_files=path, split="train")
    return iter(table)


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
    report = BadRecordReport()
    records = []
    for number, row in _rows(source.path):
        report.rows += 1
        try:
            if isinstance(row, BadRecord):
                raise row
            record = layout.parse(row)
        except BadRecord as bad:
            report.add_bad(source.path, number, str(bad))
            continue
        if record is None:
            report.ties_dropped += 1
        else:
            records.append(record)
    report.kept = len(records)
    if not records:
        ties = f", {report.ties_dropped} ties dropped" if report.ties_dropped else ""
        raise ValueError(
            f"{source.path}: no valid record for layout {source.layout!r} (fields {', '.join(layout.columns)}): "
            f"0 records of {report.rows} rows{ties}; {report.malformed()}"
        )
    return records, report
