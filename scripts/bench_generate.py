"""Generation throughput: our prefill + jitted decode loop against transformers' `generate`.

Random weights of a given shape go to both (built with transformers' config classes and loaded
by us from its `save_pretrained` directory, then put in the generation layout as the hybrid
engine does). Reports prefill and decode tokens/s, the decode step's roofline ratio (bytes of
weights plus the filled KV cache read per step over the measured step time, against the
device's memory bandwidth), and ours/transformers for end-to-end generate tokens/s.

With --memory, nothing is allocated or timed: generate, prefill and one decode step are compiled
from shapes alone (any size, on any machine) and XLA's temporary memory is printed against the
KV cache, with the decode loop's cache-sized buffers and, on a GPU, XLA's bytes accessed per
decode step against the ideal (weights and filled cache read once, new keys/values written once);
with --samples-per-prompt N also the FLOPs saved by prefilling each prompt once for its N samples.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python scripts/bench_generate.py --hidden 256 --layers 4 --batch 8
    PYTHONPATH=$PWD python scripts/bench_generate.py --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \\
        --intermediate 8192 --vocab 32000 --batch 32 --prompt-len 512 --new-tokens 256 --dtype bfloat16
    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python scripts/bench_generate.py --memory --hidden 2048 --layers 16 \\
        --heads 32 --kv-heads 8 --intermediate 8192 --vocab 32000 --batch 32 --prompt-len 512 --new-tokens 256

With --lengths longtail|fixed it compares our two engines instead, in the same run: static
generation (every row decodes until the batch's longest answer) and refill (`--slots` rows at a
time, each freed slot refilled from the queue). Answer lengths are fixed per row so that both do
exactly the same work: log-normal with median --new-tokens/8 ("longtail"), or all at the maximum
("fixed"); EOS is suppressed and each row ends at its length. Reports useful (answer) tokens/s,
decode steps, mean slot occupancy and refill/static; with --memory, the compiled memory of both
(refill's at --batch rows and at four times as many, the same slots).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python scripts/bench_generate.py --lengths longtail --hidden 512 \\
        --layers 8 --batch 256 --prompt-len 32 --new-tokens 256 --slots 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from bench_common import add_model_flags, hf_config

BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100-SXM4-80GB": 2.0e12}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--attention", default="reference", choices=["reference", "pallas"])
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, help="device memory bandwidth in bytes/s (else from a table)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--memory", action="store_true", help="compile from shapes only and report memory")
    parser.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="with --memory, also the prefill FLOPs n samples per prompt save",
    )
    parser.add_argument("--lengths", choices=["longtail", "fixed"], help="compare the static and refill engines")
    parser.add_argument("--slots", type=int, default=64, help="refill engine: decode slots")
    parser.add_argument("--refill-chunk", type=int, default=0, help="refill engine: rows per refill (0: slots / 4)")
    parser.add_argument("--tail-sigma", type=float, default=1.0, help="longtail: sigma of the log-normal lengths")
    args = parser.parse_args(argv)
    if args.samples_per_prompt > 1 and not args.memory:
        parser.error("--samples-per-prompt is reported from shapes only: add --memory")
    return args


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_ours(path, args, ids, mask):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrlhf.generation.generate import SamplingSettings
    from jaxrlhf.generation.hybrid_engine import HybridEngine
    from jaxrlhf.generation.kv_cache import KVCache, prefill
    from jaxrlhf.models import load_pretrained, positions_from_mask
    from jaxrlhf.parallel import make_mesh

    model = load_pretrained(path, dtype=args.dtype, param_dtype=args.dtype)
    settings = SamplingSettings(
        eos_id=args.vocab - 1,
        pad_id=0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        greedy=True,
        attention=args.attention,
    )
    graphdef, state = nnx.split(model)
    devices = jax.devices()[: args.tensor_parallel]
    engine = HybridEngine(
        graphdef,
        (state,),
        make_mesh(data=1, fsdp=1, tensor=args.tensor_parallel, devices=devices),
        args.tensor_parallel,
        settings,
    )
    state = engine.generation_state((state,))
    del model
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    @jax.jit
    def prefill_only(state, ids, mask):
        model = nnx.merge(engine.graphdef, state)
        cache = KVCache.zeros(model.config, ids.shape[0], ids.shape[1] + args.new_tokens, engine.cache_sharding)
        hidden, cache = prefill(model, ids, mask, positions_from_mask(mask), cache)
        return model.logits(hidden[:, -1:]), cache

    run_prefill = lambda: jax.block_until_ready(prefill_only(state, ids, mask))
    run_generate = lambda: jax.block_until_ready(engine.generate_with(state, ids, mask, jax.random.key(0)))
    run_prefill(), run_generate()  # compile
    prefill_s = best_of(args.repeats, run_prefill)
    generate_s = best_of(args.repeats, run_generate)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return prefill_s, generate_s, weight_bytes, nnx.merge(engine.graphdef, state).config


def time_torch(path, args, ids, mask):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for cache in ("static", "dynamic"):
        kwargs = dict(
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id,
        )
        if cache == "static":
            kwargs["cache_implementation"] = "static"
        try:
            with torch.no_grad():
                model.generate(**inputs, **kwargs)
                sync()

                def run(kwargs=kwargs):
                    model.generate(**inputs, **kwargs)
                    sync()

                return best_of(args.repeats, run), cache
        except Exception as error:  # static cache unsupported for this model or version
            print(f"transformers {cache} cache failed ({type(error).__name__}); trying the next", file=sys.stderr)
    raise RuntimeError("transformers generate failed with both caches")


def report_memory(args):
    """Compile-only report from shapes (see the module docstring)."""
    import jax

    from jaxrlhf.generation.compiled_report import (
        generation_report,
        refill_memory_summary,
        samples_per_prompt_flops,
    )
    from jaxrlhf.models import DecoderConfig

    shape = hf_config(args, max_len=args.prompt_len + args.new_tokens).to_dict()
    config = DecoderConfig.from_hf(shape, dtype=args.dtype, param_dtype=args.dtype)
    print(f"compiling on {jax.devices()[0].device_kind} from shapes only", file=sys.stderr)
    report = generation_report(config, args.batch, args.prompt_len, args.new_tokens)
    device = jax.devices()[0].device_kind
    print(
        f"{args.model_type} hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
        f"({args.prompt_len} + {args.new_tokens}), {args.dtype}, jax {jax.__version__} on {device}"
    )
    print(report.summary())
    if args.samples_per_prompt > 1:
        n = args.samples_per_prompt
        print(samples_per_prompt_flops(config, args.batch, args.prompt_len, args.new_tokens, n).summary(n))
    if args.lengths:  # the engines compared: refill's memory at these rows and four times as many
        print(refill_memory_summary(config, args.batch, args.prompt_len, args.new_tokens, args.slots))


def answer_lengths(args):
    """Each row's answer length, fixed so both engines do the same work (see the module docstring)."""
    import numpy as np

    if args.lengths == "fixed":
        return np.full(args.batch, args.new_tokens, np.int32)
    draws = np.random.default_rng(0).lognormal(np.log(args.new_tokens / 8), args.tail_sigma, args.batch)
    return np.clip(np.round(draws), 1, args.new_tokens).astype(np.int32)


def compare_engines(args, ids, mask):
    """Static against refill generation on the same prompts, lengths and weights (one device)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import transformers
    from flax import nnx

    from jaxrlhf.generation.generate import SamplingSettings, generate_from_state
    from jaxrlhf.generation.layout import to_generation_layout
    from jaxrlhf.models import load_pretrained

    lengths = answer_lengths(args)
    static = SamplingSettings(
        eos_id=args.vocab - 1,
        pad_id=0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,  # no EOS: every row ends at its own length
        greedy=True,
        attention=args.attention,
    )
    refill = dataclasses.replace(static, engine="refill", slots=args.slots, refill_chunk=args.refill_chunk)
    with tempfile.TemporaryDirectory() as path:
        transformers.AutoModelForCausalLM.from_config(
            hf_config(args, args.prompt_len + args.new_tokens)
        ).save_pretrained(path)
        model = to_generation_layout(load_pretrained(path, dtype=args.dtype, param_dtype=args.dtype))
    graphdef, state = nnx.split(model)
    ids, mask, limits = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(lengths)
    results = {}
    for name, settings in (("static", static), ("refill", refill)):
        run = lambda settings=settings: jax.block_until_ready(
            generate_from_state(graphdef, state, ids, mask, jax.random.key(0), settings, answer_limits=limits)
        )
        print(f"compiling and timing {name}", file=sys.stderr)
        out = run()
        results[name] = (best_of(args.repeats, run), out)
    # float32: the same tokens (tests/test_refill.py); bf16 rounds prefills of other batch shapes
    # differently, which can flip a near-tie of random weights. The work is the same either way:
    # every row ends at its own fixed length.
    same_rows = (np.asarray(results["static"][1].tokens) == np.asarray(results["refill"][1].tokens)).all(1)
    useful = int(lengths.sum())
    device = jax.devices()[0].device_kind
    print(
        f"{args.model_type} hidden {args.hidden}, {args.layers} layers, {args.batch} rows x ({args.prompt_len} + "
        f"up to {args.new_tokens}), {args.lengths} lengths (mean {lengths.mean():.1f}, median "
        f"{np.median(lengths):.0f}, max {lengths.max()}), {args.slots} slots, {args.dtype}, jax {jax.__version__} "
        f"on {device}; rows with the same tokens: {same_rows.sum()}/{len(same_rows)}"
    )
    print("| engine | seconds | useful tok/s | decode steps | mean occupancy |")
    print("|---|---|---|---|---|")
    for name, (seconds, out) in results.items():
        print(f"| {name} | {seconds:.2f} | {useful / seconds:,.0f} | {int(out.steps)} | {float(out.occupancy):.1%} |")
    ratio = results["static"][0] / results["refill"][0]
    print(f"refill / static useful tokens/s: {ratio:.2f}x")
    if args.dtype == "float32":
        check_divergence(results["static"][1], results["refill"][1], args.prompt_len)
    return ratio


def check_divergence(static, refill, prompt_len: int):
    """In float32 a row may part only at a near-tie: greedy picks the argmax, so where the two
    engines first pick different tokens, the log-probs they picked them with must agree (the two
    tokens were equally likely up to rounding). Anything else is a bug: exit non-zero."""
    import numpy as np

    tokens = np.asarray(static.tokens)[:, prompt_len:], np.asarray(refill.tokens)[:, prompt_len:]
    logprobs = np.asarray(static.logprobs), np.asarray(refill.logprobs)
    for row in np.nonzero((tokens[0] != tokens[1]).any(1))[0]:
        step = int(np.argmax(tokens[0][row] != tokens[1][row]))
        gap = abs(float(logprobs[0][row, step] - logprobs[1][row, step]))
        if gap > 1e-4:
            raise SystemExit(f"refill and static part at row {row} token {step} with log-probs {gap:.2g} apart")
        print(f"row {row} parts at answer token {step}, a near-tie: log-probs {gap:.1g} apart")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.memory:
        return report_memory(args)
    import jax
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    shape = hf_config(args, max_len=args.prompt_len + args.new_tokens)
    reference = transformers.AutoModelForCausalLM.from_config(shape)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, args.vocab - 1, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(0, args.batch, 2):  # mixed prompt lengths: every other row left-padded by a quarter
        mask[row, : args.prompt_len // 4] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    if args.lengths:
        return compare_engines(args, ids, mask)
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        n_params = sum(p.numel() for p in reference.parameters())
        del reference
        print(f"{n_params / 1e6:.1f}M parameters; compiling and timing ours", file=sys.stderr)
        prefill_s, generate_s, weight_bytes, config = time_ours(path, args, ids, mask)
        print("timing transformers generate", file=sys.stderr)
        torch_s, cache = (None, "-") if args.no_torch else time_torch(path, args, ids, mask)

    steps = args.new_tokens - 1
    step_s = (generate_s - prefill_s) / steps
    itemsize = 2 if args.dtype == "bfloat16" else 4
    average_len = mask.sum(1).mean() + args.new_tokens / 2
    kv_bytes = 2 * config.num_layers * args.batch * average_len * config.num_kv_heads * config.head_dim * itemsize
    achieved = (weight_bytes + kv_bytes) / step_s
    device = jax.devices()[0].device_kind
    bandwidth = args.bandwidth or BANDWIDTH.get(device)
    roofline = f"{achieved / bandwidth:.1%}" if bandwidth else "n/a"
    new_tokens = args.batch * args.new_tokens
    ours_tps = new_tokens / generate_s
    ratio = f"{torch_s / generate_s:.2f}x" if torch_s else "n/a"
    torch_tps = f"{new_tokens / torch_s:,.0f} ({cache})" if torch_s else "n/a"
    row = (
        f"| {device} x{jax.device_count()} | {args.model_type} {n_params / 1e6:.1f}M | {args.batch}x{args.prompt_len}"
        f"+{args.new_tokens} | {args.dtype} | {args.attention} | {args.batch * args.prompt_len / prefill_s:,.0f} "
        f"| {args.batch / step_s:,.0f} | {achieved / 1e9:.1f} GB/s ({roofline}) | {ours_tps:,.0f} | {torch_tps} "
        f"| {ratio} |"
    )
    print(
        "| device | model | batch x prompt+new | dtype | attention | prefill tok/s | decode tok/s "
        "| decode bytes/s (of roofline) | ours generate tok/s | transformers tok/s | ours/transformers |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(row)
    if args.append:
        versions = f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        command = "python scripts/bench_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"{row}  <!-- {versions}; `{command}` -->\n")


if __name__ == "__main__":
    main()
