"""What the benchmark scripts share: the model-shape flags and a transformers config from them."""

from __future__ import annotations

import argparse


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", default="llama", choices=["llama", "opt"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--append", help="append the result row to this markdown file")


def hf_config(args, max_len: int):
    """A random-weight model shape as transformers' own config class; EOS is the last token id."""
    import transformers

    intermediate = args.intermediate or 4 * args.hidden
    if args.model_type == "opt":
        return transformers.OPTConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            ffn_dim=intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            max_position_embeddings=max_len,
            eos_token_id=args.vocab - 1,
            pad_token_id=1,
        )
    return transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max_len,
        eos_token_id=args.vocab - 1,
        pad_token_id=0,
    )
