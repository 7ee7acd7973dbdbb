"""python -m jaxrlhf.cli.prompt_eval BASELINE_DIR FINETUNED_DIR: both models' greedy answers to the
same prompts, side by side (DeepSpeed-Chat's prompt_eval.py)."""

from __future__ import annotations

import json
import os
import sys

from jaxrlhf.cli.common import Parser, add_engine_flags, engine_settings, number, require_model_dir, run_or_exit_2
from jaxrlhf.generation.prompting import TextGenerator

DEFAULT_PROMPTS = [
    "\n\nHuman: I am Alice. List three fruits.\n\nAssistant:",
    "\n\nHuman: Please list two colors. Thank you.\n\nAssistant:",
    "\n\nHuman: My name is Bob. Name four animals.\n\nAssistant:",
    "\n\nHuman: Please tell me about Microsoft in a few sentences.\n\nAssistant:",
]


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file, or the "prompt" field of each line of a .jsonl file;
    a line that is not UTF-8 or not such a row is an error naming `file:line` (1-based)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompts file not found")
    with open(path, "rb") as f:
        data = f.read()
    prompts = []
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            byte = f"byte {raw[error.start]:#04x} at column {error.start + 1}"
            raise ValueError(f"{where}: not UTF-8 ({byte})") from None
        if line.strip():
            prompts.append(jsonl_prompt(line, where) if path.endswith(".jsonl") else line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def jsonl_prompt(line: str, where: str) -> str:
    """The "prompt" field of one JSON Lines row."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f"{where}: not a JSON object with a non-empty string 'prompt' field")
    return record["prompt"]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jaxrlhf.cli.prompt_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline_dir")
    parser.add_argument("finetuned_dir")
    parser.add_argument("--prompts", help="a text file (one prompt per line) or .jsonl with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=number(int, low=1), default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_engine_flags(parser)
    args = parser.parse_args(argv)

    def side_by_side() -> int:
        for path in (args.baseline_dir, args.finetuned_dir):  # both, before either loads
            require_model_dir(path)
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
        answers = [
            TextGenerator(
                path, args.dtype, max_new_tokens=args.max_new_tokens, greedy=True, **engine_settings(args)
            ).answers(prompts)
            for path in (args.baseline_dir, args.finetuned_dir)
        ]
        for prompt, baseline, finetuned in zip(prompts, *answers):
            print(f"==== prompt: {prompt.strip()!r}\nbaseline:  {baseline.strip()}\nfinetuned: {finetuned.strip()}\n")
        return 0

    return run_or_exit_2(side_by_side)


if __name__ == "__main__":
    sys.exit(main())
