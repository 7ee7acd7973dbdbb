"""The built-in task: short list requests with a known gold reward, small enough for a CPU.

A prompt asks for a number of things from a category, sometimes after the user gives a name:

    "\\n\\nHuman: I am Alice. List three fruits.\\n\\nAssistant:"

A perfect response greets the user by that name, lists exactly that many distinct items of
the category, and closes politely:

    " Hi Alice! apple, pear, plum. Hope this helps!"

`gold_reward(prompt, response)` is the sum of six parts (best 4.5 with a name, 4 without):

    count     1 - 0.5 * |items - asked|, floored at 0
    category  share of the items that belong to the asked category
    distinct  share of the items that are not repeats of an earlier item
    closing   +1 for a polite closing, -1 for a rude one, 0 for none
    greeting  +0.5 for "Hi <name>!" with the user's name, -0.5 for any other name, 0 for none
    length    -0.5 for every stray word (filler, text after the closing, a second greeting)

Items are the lower-case category words; everything else except the greeting and the
closing is a stray word. The gold reward is for evaluation only: no training step calls it.
`format_reward` is the task's public rule reward, a visible slice of it (greeting + closing)
that step 3 may use as a reward function beside the reward model.

The data comes from a sloppy writer: every response has, independently, a chance of each
defect (wrong count, an item from another category, a repeat, no or a rude closing, no or a
wrong greeting, a filler word). Each record pairs two such responses to one prompt, ranked
by the gold reward (ties skipped, a few percent of labels flipped), so SFT on the chosen
responses gives a mediocre policy, and the defects are visible in the text for a reward model.
The defect rates are set so that the easy signals (closing, filler, greeting) decide most
pairs: a 2-layer, 64-wide reward model trained from scratch reaches about 0.88 held-out
accuracy after 150 steps and 0.90 after 900 (batch 32, two CPU cores, about two minutes),
while count, category, repeat and wrong-name errors are rarer and slower to learn.

There are (3 + 3 * 20) openers x 5 phrasings x 3 counts x 6 categories x 3 thanks = 17010
distinct prompts. With the default 10k records about half of the held-out prompts also
occur in training (nearly all of those without a name do; fine for a templated task) and
the rest are new combinations.
"""

import os
import re

import numpy as np
import tokenizers
from transformers import PreTrainedTokenizerFast

from jaxrlhf.data.records import Record

BUILTIN = "builtin"  # the name of the built-in task (a data layout and path) and of the built-in model

CATEGORIES = {
    "fruits": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry"),
    "colors": ("red", "blue", "green", "yellow", "pink", "brown", "black", "white"),
    "animals": ("cat", "dog", "horse", "mouse", "tiger", "lion", "sheep", "goat"),
    "tools": ("hammer", "saw", "drill", "wrench", "knife", "rope", "shovel", "ladder"),
    "drinks": ("tea", "coffee", "milk", "juice", "water", "soda", "cocoa", "wine"),
    "vehicles": ("car", "bus", "train", "boat", "bike", "truck", "plane", "tram"),
}
ITEM_CATEGORY = {item: category for category, items in CATEGORIES.items() for item in items}
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Ivy",
    "Jack",
    "Kate",
    "Leo",
    "Mia",
    "Nick",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tina",
    "Victor",
)
NAMED_OPENERS = ("I am {name}. ", "Hi, I am {name}. ", "My name is {name}. ")
PLAIN_OPENERS = ("", "Hello! ", "Quick question: ")
REQUESTS = (
    "List {count} {category}.",
    "Name {count} {category}.",
    "Give me {count} {category}.",
    "Please list {count} {category}.",
    "Can you name {count} {category}?",
)
THANKS = ("", " Thanks!", " Thank you.")
POLITE_CLOSINGS = ("Hope this helps!", "Have a nice day!", "Happy to help!")
RUDE_CLOSINGS = ("Whatever.", "Stop asking.")
FILLERS = ("um", "well")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# 10k records leave the reward model (40% of them with data_split "2,4,4") enough pairs to
# generalize; with 4k a tiny reward model overfits.
DEFAULT_SIZE = 10_000

# The sloppy writer's defect rates, each drawn independently per response.
NAME_RATE = 0.6  # prompts that give a name
WRONG_COUNT_RATE = 0.15  # one item too few (70%) or too many
OFF_CATEGORY_RATE = 0.15  # one item replaced by an item of another category
REPEAT_RATE = 0.1  # one item replaced by an earlier one
CLOSING_RATES = {"polite": 0.35, "none": 0.35, "rude": 0.3}
GREETING_RATES = {"right": 0.7, "none": 0.2, "wrong": 0.1}  # when the prompt gives a name
FILLER_RATE = 0.35  # a filler word before the list

_NAME_PATTERN = re.compile(r"(?:I am|My name is) ([A-Z][a-z]+)\.")
_REQUEST_PATTERN = re.compile(rf"({'|'.join(COUNT_WORDS)}) ({'|'.join(CATEGORIES)})\b")
_GREETING_PATTERN = re.compile(r"\s*Hi ([A-Za-z]+)!")


def format_prompt(question: str) -> str:
    """DeepSpeed-Chat's (Anthropic HH) prompt format; responses start with a space."""
    return f"\n\nHuman: {question}\n\nAssistant:"


def gold_reward(prompt: str, response: str) -> float:
    """The task's true reward of `response` to a built-in `prompt` (see the module docstring)."""
    return sum(_gold_parts(prompt, response).values())  # in the table's order, as the parts were always added


def format_reward(prompts: list[str], answers: list[str], **fields) -> list[float]:
    """The task's public rule reward: the greeting and closing parts of the gold reward.

    A reward function (see jaxrlhf.rl.rewards) that checks only what the text shows plainly:
    +0.5 for greeting the user by the prompt's name, -0.5 for another name, and +1 / -1 for a
    polite / rude closing. The count, category, repeat and length parts stay hidden: the full
    gold reward is for evaluation only and never feeds training.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"format_reward: {len(prompts)} prompts but {len(answers)} answers")
    scores = []
    for prompt, answer in zip(prompts, answers):
        greeting, closing, _ = _greeting_and_closing(prompt, answer)
        scores.append(greeting + closing)
    return scores


def _greeting_and_closing(prompt: str, response: str) -> tuple[float, float, str]:
    """(greeting part, closing part, the text between them) of `response` to `prompt`."""
    name_given = _NAME_PATTERN.search(prompt)
    user_name = name_given.group(1) if name_given else None
    text = response.strip()
    greeting = 0.0
    greeted = _GREETING_PATTERN.match(text)
    if greeted:
        greeting = 0.5 if greeted.group(1) == user_name else -0.5
        text = text[greeted.end() :]
    closing = 0.0
    text = text.strip()
    for ending, score in [(c, 1.0) for c in POLITE_CLOSINGS] + [(c, -1.0) for c in RUDE_CLOSINGS]:
        if text.endswith(ending):
            closing = score
            text = text[: -len(ending)]
            break
    return greeting, closing, text


def _gold_parts(prompt: str, response: str) -> dict[str, float]:
    """The six parts of the gold reward, by the names of the module docstring's table."""
    request = _REQUEST_PATTERN.search(prompt)
    if request is None:
        raise ValueError(f"not a built-in task prompt (no '<count> <category>'): {prompt!r}")
    asked = COUNT_WORDS[request.group(1)]
    category = request.group(2)
    greeting, closing, text = _greeting_and_closing(prompt, response)
    words = re.findall(r"[A-Za-z]+", text)
    items = [word for word in words if word in ITEM_CATEGORY]
    return {
        "count": max(0.0, 1.0 - 0.5 * abs(len(items) - asked)),
        "category": sum(ITEM_CATEGORY[item] == category for item in items) / max(len(items), 1),
        "distinct": len(set(items)) / max(len(items), 1),
        "closing": closing,
        "greeting": greeting,
        "length": -0.5 * (len(words) - len(items)),
    }


def _choice(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _weighted(rng: np.random.Generator, rates: dict[str, float]) -> str:
    """A key of `rates` drawn with the given probabilities (they sum to 1)."""
    draw = rng.random()
    for key, rate in rates.items():
        if draw < rate:
            return key
        draw -= rate
    return key  # reached only through rounding


def _sample_prompt(rng: np.random.Generator) -> tuple[str, str | None, int, str]:
    """A random prompt: (formatted prompt, user name or None, asked count, category)."""
    name = _choice(rng, NAMES) if rng.random() < NAME_RATE else None
    count_word = _choice(rng, list(COUNT_WORDS))
    category = _choice(rng, list(CATEGORIES))
    opener = _choice(rng, NAMED_OPENERS).format(name=name) if name else _choice(rng, PLAIN_OPENERS)
    request = _choice(rng, REQUESTS).format(count=count_word, category=category)
    question = opener + request + _choice(rng, THANKS)
    return format_prompt(question), name, COUNT_WORDS[count_word], category


def _sloppy_response(rng: np.random.Generator, name: str | None, asked: int, category: str) -> str:
    """One response by the sloppy writer, with each defect drawn independently."""
    length = asked
    if rng.random() < WRONG_COUNT_RATE:
        length += -1 if rng.random() < 0.7 else 1
    items = [str(item) for item in rng.choice(CATEGORIES[category], size=length, replace=False)]
    if rng.random() < OFF_CATEGORY_RATE:
        other = _choice(rng, [c for c in CATEGORIES if c != category])
        items[rng.integers(length)] = _choice(rng, CATEGORIES[other])
    if length > 1 and rng.random() < REPEAT_RATE:
        position = int(rng.integers(1, length))
        items[position] = items[rng.integers(position)]

    parts = []
    if name is not None:
        greeting = _weighted(rng, GREETING_RATES)
        if greeting == "right":
            parts.append(f"Hi {name}!")
        elif greeting == "wrong":
            parts.append(f"Hi {_choice(rng, [n for n in NAMES if n != name])}!")
    if rng.random() < FILLER_RATE:
        parts.append(_choice(rng, FILLERS) + ",")
    parts.append(", ".join(items) + ".")
    closing = _weighted(rng, CLOSING_RATES)
    if closing == "polite":
        parts.append(_choice(rng, POLITE_CLOSINGS))
    elif closing == "rude":
        parts.append(_choice(rng, RUDE_CLOSINGS))
    return " " + " ".join(parts)


def builtin_records(size: int = DEFAULT_SIZE, seed: int = 0, label_noise: float = 0.02) -> list[Record]:
    """`size` preference records: two sloppy responses per prompt, chosen = higher gold reward.

    Pairs with equal gold reward are skipped; a `label_noise` share of the kept pairs have
    chosen and rejected swapped. Deterministic for a seed.
    """
    if size < 1:
        raise ValueError(f"builtin size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    records = []
    while len(records) < size:
        prompt, name, asked, category = _sample_prompt(rng)
        first = _sloppy_response(rng, name, asked, category)
        second = _sloppy_response(rng, name, asked, category)
        first_reward, second_reward = gold_reward(prompt, first), gold_reward(prompt, second)
        if abs(first_reward - second_reward) < 1e-9:
            continue
        chosen, rejected = (first, second) if first_reward > second_reward else (second, first)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        records.append(Record(prompt=prompt, chosen=chosen, rejected=rejected))
    return records


def builtin_pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """`n` plain sentences about the task's words, for PPO's pretraining (PTX) loss."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        category = _choice(rng, list(CATEGORIES))
        first, second, third = rng.choice(CATEGORIES[category], size=3, replace=False)
        if rng.random() < 0.5:
            texts.append(f"{first}, {second} and {third} are {category}.")
        else:
            texts.append(f"{_choice(rng, NAMES)} likes {first} and {second}.")
    return texts


def builtin_tokenizer(directory: str, vocab_size: int = 1024, seed: int = 0) -> str:
    """Train a byte-level BPE on the task's text and save it in Hugging Face format.

    Special tokens: EOS "<|endoftext|>" and PAD "<|pad|>" (pad != eos); no BOS is added.
    `vocab_size` is an upper bound: the merges run out at about 650 tokens, when every word of
    the task is one token (read the size from `len(tokenizer)`).
    `transformers.AutoTokenizer.from_pretrained(directory)` loads the result. Returns `directory`.
    """
    corpus = [word for words in CATEGORIES.values() for word in words]
    corpus += list(NAMES) + list(POLITE_CLOSINGS) + list(RUDE_CLOSINGS)
    for record in builtin_records(size=2000, seed=seed):
        corpus += [record.prompt + record.chosen, record.prompt + record.rejected]
    corpus += builtin_pretraining_texts(500, seed=seed)

    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)

    os.makedirs(directory, exist_ok=True)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    wrapped.save_pretrained(directory)
    return directory
