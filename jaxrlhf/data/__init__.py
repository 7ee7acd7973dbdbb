"""Data: DeepSpeed-Chat layouts from local files, data_split, tokenization, batching, built-in task."""

from jaxrlhf.data.batches import BatchIterator, BatchPosition
from jaxrlhf.data.builtin import (
    BUILTIN,
    builtin_pretraining_texts,
    builtin_records,
    builtin_tokenizer,
    gold_reward,
)
from jaxrlhf.data.records import BadRecordReport, Record
from jaxrlhf.data.sources import LAYOUT_NAMES, DataSource, load_source
from jaxrlhf.data.split import STEPS, StepData, parse_data_split, step_records
from jaxrlhf.data.tokenize import (
    tokenize_pairs,
    tokenize_pretraining,
    tokenize_prompts,
    tokenize_sft,
)

__all__ = [
    "BUILTIN",
    "BadRecordReport",
    "BatchIterator",
    "BatchPosition",
    "DataSource",
    "Record",
    "STEPS",
    "StepData",
    "LAYOUT_NAMES",
    "builtin_pretraining_texts",
    "builtin_records",
    "builtin_tokenizer",
    "gold_reward",
    "load_source",
    "parse_data_split",
    "step_records",
    "tokenize_pairs",
    "tokenize_pretraining",
    "tokenize_prompts",
    "tokenize_sft",
]
