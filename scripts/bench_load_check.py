"""What the load-time weight checks cost: `load_pretrained` timed with and without the NaN/inf
count (jaxrlhf.models.checks.check_finite), on the built-in model and a larger random LLaMA saved by
transformers' save_pretrained; plus the tokenizer-vs-vocab check alone.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python scripts/bench_load_check.py --hidden 1024 --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench_common import add_model_flags, hf_config


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, path: str, repeats: int) -> str:
    from jaxrlhf.models import hf_io

    check, placed = hf_io.check_finite, []
    checked = lambda: hf_io.load_pretrained(path)  # noqa: E731

    def unchecked():
        hf_io.check_finite = lambda path, tensors: placed.append(tensors)
        try:
            hf_io.load_pretrained(path)
        finally:
            hf_io.check_finite = check

    timed(unchecked)  # imports, file cache, the loader's own tracing
    first = timed(checked)  # the check's first call compiles it
    with_check, without = [], []
    for _ in range(repeats):
        with_check.append(timed(checked))
        without.append(timed(unchecked))
    on, off = statistics.median(with_check), statistics.median(without)
    alone = statistics.median(timed(lambda: check(path, placed[-1])) for _ in range(repeats))
    tokenizer = statistics.median(timed(lambda: hf_io.tokenizer_size(path)) for _ in range(repeats))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    return (
        f"| {name} | {size / 2**20:.0f} MiB | {off * 1e3:.0f} ms | {on * 1e3:.0f} ms | {alone * 1e3:.1f} ms "
        f"({alone / off * 100:.1f}%) | {first * 1e3:.0f} ms | {tokenizer * 1e3:.1f} ms |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.set_defaults(hidden=1024, layers=8, heads=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from jaxrlhf.models.builtin import builtin_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        large = os.path.join(tmp, "large")
        import transformers

        transformers.AutoModelForCausalLM.from_config(hf_config(args, max_len=512)).save_pretrained(large)
        print(
            "| model | safetensors | load, no check | load + check | the check alone (of the load) | "
            "first load + check (compiles it) | tokenizer check |"
        )
        print("|---|---|---|---|---|---|---|")
        print(bench("built-in (0.8M params)", builtin_model_dir(os.path.join(tmp, "cache")), args.repeats))
        print(bench(f"random LLaMA hidden {args.hidden}, {args.layers} layers", large, args.repeats))


if __name__ == "__main__":
    main()
