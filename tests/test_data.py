"""The data layer: layouts from local files, data_split, tokenization, the batch iterator."""

import collections
import dataclasses
import json
import os

import datasets
import numpy as np
import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxrlhf.data import (
    BatchIterator,
    BatchPosition,
    Record,
    builtin_tokenizer,
    load_source,
    step_records,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    layout: str
    weight: float = 1.0


# Raw rows of each layout and the records they must become (worked out by hand from
# DeepSpeed-Chat's raw_datasets.py).
LAYOUT_CASES = {
    "rm-static": (
        [{"prompt": "\n\nHuman: Hi?\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}],
        [Record("\n\nHuman: Hi?\n\nAssistant:", " Hello!", " Go away.")],
    ),
    "full-hh-rlhf": (
        [{"prompt": "\n\nHuman: Tea?\n\nAssistant:", "chosen": " Yes, please.", "rejected": " No."}],
        [Record("\n\nHuman: Tea?\n\nAssistant:", " Yes, please.", " No.")],
    ),
    "synthetic-instruct-gptj-pairwise": (
        [{"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."}],
        [Record(" Human: What is 2+2? Assistant:", " 4.", " 5.")],
    ),
    "webgpt_comparisons": (
        [
            {
                "question": {"full_text": "Why is the sky blue?"},
                "answer_0": "Rayleigh scattering [1].",
                "answer_1": "Magic (see below).",
                "score_0": 1.0,
                "score_1": -1.0,
            },
            {
                "question": {"full_text": "Is ice cold?"},
                "answer_0": "No.",
                "answer_1": "Yes [3][4].",
                "score_0": -0.5,
                "score_1": 0.5,
            },
            {"question": {"full_text": "A tie?"}, "answer_0": "A.", "answer_1": "B.", "score_0": 0.0, "score_1": 0.0},
        ],
        [
            Record(" Human: Why is the sky blue? Assistant:", " Rayleigh scattering.", " Magic."),
            Record(" Human: Is ice cold? Assistant:", " Yes.", " No."),
        ],
    ),
    "shp": (
        [
            {"history": "Best pet?", "human_ref_A": "A cat.", "human_ref_B": "A rock.", "labels": 1},
            {"history": "Best meal?", "human_ref_A": "Gravel.", "human_ref_B": "Soup.", "labels": 0},
        ],
        [
            Record(" Human: Best pet? Assistant:", " A cat.", " A rock."),
            Record(" Human: Best meal? Assistant:", " Soup.", " Gravel."),
        ],
    ),
    "prompt-response": (
        [{"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "response": " Hi!"}],
        [Record("\n\nHuman: Say hi.\n\nAssistant:", " Hi!", None)],
    ),
}


def write_rows(rows: list[dict], path: str) -> str:
    """Write rows as .json (a list), .jsonl, .parquet, or a save_to_disk directory (no suffix)."""
    if path.endswith(".json"):
        with open(path, "w") as file:
            json.dump(rows, file)
    elif path.endswith(".jsonl"):
        with open(path, "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
    elif path.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


def numbered_records_file(tmp_path, count: int, tag: str = "q") -> str:
    """A .jsonl of `count` distinct records with prompts tag0, tag1, ..."""
    rows = [{"prompt": f"{tag}{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(count)]
    return write_rows(rows, str(tmp_path / f"{tag}.jsonl"))


# ---------------------------------------------------------------- layouts and bad records


@pytest.mark.parametrize("layout", sorted(LAYOUT_CASES))
def test_layout_parses_the_same_from_every_file_format(tmp_path, layout):
    rows, expected = LAYOUT_CASES[layout]
    for file_name in ("rows.json", "rows.jsonl", "rows.parquet", "saved"):
        path = write_rows(rows, str(tmp_path / file_name))
        records, report = load_source(Source(path, layout), seed=0)
        assert records == expected, file_name
        assert report.rows == len(rows) and report.kept == len(expected) and report.bad_total == 0
    if layout == "webgpt_comparisons":
        assert report.ties_dropped == 1


def test_bad_rows_are_skipped_counted_and_located(tmp_path):
    rows = [
        {"prompt": "ok", "chosen": " a", "rejected": " b"},
        {"prompt": "no chosen", "rejected": " b"},
        {"prompt": "empty", "chosen": "   ", "rejected": " b"},
        {"prompt": "number", "chosen": 5, "rejected": " b"},
        {"prompt": "ok too", "chosen": " c", "rejected": " d"},
    ]
    path = write_rows(rows, str(tmp_path / "mixed.jsonl"))
    records, report = load_source(Source(path, "rm-static"), seed=0)
    assert [record.prompt for record in records] == ["ok", "ok too"]
    assert (report.rows, report.kept, report.bad_total) == (5, 2, 3)
    assert report.bad == {"missing field 'chosen'": 1, "empty 'chosen'": 1, "'chosen' is not a string (got int)": 1}
    assert report.examples == [  # 1-based lines of the file
        f"{path}:2: missing field 'chosen'",
        f"{path}:3: empty 'chosen'",
        f"{path}:4: 'chosen' is not a string (got int)",
    ]
    assert f"{path}:4:" in str(report)


def test_unusable_sources_are_clear_errors(tmp_path):
    empty = write_rows([{"prompt": "p", "chosen": "", "rejected": " r"}], str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="empty.jsonl: no valid record"):
        load_source(Source(empty, "rm-static"), seed=0)
    unlabeled = write_rows([{"history": "h", "human_ref_A": "a", "human_ref_B": "b"}], str(tmp_path / "shp.jsonl"))
    with pytest.raises(
        ValueError,
        match=r"(?s)shp.jsonl: no valid record for layout 'shp' \(fields history, .*labels\)"
        r".*missing field 'labels'.*shp.jsonl:1:",
    ):
        load_source(Source(unlabeled, "shp"), seed=0)
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_source(Source(missing, "rm-static"), seed=0)
    with pytest.raises(ValueError, match="valid layouts: .*rm-static.*builtin"):
        load_source(Source(empty, "hh"), seed=0)
    with pytest.raises(ValueError, match="'builtin' or 'builtin:<records>', got 'builtin:many'"):
        load_source(Source("builtin:many", "builtin"), seed=0)


def test_malformed_json_lines_are_bad_rows_named_by_file_and_line(tmp_path):
    """A broken line, bytes that are not UTF-8, or a line that is not an object: skipped, counted,
    located by 1-based line, while the good rows load."""
    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})
    path.write_bytes(
        b"\n".join(
            [
                good.encode(),
                b'{"prompt": "p", "chosen": ',
                good.encode(),
                b"",
                b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}',
                b"[1, 2]",
                good.encode(),
            ]
        )
    )
    records, report = load_source(Source(str(path), "rm-static"), seed=0)
    assert len(records) == 3 and report.rows == 6 and report.bad_total == 3
    assert report.examples == [
        f"{path}:2: not valid JSON (Expecting value at column 27)",
        f"{path}:5: not UTF-8 (byte 0xe9 at column 16)",
        f"{path}:6: not a JSON object (got list)",
    ]


def test_json_arrays_name_the_line_of_a_bad_element_and_empty_files_are_errors(tmp_path):
    array = tmp_path / "rows.json"
    array.write_text(
        '[\n  {"prompt": "p", "chosen": " a", "rejected": " b"},\n  {"prompt": "p", "chosen": 3, "rejected": " b"}\n]\n'
    )
    records, report = load_source(Source(str(array), "rm-static"), seed=0)
    assert len(records) == 1 and report.examples == [f"{array}:3: 'chosen' is not a string (got int)"]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "p"},\n {"prompt": \n]')
    with pytest.raises(ValueError, match=r"broken.json:4: not valid JSON"):
        load_source(Source(str(broken), "rm-static"), seed=0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: empty file"):
        load_source(Source(str(empty), "rm-static"), seed=0)


def test_a_bom_and_a_json_array_in_a_jsonl_file_are_read_not_reported_as_bad_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(40)]
    files = {
        "bom.jsonl": "\ufeff" + "\n".join(json.dumps(row) for row in rows),  # as Windows tools write it
        "bom_array.json": "\ufeff" + json.dumps(rows, indent=1),
        "spread_array.jsonl": json.dumps(rows, indent=2),
        "one_line_array.jsonl": json.dumps(rows),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        records, report = load_source(Source(str(tmp_path / name), "rm-static"), seed=0)
        assert (len(records), report.rows, report.bad_total) == (40, 40, 0), name
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows, indent=2)[:-30])  # cut inside the last object
    with pytest.raises(ValueError, match=r"broken.jsonl:\d+: not valid JSON") as error:
        load_source(Source(str(broken), "rm-static"), seed=0)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- data_split


def test_data_split_slices_are_disjoint_cover_the_data_and_are_stable(tmp_path):
    source = Source(numbered_records_file(tmp_path, 100), "rm-static")
    steps = {step: step_records([source], step, "2,4,4", eval_fraction=0.0, seed=7) for step in ("sft", "rm", "ppo")}
    prompts = {step: [record.prompt for record in data.train] for step, data in steps.items()}
    assert [len(prompts[step]) for step in ("sft", "rm", "ppo")] == [20, 40, 40]
    assert set().union(*map(set, prompts.values())) == {f"q{i}" for i in range(100)}
    assert sum(map(len, prompts.values())) == 100  # so the three slices are disjoint
    again = step_records([source], "rm", "2,4,4", eval_fraction=0.0, seed=7)
    assert again.train == steps["rm"].train
    other_seed = step_records([source], "rm", "2,4,4", eval_fraction=0.0, seed=8)
    assert set(other_seed.train) != set(steps["rm"].train)


def test_eval_split_is_held_out_or_comes_from_eval_sources(tmp_path):
    source = Source(numbered_records_file(tmp_path, 100), "rm-static")
    data = step_records([source], "ppo", "2,4,4", eval_fraction=0.25, seed=0)
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert not set(data.train) & set(data.eval)
    rm_prompts = {r.prompt for r in step_records([source], "rm", "2,4,4", eval_fraction=0.25, seed=0).train}
    assert not rm_prompts & {r.prompt for r in data.eval}

    eval_path = write_rows([{"prompt": "e", "chosen": " x", "rejected": " y"}], str(tmp_path / "eval.json"))
    eval_source = Source(eval_path, "rm-static")
    data = step_records([source], "ppo", "2,4,4", eval_fraction=0.25, seed=0, eval_sources=[eval_source])
    assert len(data.train) == 40 and data.eval == [Record("e", " x", " y")]
    assert data.report.rows == 101


def test_weight_is_the_average_number_of_uses_of_each_record(tmp_path):
    first = Source(numbered_records_file(tmp_path, 40, tag="a"), "rm-static", weight=2.0)
    second = Source(numbered_records_file(tmp_path, 40, tag="b"), "rm-static", weight=0.5)
    train = step_records([first, second], "sft", "1,0,0", eval_fraction=0.0, seed=0).train
    uses = collections.Counter(record.prompt for record in train)
    assert {uses[f"a{i}"] for i in range(40)} == {2}
    assert len([prompt for prompt in uses if prompt.startswith("b")]) == 20
    assert {uses[prompt] for prompt in uses if prompt.startswith("b")} == {1}
    with pytest.raises(ValueError, match="no training records for step 'rm'"):
        step_records([first], "rm", "1,0,0", eval_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="b.jsonl'. weight must be positive, got 0"):
        step_records([first, dataclasses.replace(second, weight=0)], "sft", "1,0,0", eval_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="data_split must be three"):
        step_records([first], "sft", "1,1", eval_fraction=0.0, seed=0)


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(builtin_tokenizer(str(tmp_path_factory.mktemp("tokenizer"))))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT = "\n\nHuman: List two fruits.\n\nAssistant:"
RECORD = Record(PROMPT, " apple, pear. Hope this helps!", " red. Whatever.")


def test_sft_loss_mask_covers_exactly_the_response_and_eos(tokenizer):
    prompt, response = ids(tokenizer, PROMPT), ids(tokenizer, RECORD.chosen)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = len(prompt) + len(response) + 4
    arrays = tokenize_sft([RECORD], tokenizer, max_seq_len=width)
    assert all(array.dtype == np.int32 and array.shape == (1, width) for array in arrays.values())
    assert arrays["input_ids"][0].tolist() == prompt + response + [eos] + [pad] * 3
    assert arrays["attention_mask"][0].tolist() == [1] * (width - 3) + [0] * 3
    assert arrays["loss_mask"][0].tolist() == [0] * len(prompt) + [1] * (len(response) + 1) + [0] * 3
    every_token = tokenize_sft([RECORD], tokenizer, max_seq_len=width, loss_on="all")
    assert every_token["loss_mask"][0].tolist() == arrays["attention_mask"][0].tolist()

    cut = tokenize_sft([RECORD], tokenizer, max_seq_len=len(prompt) + 2)
    assert cut["input_ids"][0].tolist() == prompt + response[:2]
    assert cut["loss_mask"][0].tolist() == [0] * len(prompt) + [1, 1]


def test_masks_not_ids_give_lengths_when_pad_equals_eos(tokenizer):
    same_pad = AutoTokenizer.from_pretrained(tokenizer.name_or_path, pad_token=tokenizer.eos_token)
    assert same_pad.pad_token_id == same_pad.eos_token_id
    length = len(ids(tokenizer, PROMPT)) + len(ids(tokenizer, RECORD.chosen)) + 1
    arrays = tokenize_sft([RECORD], same_pad, max_seq_len=length + 5)
    assert arrays["attention_mask"].sum() == length and arrays["loss_mask"][0, length - 1] == 1
    pairs = tokenize_pairs([RECORD], same_pad, max_seq_len=length + 5)
    assert pairs["chosen_mask"].sum() == length


def test_packing_keeps_examples_whole_with_segments_and_positions(tokenizer):
    records = [Record("", " apple.", None), Record("", " red, blue, green.", None), Record("", " cat.", None)]
    lengths = [len(ids(tokenizer, record.chosen)) + 1 for record in records]  # [3, 7, 3] with EOS
    width = lengths[0] + lengths[1]
    arrays = tokenize_sft(records, tokenizer, max_seq_len=width, loss_on="all", pack=True)
    assert arrays["segment_ids"].tolist() == [
        [1] * lengths[0] + [2] * lengths[1],
        [1] * lengths[2] + [0] * (width - lengths[2]),
    ]
    assert arrays["positions"][0].tolist() == list(range(lengths[0])) + list(range(lengths[1]))
    assert arrays["loss_mask"].sum() == sum(lengths)


def test_pairs_share_the_prompt_and_end_in_eos(tokenizer):
    arrays = tokenize_pairs([RECORD], tokenizer, max_seq_len=40)
    for side in ("chosen", "rejected"):
        expected = ids(tokenizer, PROMPT) + ids(tokenizer, getattr(RECORD, side)) + [tokenizer.eos_token_id]
        length = int(arrays[f"{side}_mask"][0].sum())
        assert arrays[f"{side}_ids"][0, :length].tolist() == expected
    with pytest.raises(ValueError, match="record 0 has no rejected"):
        tokenize_pairs([Record(PROMPT, " x", None)], tokenizer, max_seq_len=40)


def test_prompts_are_left_padded_and_long_ones_dropped_or_cut(tokenizer):
    short = Record(PROMPT, " x", None)
    long = Record("\n\nHuman: I am Alice. Please list four colors.\n\nAssistant:", " x", None)
    short_ids, long_ids = ids(tokenizer, short.prompt), ids(tokenizer, long.prompt)
    width = len(short_ids) + 2
    assert len(long_ids) > width
    arrays, kept = tokenize_prompts([long, short], tokenizer, max_prompt_len=width, long_prompt="drop")
    assert kept.tolist() == [1]
    assert arrays["prompt_ids"][0].tolist() == [tokenizer.pad_token_id] * 2 + short_ids
    assert arrays["prompt_mask"][0].tolist() == [0, 0] + [1] * len(short_ids)
    arrays, kept = tokenize_prompts([long, short], tokenizer, max_prompt_len=width, long_prompt="truncate")
    assert kept.tolist() == [0, 1]
    assert arrays["prompt_ids"][0].tolist() == long_ids[-width:]
    with pytest.raises(ValueError, match="every prompt is longer"):
        tokenize_prompts([long], tokenizer, max_prompt_len=width, long_prompt="drop")


def test_a_tokenizers_own_bos_starts_every_sequence(tokenizer):
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )
    prompt = ids(tokenizer, PROMPT)
    sft = tokenize_sft([RECORD], with_bos, max_seq_len=40)
    assert sft["input_ids"][0, : len(prompt) + 1].tolist() == [bos] + prompt
    assert sft["loss_mask"][0, : len(prompt) + 1].sum() == 0
    arrays, _ = tokenize_prompts([RECORD], with_bos, max_prompt_len=4, long_prompt="truncate")
    assert arrays["prompt_ids"][0].tolist() == [bos] + prompt[-3:]


def test_tokenized_arrays_are_cached_by_content(tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    first = tokenize_sft([RECORD], tokenizer, max_seq_len=32, cache_dir=cache)
    (cached_file,) = os.listdir(cache)
    # Overwrite the stored arrays: a second identical call must return them, not re-tokenize.
    np.savez(os.path.join(cache, cached_file), **{name: np.zeros_like(a) for name, a in first.items()})
    assert tokenize_sft([RECORD], tokenizer, max_seq_len=32, cache_dir=cache)["input_ids"].sum() == 0
    fresh = tokenize_sft([RECORD], tokenizer, max_seq_len=33, cache_dir=cache)
    assert fresh["input_ids"].sum() > 0 and len(os.listdir(cache)) == 2
    changed = tokenize_sft([Record(PROMPT, " plum.", None)], tokenizer, max_seq_len=32, cache_dir=cache)
    assert changed["input_ids"].sum() > 0 and len(os.listdir(cache)) == 3


# ---------------------------------------------------------------- batches


def test_resumed_iterator_yields_the_same_batches():
    arrays = {"x": np.arange(10), "y": np.arange(10) * 10}
    uninterrupted = BatchIterator(arrays, batch_size=3, seed=4)
    expected = [next(uninterrupted) for _ in range(8)]  # three per epoch: crosses two epochs
    assert all((batch["y"] == batch["x"] * 10).all() for batch in expected)
    first_epoch = np.concatenate([batch["x"] for batch in expected[:3]])
    assert len(set(first_epoch.tolist())) == 9  # one epoch: distinct rows, the ragged tail dropped

    interrupted = BatchIterator(arrays, batch_size=3, seed=4)
    for _ in range(4):
        next(interrupted)
    saved = dataclasses.asdict(interrupted.position)
    assert saved == {"epoch": 1, "index": 1}
    resumed = BatchIterator(arrays, batch_size=3, seed=4, position=BatchPosition(**saved))
    for batch in expected[4:]:
        assert (next(resumed)["x"] == batch["x"]).all()


def test_each_process_gets_its_share_of_the_global_batch():
    arrays = {"x": np.arange(16)}
    global_batches = [next(BatchIterator(arrays, batch_size=8, seed=1))["x"] for _ in range(1)]
    shares = [next(BatchIterator(arrays, batch_size=8, seed=1, process_index=p, process_count=2))["x"] for p in (0, 1)]
    assert np.concatenate(shares).tolist() == global_batches[0].tolist()
    with pytest.raises(ValueError, match="not divisible by process_count"):
        BatchIterator(arrays, batch_size=8, seed=1, process_count=3)


def test_rows_left_with_nothing_to_learn_after_truncation_are_dropped_and_counted(tokenizer, capsys):
    long_prompt = Record(PROMPT * 6, " apple.", " red.")
    width = len(ids(tokenizer, PROMPT)) + 6
    arrays = tokenize_sft([RECORD, RECORD, long_prompt], tokenizer, max_seq_len=width)
    assert len(arrays["input_ids"]) == 2 and "dropped" not in arrays
    assert "1 of 3 SFT rows had no response token left within max_seq_len" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"2 of 3 SFT rows had no response token left .* \(more than 50%\)"):
        tokenize_sft([RECORD, long_prompt, long_prompt], tokenizer, max_seq_len=width)
    pairs = tokenize_pairs([RECORD, RECORD, long_prompt], tokenizer, max_seq_len=width)
    assert len(pairs["chosen_ids"]) == 2  # the long prompt's two sides became the same tokens
    assert "1 of 3 preference-pair rows became identical" in capsys.readouterr().out


def test_pairs_identical_in_the_data_are_counted_apart_from_those_cut_identical(tokenizer, capsys):
    same = Record(PROMPT, " pear.", " pear.")
    long_prompt = Record(PROMPT * 6, " apple.", " red.")
    width = len(ids(tokenizer, PROMPT)) + 6
    pairs = tokenize_pairs([RECORD, RECORD, RECORD, same, long_prompt], tokenizer, max_seq_len=width)
    assert len(pairs["chosen_ids"]) == 3 and "identical" not in pairs
    out = capsys.readouterr().out
    assert "[data] 1 of 5 preference-pair rows became identical when cut" in out
    assert "[data] 1 of 5 preference-pair rows have the same chosen and rejected text in the data: dropped" in out
    with pytest.raises(ValueError, match=r"2 of 3 .* same chosen and rejected text in the data \(more than 50%\): fix"):
        tokenize_pairs([RECORD, same, same], tokenizer, max_seq_len=width)


def test_no_training_records_counts_the_malformed_rows(tmp_path):
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join(["not json"] * 37 + [json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})]))
    with pytest.raises(ValueError) as error:  # the one good record lands in another step's slice
        step_records([Source(str(path), "rm-static")], "sft", "2,4,4", eval_fraction=0.0, seed=0)
    assert str(error.value) == (
        "data_split '2,4,4' leaves no training records for step 'sft': 0 records of 38 rows read; 37 rows were "
        f"malformed (37 x not valid JSON (Expecting value at column 1); first: {path}:1: not valid JSON (Expecting "
        f"value at column 1), {path}:2: not valid JSON (Expecting value at column 1), {path}:3: not valid JSON "
        "(Expecting value at column 1))"
    )
    path.write_text("\n".join(["not json"] * 37))
    with pytest.raises(ValueError, match=r"no valid record .*: 0 records of 37 rows; 37 rows were malformed \("):
        load_source(Source(str(path), "rm-static"), seed=0)
