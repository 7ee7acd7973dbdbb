"""python -m jaxrlhf.cli.chat MODEL_DIR: multi-turn chat on stdin/stdout (DeepSpeed-Chat's chatbot).

The conversation is kept in the Anthropic-HH format the models are trained on
("\\n\\nHuman: ...\\n\\nAssistant: ..."); `clear` forgets it, `quit` or end of input ends.
Long conversations keep their most recent tokens.
"""

from __future__ import annotations

import sys

from jaxrlhf.cli.common import Parser, add_engine_flags, engine_settings, number, require_model_dir, run_or_exit_2
from jaxrlhf.generation.prompting import TextGenerator

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def conversation_prompt(history: list[tuple[str, str]], user_text: str) -> str:
    """Every earlier turn, then the new question, ending where the assistant speaks."""
    turns = "".join(f"{HUMAN}{question}{ASSISTANT} {answer}" for question, answer in history)
    return f"{turns}{HUMAN}{user_text}{ASSISTANT}"


def clean_answer(answer: str) -> str:
    """The answer up to where the model starts writing the next human turn, if it does."""
    return answer.split("Human:")[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jaxrlhf.cli.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--max-new-tokens", type=number(int, low=1), default=64)
    parser.add_argument("--temperature", type=number(float, low=0.0, low_open=True), default=1.0)
    parser.add_argument("--top-k", type=number(int, low=0), default=0, help="0: off")
    parser.add_argument("--top-p", type=number(float, 0.0, 1.0, low_open=True), default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tensor-parallel", type=number(int, low=1), default=1)
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    sampling = dict(
        **engine_settings(args),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
    )
    generator = []

    def load() -> int:
        require_model_dir(args.model_dir)
        generator.append(TextGenerator(args.model_dir, args.dtype, args.tensor_parallel, **sampling))
        return 0

    return run_or_exit_2(load) or converse(generator[0])


def converse(generator) -> int:
    """The conversation loop on stdin/stdout."""
    interactive = sys.stdin.isatty()
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            print('Human (type "quit" to exit, "clear" to start over): ', end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            return 0
        text = line.strip()
        if text == "clear":
            history = []
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        answer = clean_answer(generator.answers([conversation_prompt(history, text)])[0])
        history.append((text, answer))
        print(f"Assistant: {answer}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
