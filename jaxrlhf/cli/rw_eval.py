"""python -m jaxrlhf.cli.rw_eval MODEL_DIR [--pairs FILE --layout LAYOUT] [--prompt P --response R]...

Scores prompt/response pairs with a reward model (a step-2 export), and reports the accuracy
on a file of preference pairs in any supported layout (DeepSpeed-Chat's rw_eval.py).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from flax import nnx

from jaxrlhf.cli.common import Parser, number, require_model_dir, run_or_exit_2
from jaxrlhf.data.builtin import BUILTIN
from jaxrlhf.data.records import Record
from jaxrlhf.data.sources import LAYOUT_NAMES, load_source
from jaxrlhf.data.tokenize import tokenize_pairs
from jaxrlhf.models import ValueModel, load_pretrained, load_tokenizer
from jaxrlhf.models.outputs import sequence_scores

EXAMPLES = [
    ("\n\nHuman: I am Alice. List three fruits.\n\nAssistant:", " Hi Alice! apple, pear, plum. Hope this helps!"),
    ("\n\nHuman: I am Alice. List three fruits.\n\nAssistant:", " apple, apple, car. Whatever."),
    ("\n\nHuman: Please tell me about yourself.\n\nAssistant:", " I can help you answer questions."),
]


def score_pairs(
    model_dir: str,
    records: list[Record],
    max_seq_len: int = 512,
    batch_size: int = 16,
    allow_untrained_head: bool = False,
):
    """(chosen scores, rejected scores or None) for the records, by the reward model at model_dir.
    A causal LM (no trained score head) is refused unless `allow_untrained_head` (it then scores 0)."""
    tokenizer = load_tokenizer(model_dir)
    untrained_head = "warn" if allow_untrained_head else "refuse"
    graphdef, state = nnx.split(load_pretrained(model_dir, model_cls=ValueModel, untrained_head=untrained_head))
    score = jax.jit(lambda state, ids, mask: sequence_scores(nnx.merge(graphdef, state)(ids, mask), mask))
    paired = [Record(r.prompt, r.chosen, r.rejected if r.rejected is not None else r.chosen) for r in records]
    arrays = tokenize_pairs(paired, tokenizer, max_seq_len, drop_identical=False)  # single answers pair with themselves
    chosen, rejected = [], []
    for start in range(0, len(records), batch_size):
        rows = slice(start, start + batch_size)
        chosen.append(np.asarray(score(state, arrays["chosen_ids"][rows], arrays["chosen_mask"][rows])))
        rejected.append(np.asarray(score(state, arrays["rejected_ids"][rows], arrays["rejected_mask"][rows])))
    has_rejected = all(r.rejected is not None for r in records)
    return np.concatenate(chosen), np.concatenate(rejected) if has_rejected else None


def load_pairs_strict(path: str, layout: str) -> tuple[list[Record], int]:
    """Pairs from a file, and how many rows the layout dropped as tied (equal labels); any
    malformed row is an error naming the file and row."""
    source = argparse.Namespace(path=path, layout=layout, weight=1.0)
    records, report = load_source(source, seed=0)
    if report.bad_total:
        raise ValueError(f"{report.examples[0]} ({report.bad_total} malformed rows in all)")
    if any(r.rejected is None for r in records):
        raise ValueError(f"{path}: layout {layout!r} has no rejected responses; rw_eval needs pairs")
    return records, report.ties_dropped


def pair_accuracy(path: str, records: list[Record], chosen, rejected, dropped: int) -> str:
    """The accuracy line: a tie (identical chosen and rejected text, or equal scores) is neither
    right nor wrong, so it is counted apart, with a warning on stderr naming the first ones."""
    identical = np.array([r.chosen == r.rejected for r in records])
    ties = identical | (chosen == rejected)
    decided = int((~ties).sum())
    if ties.any() or dropped:
        first = ", ".join(str(i + 1) for i in np.flatnonzero(ties)[:5])
        print(
            f"warning: {path}: {int(ties.sum())} tie pairs ({int(identical.sum())} with identical chosen and "
            f"rejected text, the rest scored equal; first pairs {first or '-'}), counted apart from accuracy"
            + (f"; {dropped} rows with tied labels dropped on load" if dropped else ""),
            file=sys.stderr,
        )
    accuracy = f"{np.mean((chosen > rejected)[~ties]):.4f}" if decided else "n/a"
    return (
        f"{len(records)} pairs from {path}: accuracy {accuracy} over {decided} decided pairs, {int(ties.sum())} "
        f"ties; chosen mean {chosen.mean():.4f}, rejected mean {rejected.mean():.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m jaxrlhf.cli.rw_eval", description=__doc__.split("\n\n")[1])
    parser.add_argument("model_dir", help="a reward model directory (e.g. <output_dir>/rm/model)")
    parser.add_argument("--pairs", help="a file of preference pairs (.json, .jsonl, .parquet or a saved dataset)")
    parser.add_argument("--layout", default="rm-static", choices=[name for name in LAYOUT_NAMES if name != BUILTIN])
    parser.add_argument("--prompt", action="append", default=[], help="a prompt to score (with --response)")
    parser.add_argument("--response", action="append", default=[], help="the response to --prompt")
    parser.add_argument("--max-seq-len", type=number(int, low=2), default=512)
    parser.add_argument(
        "--allow-untrained-head",
        action="store_true",
        help="score with a model that has no trained score head (it scores 0), with a warning",
    )
    args = parser.parse_args(argv)
    return run_or_exit_2(lambda: evaluate(args))


def evaluate(args) -> int:
    """Scores the pairs file (accuracy) or the given prompt/response examples."""
    if len(args.prompt) != len(args.response):
        raise ValueError("give --prompt and --response the same number of times")
    require_model_dir(args.model_dir)
    if args.pairs:
        records, dropped = load_pairs_strict(args.pairs, args.layout)
        chosen, rejected = score_pairs(
            args.model_dir, records, args.max_seq_len, allow_untrained_head=args.allow_untrained_head
        )
        print(pair_accuracy(args.pairs, records, chosen, rejected, dropped))
        return 0
    examples = list(zip(args.prompt, args.response)) or EXAMPLES
    scores, _ = score_pairs(
        args.model_dir,
        [Record(p, r, None) for p, r in examples],
        args.max_seq_len,
        allow_untrained_head=args.allow_untrained_head,
    )
    for (prompt, response), value in zip(examples, scores):
        print(f"{value:+.4f}  {prompt.strip()!r} -> {response!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
