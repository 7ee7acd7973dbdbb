"""Turn records into fixed-width int32 token arrays for SFT, the reward model and PPO.

Prompt and response are tokenized separately and concatenated, so the loss-mask boundary is
exact and matches PPO, where the policy continues the prompt's tokens. Any special tokens the
tokenizer itself puts before a text (a BOS, e.g. OPT's "</s>" or Llama's "<s>") start every
sequence; nothing else is added but the EOS after each response. The pad id is the
tokenizer's pad token, or its EOS when it has none; lengths always come from the masks,
never from the ids, since pad may equal EOS.

With a `cache_dir`, results are stored as .npz keyed by a hash of the records, the tokenizer
(its serialized JSON, or its vocabulary) and the settings; an identical call loads them.
"""

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.cache import cached_arrays, content_hash
from jaxrlhf.data.records import Record

LOSS_ON = ("response", "all")
LONG_PROMPT = ("drop", "truncate")

Example = tuple[list[int], list[int]]  # (token ids, loss mask), unpadded


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's serialized form and its special-token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id, _leading_special_ids(tokenizer)])
    return hashlib.sha256((serialized + special).encode()).hexdigest()


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by itself (e.g. a BOS); often none."""
    marked = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return marked[:start]
    return []


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (Meta-Llama-3's has no pad token).
    Safe because answers and padding are read by masks, never by pad ids."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _eos_and_pad(tokenizer) -> tuple[int, int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token")
    return tokenizer.eos_token_id, pad_token_id(tokenizer)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _records_hash(records: Sequence[Record]) -> str:
    return content_hash([record.prompt, record.chosen, record.rejected] for record in records)


def _cache_key(kind: str, records: Sequence[Record], tokenizer, settings: dict) -> str:
    return content_hash([kind, _records_hash(records), tokenizer_fingerprint(tokenizer), settings])


def _check_records(records: Sequence[Record]) -> None:
    if not records:
        raise ValueError("no records to tokenize")


# Rows left with nothing to learn after truncation are dropped; more than this share is an error.
MAX_DROPPED_FRACTION = 0.5


def _count_dropped(arrays: dict[str, np.ndarray], total: int, kind: str, why: str, max_dropped: float):
    """Pops the cached drop counts, reports them, and refuses a set where too much was dropped.
    `identical` (preference pairs only) counts the dropped pairs whose two texts were the same in the data."""
    dropped = int(arrays.pop("dropped", np.zeros(1))[0])  # caches written before drops were counted lack it
    identical = int(arrays.pop("identical", np.zeros(1))[0])
    causes = [f"{dropped - identical} of {total} {kind} rows {why}"] if dropped > identical else []
    if identical:
        causes.append(f"{identical} of {total} {kind} rows have the same chosen and rejected text in the data")
    if dropped and dropped > max_dropped * total:
        fix = "raise max_seq_len or shorten the prompts" if dropped > 2 * identical else "fix the data"
        raise ValueError(f"{'; '.join(causes)} (more than {max_dropped:.0%}): {fix}")
    for cause in causes:
        print(f"[data] {cause}: dropped", flush=True)
    return arrays


def _check_width(name: str, width: int) -> None:
    if width < 1:
        raise ValueError(f"{name} must be positive, got {width}")


def _right_padded(examples: Sequence[Example], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, padded on the right to `width` (examples are already cut to fit)."""
    input_ids = np.full((len(examples), width), pad_id, np.int32)  # [n, width]
    attention_mask = np.zeros((len(examples), width), np.int32)
    loss_mask = np.zeros((len(examples), width), np.int32)
    for row, (ids, targets) in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = targets
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _packed(examples: Sequence[Example], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Whole examples, in order, placed into rows of `width` until the next one does not fit.

    No example crosses a row boundary. `segment_ids` numbers the examples in a row from 1
    (0 on padding) and `positions` restarts at 0 for each one; a model that masks attention
    between different segment ids sees every example alone.
    """
    rows: list[list[Example]] = []
    used = width
    for example in examples:
        if used + len(example[0]) > width:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += len(example[0])

    arrays = {
        name: np.zeros((len(rows), width), np.int32)  # [rows, width]
        for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")
    }
    arrays["input_ids"][:] = pad_id
    for row, row_examples in enumerate(rows):
        start = 0
        for segment, (ids, targets) in enumerate(row_examples, start=1):
            end = start + len(ids)
            arrays["input_ids"][row, start:end] = ids
            arrays["attention_mask"][row, start:end] = 1
            arrays["loss_mask"][row, start:end] = targets
            arrays["segment_ids"][row, start:end] = segment
            arrays["positions"][row, start:end] = np.arange(len(ids))
            start = end
    return arrays


def tokenize_sft(
    records: Sequence[Record],
    tokenizer,
    max_seq_len: int,
    loss_on: str = "response",
    pack: bool = False,
    cache_dir: str | None = None,
    max_dropped: float = MAX_DROPPED_FRACTION,
) -> dict[str, np.ndarray]:
    """SFT rows: prompt + chosen + EOS, cut to `max_seq_len` (keeping the start).

    Returns int32 {input_ids, attention_mask, loss_mask}, each [rows, max_seq_len], right
    padded. loss_mask is 1 on the tokens to predict: the response and its EOS with
    loss_on="response", every non-pad token with loss_on="all" (DeepSpeed-Chat's choice).
    A row whose response was cut away entirely (a prompt of max_seq_len tokens or more) has
    nothing to learn: it is dropped and counted, and more than `max_dropped` of them is an error.
    With `pack=True` several examples share a row and `segment_ids`, `positions` are added
    (see `_packed`).
    """
    _check_records(records)
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    _check_width("max_seq_len", max_seq_len)
    eos, pad = _eos_and_pad(tokenizer)
    prefix = _leading_special_ids(tokenizer)
    settings = {"max_seq_len": max_seq_len, "loss_on": loss_on, "pack": pack}

    def build() -> dict[str, np.ndarray]:
        prompts = _encode(tokenizer, [record.prompt for record in records])
        responses = _encode(tokenizer, [record.chosen for record in records])
        examples = []
        for prompt, response in zip(prompts, responses, strict=True):
            ids = prefix + prompt + response + [eos]
            if loss_on == "all":
                targets = [1] * len(ids)
            else:
                targets = [0] * (len(prefix) + len(prompt)) + [1] * (len(response) + 1)
            if any(targets[:max_seq_len]):
                examples.append((ids[:max_seq_len], targets[:max_seq_len]))
        arrays = _packed(examples, max_seq_len, pad) if pack else _right_padded(examples, max_seq_len, pad)
        return {**arrays, "dropped": np.array([len(records) - len(examples)])}

    arrays = cached_arrays(cache_dir, "sft", _cache_key("sft", records, tokenizer, settings), build)
    why = f"had no response token left within max_seq_len={max_seq_len}"
    return _count_dropped(arrays, len(records), "SFT" if loss_on == "response" else "text", why, max_dropped)


def tokenize_pretraining(
    texts: Sequence[str], tokenizer, max_seq_len: int, pack: bool = True, cache_dir: str | None = None
) -> dict[str, np.ndarray]:
    """Plain texts for PPO's pretraining (PTX) loss: text + EOS, loss on every token, packed."""
    records = [Record(prompt="", chosen=text, rejected=None) for text in texts]
    return tokenize_sft(records, tokenizer, max_seq_len, loss_on="all", pack=pack, cache_dir=cache_dir)


def tokenize_pairs(
    records: Sequence[Record],
    tokenizer,
    max_seq_len: int,
    cache_dir: str | None = None,
    max_dropped: float = MAX_DROPPED_FRACTION,
    drop_identical: bool = True,
    answer_masks: bool = False,
) -> dict[str, np.ndarray]:
    """Preference pairs: prompt + chosen + EOS and prompt + rejected + EOS.

    Returns int32 {chosen_ids, chosen_mask, rejected_ids, rejected_mask}, each
    [pairs, max_seq_len], right padded and cut to `max_seq_len` (keeping the start); with
    `answer_masks` (DPO) also {chosen,rejected}_loss_mask, 1 on each answer and its EOS. A pair
    whose two sides are the same after the cut compares nothing, and with `answer_masks` one
    whose side lost its whole answer says nothing: it is dropped and counted (pairs whose two texts
    were already the same in the data counted apart), and more than `max_dropped` of them is an error.
    """
    _check_records(records)
    for index, record in enumerate(records):
        if record.rejected is None:
            raise ValueError(f"record {index} has no rejected response; preference data needs pairs")
    _check_width("max_seq_len", max_seq_len)
    eos, pad = _eos_and_pad(tokenizer)
    prefix = _leading_special_ids(tokenizer)
    settings = {
        "max_seq_len": max_seq_len,
        "drop_identical": drop_identical,
        **({"answer_masks": True} if answer_masks else {}),
    }

    def build() -> dict[str, np.ndarray]:
        prompts = _encode(tokenizer, [record.prompt for record in records])
        sides = {}
        for side in ("chosen", "rejected"):
            answers = _encode(tokenizer, [getattr(record, side) for record in records])
            sides[side] = [
                (
                    (prefix + prompt + answer + [eos])[:max_seq_len],
                    ([0] * (len(prefix) + len(prompt)) + [1] * (len(answer) + 1))[:max_seq_len],
                )
                for prompt, answer in zip(prompts, answers, strict=True)
            ]
        chosen, rejected = sides["chosen"], sides["rejected"]
        kept = [
            row
            for row in range(len(records))
            if (not drop_identical or chosen[row][0] != rejected[row][0])
            and (not answer_masks or (any(chosen[row][1]) and any(rejected[row][1])))
        ]
        same_text = sum(record.chosen == record.rejected for record in records) if drop_identical else 0
        arrays = {"dropped": np.array([len(records) - len(kept)]), "identical": np.array([same_text])}
        for side, rows in sides.items():
            padded = _right_padded([rows[row] for row in kept], max_seq_len, pad)
            arrays[f"{side}_ids"], arrays[f"{side}_mask"] = padded["input_ids"], padded["attention_mask"]
            if answer_masks:
                arrays[f"{side}_loss_mask"] = padded["loss_mask"]
        return arrays

    arrays = cached_arrays(cache_dir, "pairs", _cache_key("pairs", records, tokenizer, settings), build)
    why = f"became identical{' or lost their answer' if answer_masks else ''} when cut to max_seq_len={max_seq_len}"
    return _count_dropped(arrays, len(records), "preference-pair", why, max_dropped)


def tokenize_prompts(
    records: Sequence[Record],
    tokenizer,
    max_prompt_len: int,
    long_prompt: str = "drop",
    cache_dir: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """PPO prompts, LEFT padded to `max_prompt_len` so generation continues from the last column.

    Prompts longer than `max_prompt_len` are dropped (long_prompt="drop") or cut to their last
    tokens (long_prompt="truncate"; leading special tokens such as a BOS are kept).
    Returns (int32 {prompt_ids, prompt_mask} of [kept, max_prompt_len], the kept records'
    indices into `records`).
    """
    _check_records(records)
    if long_prompt not in LONG_PROMPT:
        raise ValueError(f"long_prompt must be one of {LONG_PROMPT}, got {long_prompt!r}")
    _, pad = _eos_and_pad(tokenizer)
    prefix = _leading_special_ids(tokenizer)
    if max_prompt_len <= len(prefix):
        raise ValueError(f"max_prompt_len {max_prompt_len} leaves no room after the special tokens {prefix}")
    settings = {"max_prompt_len": max_prompt_len, "long_prompt": long_prompt}

    def build() -> dict[str, np.ndarray]:
        room = max_prompt_len - len(prefix)
        kept, prompts = [], []
        for index, prompt in enumerate(_encode(tokenizer, [record.prompt for record in records])):
            if len(prompt) > room and long_prompt == "drop":
                continue
            kept.append(index)
            prompts.append(prefix + prompt[-room:])
        if not prompts:
            raise ValueError(f"every prompt is longer than max_prompt_len={max_prompt_len} and was dropped")
        prompt_ids = np.full((len(prompts), max_prompt_len), pad, np.int32)  # [kept, max_prompt_len]
        prompt_mask = np.zeros((len(prompts), max_prompt_len), np.int32)
        for row, ids in enumerate(prompts):
            prompt_ids[row, max_prompt_len - len(ids) :] = ids
            prompt_mask[row, max_prompt_len - len(ids) :] = 1
        return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "record_index": np.array(kept, np.int64)}

    arrays = cached_arrays(cache_dir, "prompts", _cache_key("prompts", records, tokenizer, settings), build)
    kept = arrays.pop("record_index")
    return arrays, kept
