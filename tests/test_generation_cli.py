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


def test_prompt_eval_refill_gives_the_static_answers(model_dirs, tmp_path, capsys):
    """Greedy answers to three prompts, by 2 refilled slots and statically: the same text."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Human: hello\nHuman: how are you\nHuman: tell me a story\n")
    outputs = []
    for engine in (["--engine", "static"], ["--engine", "refill", "--slots", "2"]):
        assert prompt_eval.main([*model_dirs, "--prompts", str(prompts), "--max-new-tokens", "6", *engine]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("==== prompt") == 3


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


def no_model_loads(monkeypatch):
    """Makes loading a model a test failure: every input is to be checked before one loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before every input was checked")

    monkeypatch.setattr(chat, "TextGenerator", refuse)
    monkeypatch.setattr(prompt_eval, "TextGenerator", refuse)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def test_prompt_eval_checks_the_second_model_before_loading_the_first(model_dirs, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    assert prompt_eval.main([model_dirs[0], "/no/such/model"]) == 2
    assert "/no/such/model: model directory does not exist" in one_error_line(capsys)
    assert prompt_eval.main([model_dirs[0], str(model_dirs[0]) + "/.."]) == 2  # a directory without config.json
    assert "config.json" in one_error_line(capsys)


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("empty.txt", b"", "empty.txt: no prompts"),
        ("blank.txt", b"\n   \n", "blank.txt: no prompts"),
        ("latin1.txt", b"Human: hello\n\nHuman: caf\xe9\n", "latin1.txt:3: not UTF-8 (byte 0xe9 at column 11)"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n', "bad.jsonl:2: not valid JSON"),
        ("no_field.jsonl", b'{"prompt": "a"}\n\n{"text": "b"}\n', "no_field.jsonl:3:"),
        ("not_text.jsonl", b'{"prompt": 3}\n', "not_text.jsonl:1:"),
        ("a_list.jsonl", b'["a"]\n', "a_list.jsonl:1:"),
    ],
)
def test_prompt_eval_names_the_bad_prompts_line_before_loading(
    model_dirs, tmp_path, monkeypatch, capsys, name, content, named
):
    no_model_loads(monkeypatch)
    path = tmp_path / name
    path.write_bytes(content)
    assert prompt_eval.main([*model_dirs, "--prompts", str(path)]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "nan"),
        ("--temperature", "0"),
        ("--temperature", "-0.5"),
        ("--top-k", "-1"),
        ("--max-new-tokens", "0"),
        ("--tensor-parallel", "0"),
    ],
)
def test_chat_refuses_a_sampling_value_out_of_range(model_dirs, monkeypatch, capsys, flag, value):
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        chat.main([model_dirs[0], flag, value])
    assert exit.value.code == 2
    assert flag in one_error_line(capsys)


def test_sampling_values_at_the_edges_of_their_range_are_accepted(model_dirs, monkeypatch):
    made = []
    monkeypatch.setattr(chat, "TextGenerator", lambda *args, **sampling: made.append(sampling))
    monkeypatch.setattr("sys.stdin", io.StringIO("quit\n"))
    assert chat.main([model_dirs[0], "--top-p", "1", "--temperature", "1e-3", "--top-k", "0"]) == 0
    assert made[0]["top_p"] == 1.0 and made[0]["temperature"] == 1e-3 and made[0]["top_k"] == 0


def test_prompt_eval_refuses_max_new_tokens_below_1_and_chat_a_missing_model(model_dirs, monkeypatch, capsys):
    no_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        prompt_eval.main([*model_dirs, "--max-new-tokens", "0"])
    assert exit.value.code == 2 and "--max-new-tokens" in one_error_line(capsys)
    assert chat.main(["/no/such/model"]) == 2
    assert "/no/such/model" in one_error_line(capsys)
