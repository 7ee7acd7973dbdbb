"""What a step's data was when it started, so that a resume notices data changed under the same path.

A fingerprint holds each source file's size and modification time (what changed, for the message)
and a sha256 of the records the step read, train then eval, in order (whether it matters: a file
touched or rewritten with the same content reads the same records). The built-in task has no file;
its generated records are hashed like any others.
"""

import dataclasses
import datetime
import itertools
import json
import os

from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.data.cache import content_hash
from jaxrlhf.data.split import StepData

FINGERPRINT_FILE = "data_fingerprint.json"


def data_fingerprint(sources, data: StepData) -> dict:
    """{"files": [{"path", "size", "mtime"}, ...], "records_sha256": ...} of a step reading `data`
    from `sources` (the run's data sources and eval sources)."""
    paths = dict.fromkeys(source.path for source in sources if source.layout != BUILTIN)
    records = itertools.chain(
        [["train", len(data.train)]],
        (dataclasses.astuple(record) for record in data.train),
        [["eval", len(data.eval)]],
        (dataclasses.astuple(record) for record in data.eval),
    )
    return {"files": [file_stat(path) for path in paths], "records_sha256": content_hash(records)}


def file_stat(path: str) -> dict:
    """Size and modification time of a file, or of a directory's files together (a save_to_disk set)."""
    if os.path.isdir(path):
        stats = [os.stat(os.path.join(root, name)) for root, _, names in os.walk(path) for name in sorted(names)]
    else:
        stats = [os.stat(path)]
    return {
        "path": path,
        "size": sum(stat.st_size for stat in stats),
        "mtime": max((stat.st_mtime for stat in stats), default=0.0),
    }


def write_fingerprint(directory: str, fingerprint: dict) -> None:
    """Writes <directory>/data_fingerprint.json atomically (process 0 only)."""
    path = os.path.join(directory, FINGERPRINT_FILE)
    os.makedirs(directory, exist_ok=True)
    with open(f"{path}.tmp", "w") as file:
        json.dump(fingerprint, file, indent=2)
    os.replace(f"{path}.tmp", path)


def read_fingerprint(directory: str) -> dict | None:
    """The fingerprint stored in `directory`, or None for one made before fingerprints existed."""
    path = os.path.join(directory, FINGERPRINT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def changed_files(saved: dict, current: dict) -> list[str]:
    """`data/x.jsonl (size 1234 -> 987, modified 2025-01-02 10:11:12)` for each file of `saved` whose
    size or modification time differs now (a file no longer read is a config change, named elsewhere)."""
    now = {entry["path"]: entry for entry in current["files"]}
    changes = []
    for before in saved["files"]:
        after = now.get(before["path"])
        if after is None:
            continue
        parts = [f"size {before['size']} -> {after['size']}"] if before["size"] != after["size"] else []
        if before["mtime"] != after["mtime"]:
            parts.append(f"modified {datetime.datetime.fromtimestamp(after['mtime']):%Y-%m-%d %H:%M:%S}")
        if parts:
            changes.append(f"{before['path']} ({', '.join(parts)})")
    return changes
