"""Training-step throughput: our jitted SFT step against PyTorch on the same model, same run.

Builds a random model with transformers' config classes (so both sides get the same weights),
times our FSDP train step (AdamW, loss on all tokens) and a plain PyTorch AdamW loop on the
same batch, and prints tokens/s, the ratio ours/PyTorch, TFLOP/s and, on devices with a known
peak, MFU. Example (CPU):

    PYTHONPATH=$PWD python scripts/bench_train.py --hidden 256 --layers 4 --batch 16 --seq 128
    PYTHONPATH=$PWD python scripts/bench_train.py --hidden 2048 --layers 16 --heads 16 --batch 8 --seq 2048 \
        --dtype bfloat16 --append docs/benchmarks.md          # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types

from bench_common import add_model_flags, hf_config


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"], help="training attention")
    parser.add_argument("--remat", default="none", choices=["none", "dots", "block"])
    return parser.parse_args(argv)


def time_ours(path, args, batch):
    import jax

    from jaxrlhf.losses import language_model_loss
    from jaxrlhf.models import load_pretrained
    from jaxrlhf.parallel import TRAINING_RULES, batch_sharding, make_mesh
    from jaxrlhf.train_state import (
        init_train_state,
        make_optimizer,
        make_train_step,
        shardings_of,
        split_for_training,
    )

    mesh = make_mesh(fsdp=-1)
    model = load_pretrained(
        path,
        mesh=mesh,
        rules=TRAINING_RULES,
        dtype=args.dtype,
        param_dtype="float32",
        remat=args.remat,
        attention=args.attention,
    )
    graphdef, params, frozen = split_for_training(model, 0)
    optimizer = make_optimizer(
        types.SimpleNamespace(
            learning_rate=1e-4,
            weight_decay=0.0,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            schedule="constant",
            warmup_steps=0,
            max_grad_norm=1.0,
            min_lr_ratio=1.0,
        ),
        total_steps=100,
    )
    state = init_train_state(params, frozen, optimizer)
    step = make_train_step(graphdef, language_model_loss, optimizer, 1, shardings_of(state))
    batch = jax.device_put({k: jax.numpy.asarray(v) for k, v in batch.items()}, batch_sharding(mesh))
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps


def time_torch(path, args, batch):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.tensor(batch["input_ids"], device=device, dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], device=device)

    def one_step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    sync()
    return (time.perf_counter() - start) / args.steps


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxrlhf.metrics import PEAK_FLOPS, training_flops_per_token

    config = hf_config(args, max_len=args.seq)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in reference.parameters())
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32),
        "attention_mask": np.ones((args.batch, args.seq), np.int32),
        "loss_mask": np.ones((args.batch, args.seq), np.int32),
    }
    tokens = args.batch * args.seq
    flops = training_flops_per_token(n_params, 0, args.layers, args.hidden, args.seq) * tokens
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        del reference
        print(
            f"model {args.model_type} {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, "
            f"attention {args.attention}, remat {args.remat}",
            file=sys.stderr,
        )
        ours = time_ours(path, args, batch)
        theirs = None if args.no_torch else time_torch(path, args, batch)
    device = jax.devices()[0].device_kind
    peak = PEAK_FLOPS.get(device)
    mfu = f"{flops / ours / (peak * jax.device_count()):.1%}" if peak else "n/a"
    ratio = f"{theirs / ours:.2f}x" if theirs else "n/a"
    torch_tps = f"{tokens / theirs:,.0f}" if theirs else "n/a"
    row = (
        f"| {device} x{jax.device_count()} | {args.model_type} {n_params / 1e6:.1f}M | {args.batch}x{args.seq} "
        f"| {args.dtype} | {tokens / ours:,.0f} | {torch_tps} | {ratio} | {flops / ours / 1e12:.3f} | {mfu} |"
    )
    print("| device | model | batch | dtype | ours tok/s | PyTorch tok/s | ours/PyTorch | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(row)
    if args.append:
        versions = f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        command = "python scripts/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"{row}  <!-- {versions}; `{command}` -->\n")


if __name__ == "__main__":
    main()
