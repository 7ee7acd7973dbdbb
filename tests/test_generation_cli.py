"""chat and prompt_eval on tiny models, and the prompt batching they share."""

import io

import numpy as np
import pytest
from hf_fixtures import save_tiny_model, train_tiny_tokenizer

from jaxrlhf.cli import chat, prompt_eval
from jaxrlhf.generation.prompting import decode_answers, left_padded_batch


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    dirs = [save_tiny_model("llama_gqa_llama3", root), save_tiny_model("opt", root)]
    for path in dirs:
        train_tiny_tokenizer(path)
    return dirs


def test_left_padded_batch_and_answer_decoding(model_dirs):
    from jaxrlhf.models import load_tokenizer

    tokenizer = load_tokenizer(model_dirs[0])
    ids, mask = left_padded_batch(tokenizer, ["Human: hello there.", "hi"])
    assert mask[0].all() and mask[1, -1] == 1 and mask[1, 0] == 0  # the short prompt is padded on the left
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    eos = tokenizer.eos_token_id
    answer_ids = tokenizer("hi, how", add_special_tokens=False)["input_ids"]
    tokens = np.array([[5, *answer_ids, eos, eos]])  # pad == eos after the answer: the mask decides
    answer_mask = np.array([[1] + [1] * len(answer_ids) + [1, 0]])
    assert decode_answers(tokenizer, tokens, answer_mask, prompt_len=1) == ["hi, how"]


def test_conversation_prompt_carries_earlier_turns():
    prompt = chat.conversation_prompt([("Hi", "Hello!")], "List two fruits.")
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: List two fruits.\n\nAssistant:"
    assert chat.clean_answer(" apple, pear.\n\nHuman: more") == "apple, pear."


def test_chat_over_a_pipe(model_dirs, monkeypatch, capsys):
    prompts_seen, answers_given = [], []
    real_answers = chat.TextGenerator.answers

    def recording_answers(self, prompts):
        prompts_seen.extend(prompts)
        answers_given.extend(real_answers(self, prompts))
        return answers_given[-len(prompts) :]

    monkeypatch.setattr(chat.TextGenerator, "answers", recording_answers)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nhow are you\nclear\nbye\nquit\nnever read\n"))
    assert chat.main([model_dirs[0], "--greedy", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant:") == 3 and "(conversation cleared)" in out
    first_turn = ("hello there", chat.clean_answer(answers_given[0]))
    assert prompts_seen[1] == chat.conversation_prompt([first_turn], "how are you")
    assert prompts_seen[2] == chat.conversation_prompt([], "bye")  # `clear` forgot the first two turns


def test_prompt_eval_side_by_side(model_dirs, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Human: hello\nHuman: how are you\n")
    assert prompt_eval.main([*model_dirs, "--prompts", str(prompts), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("==== prompt") == 2 and out.count("baseline:") == 2 and out.count("finetuned:") == 2


def test_prompt_eval_missing_directory(model_dirs, capsys):
    assert prompt_eval.main(["/no/such/model", model_dirs[1]]) == 2
    assert "/no/such/model: model directory does not exist" in capsys.readouterr().err


def test_a_tokenizer_without_pad_token_pads_and_generates_with_eos(model_dirs, tmp_path):
    """Meta-Llama-3's tokenizer has no pad token: prompts are padded with EOS and generation runs
    (the pad id once reached `generate` as None on the PPO path)."""
    import shutil

    from jaxrlhf.data.tokenize import pad_token_id
    from jaxrlhf.generation.prompting import TextGenerator
    from jaxrlhf.models import load_tokenizer

    path = str(tmp_path / "no_pad")
    shutil.copytree(model_dirs[0], path)
    tokenizer = load_tokenizer(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id is None and pad_token_id(tokenizer) == tokenizer.eos_token_id
    ids, mask = left_padded_batch(tokenizer, ["Human: hello there.", "hi"])
    assert (ids[mask == 0] == tokenizer.eos_token_id).all()
    answers = TextGenerator(path, max_new_tokens=4, greedy=True).answers(["Human: hello there.", "hi"])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
