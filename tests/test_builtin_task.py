"""The built-in task: determinism, the gold reward, pair labels, the tokenizer, learnability."""

import collections
import dataclasses
import json
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxrlhf.data import (
    builtin_pretraining_texts,
    builtin_records,
    builtin_tokenizer,
    gold_reward,
    step_records,
)
from jaxrlhf.data.builtin import CATEGORIES, NAMES


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    layout: str
    weight: float = 1.0


NAMED_PROMPT = "\n\nHuman: I am Alice. List three fruits.\n\nAssistant:"
PLAIN_PROMPT = "\n\nHuman: Name two colors.\n\nAssistant:"

# (prompt, response, gold reward worked out by hand from the module docstring's table)
GOLD_CASES = [
    (NAMED_PROMPT, " Hi Alice! apple, pear, plum. Hope this helps!", 1 + 1 + 1 + 1 + 0.5),
    (NAMED_PROMPT, " Hi Alice! apple, pear. Hope this helps!", 0.5 + 1 + 1 + 1 + 0.5),  # too few
    (NAMED_PROMPT, " Hi Alice! apple, pear, plum, lemon. Hope this helps!", 0.5 + 1 + 1 + 1 + 0.5),  # too many
    (NAMED_PROMPT, " Hi Alice! apple, pear, red. Hope this helps!", 1 + 2 / 3 + 1 + 1 + 0.5),  # off category
    (NAMED_PROMPT, " Hi Alice! apple, pear, apple. Hope this helps!", 1 + 1 + 2 / 3 + 1 + 0.5),  # repeat
    (NAMED_PROMPT, " Hi Alice! apple, pear, plum.", 1 + 1 + 1 + 0 + 0.5),  # no closing
    (NAMED_PROMPT, " Hi Alice! apple, pear, plum. Whatever.", 1 + 1 + 1 - 1 + 0.5),  # rude
    (NAMED_PROMPT, " apple, pear, plum. Hope this helps!", 1 + 1 + 1 + 1 + 0),  # no greeting
    (NAMED_PROMPT, " Hi Bob! apple, pear, plum. Hope this helps!", 1 + 1 + 1 + 1 - 0.5),  # wrong name
    (NAMED_PROMPT, " Hi Alice! um, apple, pear, plum. Hope this helps!", 4.5 - 0.5),  # filler
    (NAMED_PROMPT, " Hi Alice! apple, pear, plum. Hope this helps! Hope this helps!", 4.5 - 1.5),  # rambling
    (PLAIN_PROMPT, " red, blue. Have a nice day!", 1 + 1 + 1 + 1),
    (PLAIN_PROMPT, " Hi Carol! red, blue. Have a nice day!", 1 + 1 + 1 + 1 - 0.5),  # made-up name
    (PLAIN_PROMPT, "", 0.0),  # nothing: no items at all
]


@pytest.fixture(scope="module")
def records():
    return builtin_records(size=2000, seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return builtin_tokenizer(str(tmp_path_factory.mktemp("builtin_tokenizer")))


def test_records_and_texts_are_deterministic_for_a_seed(records):
    assert builtin_records(size=2000, seed=0) == records
    assert builtin_records(size=2000, seed=1) != records
    assert builtin_pretraining_texts(50, seed=3) == builtin_pretraining_texts(50, seed=3)
    assert len(builtin_pretraining_texts(50, seed=3)) == 50


@pytest.mark.parametrize("prompt, response, expected", GOLD_CASES)
def test_gold_reward_hand_worked_cases(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_a_perfect_answer_beats_every_defective_variant():
    perfect = gold_reward(*GOLD_CASES[0][:2])
    for prompt, response, _ in GOLD_CASES[1:11]:
        assert gold_reward(prompt, response) < perfect, response
    with pytest.raises(ValueError, match="not a built-in task prompt"):
        gold_reward("\n\nHuman: Tell me a joke.\n\nAssistant:", " No.")


def test_pair_labels_follow_the_gold_reward_up_to_the_label_noise(records):
    chosen = np.array([gold_reward(r.prompt, r.chosen) for r in records])
    rejected = np.array([gold_reward(r.prompt, r.rejected) for r in records])
    assert (chosen != rejected).all()  # ties are skipped
    assert 0.965 <= np.mean(chosen > rejected) <= 0.995  # 2% of labels flipped
    clean = builtin_records(size=500, seed=0, label_noise=0.0)
    assert all(gold_reward(r.prompt, r.chosen) > gold_reward(r.prompt, r.rejected) for r in clean)
    # Mixed quality: the chosen responses, which SFT imitates, are often not perfect.
    best = np.array([4.5 if re.search(r"I am|My name is", r.prompt) else 4.0 for r in records])
    assert 0.1 < np.mean(chosen == best) < 0.5


def test_held_out_prompts_are_not_all_seen_in_training():
    builtin = Source("builtin:2000", "builtin")
    data = step_records([builtin], "ppo", "2,4,4", eval_fraction=0.2, seed=0)
    assert (len(data.train), len(data.eval)) == (640, 160)
    train_prompts = set()
    for step in ("sft", "rm", "ppo"):
        train_prompts |= {r.prompt for r in step_records([builtin], step, "2,4,4", eval_fraction=0.2, seed=0).train}
    novel = np.mean([r.prompt not in train_prompts for r in data.eval])
    assert novel > 0.15


def test_tokenizer_loads_round_trips_and_keeps_sequences_short(tokenizer_dir, records):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("apple")["input_ids"] == tokenizer("apple", add_special_tokens=False)["input_ids"]  # no BOS
    assert 400 <= len(tokenizer) <= 1024
    for word in [w for words in CATEGORIES.values() for w in words] + list(NAMES):
        assert len(tokenizer(" " + word)["input_ids"]) == 1, word
    for record in records[:200]:
        text = record.prompt + record.chosen
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    longest = max(len(tokenizer(r.prompt + r.chosen)["input_ids"]) for r in records)
    assert longest + 1 <= 48  # with EOS

    again = builtin_tokenizer(tokenizer_dir + "_again")
    with open(f"{tokenizer_dir}/tokenizer.json") as first, open(f"{again}/tokenizer.json") as second:
        assert json.load(first) == json.load(second)


def test_bag_of_words_logistic_regression_separates_chosen_from_rejected(records):
    """Evidence the preference is learnable from the text alone: a linear Bradley-Terry model."""
    vocabulary = {}
    counts = []
    for record in records:
        for response in (record.chosen, record.rejected):
            words = collections.Counter(re.findall(r"[A-Za-z]+|[,.!]", response))
            counts.append({vocabulary.setdefault(word, len(vocabulary)): n for word, n in words.items()})
    bags = np.zeros((len(counts), len(vocabulary)))
    for row, row_counts in enumerate(counts):
        bags[row, list(row_counts)] = list(row_counts.values())
    differences = bags[0::2] - bags[1::2]  # [pairs, vocabulary]: chosen minus rejected
    train, held_out = differences[:1500], differences[1500:]

    weights = np.zeros(len(vocabulary))
    for _ in range(500):  # gradient ascent on mean log sigmoid(w . (chosen - rejected))
        weights += 0.5 * train.T @ (1 - 1 / (1 + np.exp(-train @ weights))) / len(train)
    assert np.mean(held_out @ weights > 0) > 0.8
