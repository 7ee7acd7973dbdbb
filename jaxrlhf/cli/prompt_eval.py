"""python -m jaxrlhf.cli.prompt_eval BASELINE_DIR FINETUNED_DIR: both models' greedy answers to the
same prompts, side by side (DeepSpeed-Chat's prompt_eval.py)."""

from __future__ import annotations

import json
import os
import sys

from jaxrlhf.cli.common import Parser, at_least, run_or_exit_2
from jaxrlhf.generation.prompting import TextGenerator

DEFAULT_PROMPTS = [
    "\n\nHuman: I am Alice. List three fruits.\n\nAssistant:",
    "\n\nHuman: Please list two colors. Thank you.\n\nAssistant:",
    "\n\nHuman: My name is Bob. Name four animals.\n\nAssistant:",
    "\n\nHuman: Please tell me about Microsoft in a few sentences.\n\nAssistant:",
]


def read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file, or the "prompt" field of each line of a .jsonl file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: prompts file not found")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if path.endswith(".jsonl"):
        prompts = []
        for row, line in enumerate(lines):
            record = json.loads(line)
            if not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{row}: no string 'prompt' field")
            prompts.append(record["prompt"])
        return prompts
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jaxrlhf.cli.prompt_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline_dir")
    parser.add_argument("finetuned_dir")
    parser.add_argument("--prompts", help="a text file (one prompt per line) or .jsonl with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    def side_by_side() -> int:
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
        answers = [
            TextGenerator(path, args.dtype, max_new_tokens=args.max_new_tokens, greedy=True).answers(prompts)
            for path in (args.baseline_dir, args.finetuned_dir)
        ]
        for prompt, baseline, finetuned in zip(prompts, *answers):
            print(f"==== prompt: {prompt.strip()!r}\nbaseline:  {baseline.strip()}\nfinetuned: {finetuned.strip()}\n")
        return 0

    return run_or_exit_2(side_by_side)


if __name__ == "__main__":
    sys.exit(main())
