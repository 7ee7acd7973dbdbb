"""Tiny random Hugging Face checkpoints of every supported family, built with transformers' own
config classes and saved with `save_pretrained`, plus a tiny trained tokenizer."""

from __future__ import annotations

import os

import numpy as np

VOCAB = 320
# Gemma's caps, small enough to bite on these tiny random models' scores and logits
GEMMA_ATTN_SOFTCAP, GEMMA_FINAL_SOFTCAP = 5.0, 10.0
SOFTCAPPED = ("gemma2", "gemma3_text")  # transformers' sdpa cannot cap: compare with its eager attention


def tiny_hf_configs():
    import transformers

    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    }
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=128,
    )
    return {
        "llama_gqa_llama3": transformers.LlamaConfig(**common, num_key_value_heads=2, rope_parameters=llama3_rope),
        "llama_linear_bias_headdim": transformers.LlamaConfig(
            **common,
            num_key_value_heads=4,
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        "qwen2_bias_tied": transformers.Qwen2Config(**common, num_key_value_heads=4, tie_word_embeddings=True),
        "qwen3_qk_norm": transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=16),
        "mistral": transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=4096),
        "mistral_window4": transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=4),
        # head_dim 64: the smallest the decode kernel takes (its bf16 tiles are 64 wide)
        "llama_mqa_headdim64": transformers.LlamaConfig(
            **{**common, "hidden_size": 128, "num_attention_heads": 2}, num_key_value_heads=1
        ),
        "opt": transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            max_position_embeddings=128,
            pad_token_id=1,
        ),
        "opt_proj_postln": transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            pad_token_id=1,
        ),
        # GPT-NeoX / Pythia: head_dim 16, rotary on 4 (0.25) or 8 (0.5) of each head
        "neox_parallel_rot25": transformers.GPTNeoXConfig(
            **{**common, "num_attention_heads": 4}, rotary_pct=0.25, use_parallel_residual=True
        ),
        "neox_sequential_rot50": transformers.GPTNeoXConfig(
            **{**common, "num_attention_heads": 4}, rotary_pct=0.5, use_parallel_residual=False, attention_bias=False
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=8,
            n_positions=128,
            layer_norm_epsilon=1e-6,
            bos_token_id=0,
            eos_token_id=2,
        ),
        # GPT-J: head_dim 16, interleaved rotary on the first 6 dims of each head
        "gptj": transformers.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=4,
            n_positions=128,
            rotary_dim=6,
            bos_token_id=0,
            eos_token_id=2,
        ),
        # Sliding windows of 4, shorter than the test sequences, on some layers only. Qwen2: from
        # layer 1 on (max_window_layers).
        "qwen2_window_layers": transformers.Qwen2Config(
            **common, num_key_value_heads=4, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),
        # Gemma 2: layers windowed, full, windowed; head_dim 16 (not hidden / heads), scores scaled
        # by 24 ** -0.5, attention scores and final logits soft-capped
        "gemma2_window4": transformers.Gemma2Config(
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=GEMMA_ATTN_SOFTCAP,
            final_logit_softcapping=GEMMA_FINAL_SOFTCAP,
        ),
        # Gemma 3: q/k norms, the windowed layers' own rotary base, linear rope scaling on the full layer
        "gemma3_window4": transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3},
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=GEMMA_FINAL_SOFTCAP,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
            },
        ),
        # BLOOM: 12 heads, not a power of two (HF's extra ALiBi slopes) yet split by tensor parallel 4; head_dim 8.
        # Untied: a tiny random BLOOM with a tied LM head repeats its last token (the SFT/PPO tests' BLOOM ties).
        "bloom": transformers.BloomConfig(
            vocab_size=VOCAB,
            hidden_size=96,
            n_layer=2,
            n_head=12,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=2,
        ),
    }


def save_tiny_model(name: str, directory: str, seed: int = 0, centred_biases: bool = False) -> str:
    """Random weights (std large enough that logits differ meaningfully), saved by transformers.
    Vectors are drawn from [0.5, 1.5]; with `centred_biases` every bias from N(0, 0.1) instead
    (norm weights stay), so that biases on every projection (GPT-NeoX, GPT-2, GPT-J, BLOOM) do not swamp the
    tokens and greedy answers vary."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_configs()[name]).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim > 1 or (centred_biases and param_name.endswith("bias")):
                param.normal_(0.0, 0.1)
            else:
                param.uniform_(0.5, 1.5)
    path = os.path.join(directory, name)
    model.save_pretrained(path)
    return path


def torch_causal_lm(path: str):
    """transformers' causal LM from `path`, in eval mode; Gemma with eager attention (see SOFTCAPPED)."""
    import transformers

    eager = transformers.AutoConfig.from_pretrained(path).model_type in SOFTCAPPED
    kwargs = {"attn_implementation": "eager"} if eager else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def torch_logits(path: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """transformers' PyTorch logits, with position ids counted over real tokens as generation does."""
    import torch

    model = torch_causal_lm(path)
    kwargs = {}
    if model.config.model_type != "opt":  # OPT derives positions from the mask itself
        kwargs["position_ids"] = torch.tensor(np.maximum(attention_mask.cumsum(-1) - 1, 0))
    with torch.no_grad():
        out = model(torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask), **kwargs)
    return out.logits.float().numpy()


def padded_batch(lengths, seq_len: int, left: bool, seed: int = 0):
    """Random ids with `lengths` real tokens per row, padded on the left or the right."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, (len(lengths), seq_len)).astype(np.int32)
    mask = np.zeros((len(lengths), seq_len), np.int32)
    for row, n in enumerate(lengths):
        if left:
            mask[row, seq_len - n :] = 1
        else:
            mask[row, :n] = 1
    ids = np.where(mask == 1, ids, 1)  # pad id 1
    return ids, mask


def train_tiny_tokenizer(directory: str) -> str:
    """A byte-level BPE tokenizer trained on a few sentences, saved in Hugging Face format."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["Human: hello there. Assistant: hi, how can I help?"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(directory)
    return directory


def random_reward_model(directory: str, cache_dir: str, seed: int = 1) -> str:
    """The built-in model exported as a reward model with a random score head (PPO needs a value
    model with a trained head; a causal LM is refused), with its tokenizer."""
    import jax

    from jaxrlhf.models import ValueModel, export_model, load_pretrained
    from jaxrlhf.models.builtin import builtin_model_dir

    source = builtin_model_dir(cache_dir)
    model = load_pretrained(source, model_cls=ValueModel, untrained_head="zeros")
    kernel = model.value_head.kernel
    kernel.set_value(jax.random.normal(jax.random.key(seed), kernel.get_value().shape))
    return export_model(model, os.path.join(directory, "reward_model"), source)
