"""BLOOM: ALiBi (a per-head bias on each key's position, no position embedding), a LayerNorm on
the word embeddings, LayerNorm before each sub-block, a 4 x hidden tanh-GELU MLP, biases
everywhere, the LM head tied to the embeddings.

q, k and v live in one HF tensor, `query_key_value`, laid out per head as GPT-NeoX's,
[heads, 3, head_dim] on the output dim: each of our q_proj, k_proj, v_proj is a strided view of it.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.families.base import LAYERS, Tensor, linear, norm, per_head_qkv, require_unset, same, transposed

MODEL_TYPES = ("bloom",)
ARCHITECTURES = {"bloom": ("BloomForCausalLM", "BloomForSequenceClassification")}
PREFIX = "transformer."  # the Hub's bigscience/bloom-* checkpoints name tensors h.0..., word_embeddings...
# HF's one adapter on the fused query_key_value becomes one adapter on each of q_proj, k_proj, v_proj.
LORA_TARGETS = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("up_proj",),
    "dense_4h_to_h": ("down_proj",),
}
# BLOOM's training length; config.json does not state it and ALiBi has no table that ends there.
MAX_POSITIONS = 2048


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    require_unset(hf, apply_residual_connection_post_layernorm=False)
    # The Hub's config.json files predate transformers' names: n_embed, and some num_attention_heads.
    e = hf.get("hidden_size") or hf["n_embed"]
    num_heads = hf.get("n_head") or hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=e,
        intermediate_size=4 * e,
        num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=e // num_heads,
        max_position_embeddings=MAX_POSITIONS,
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        embed_norm=True,
        activation="gelu_pytorch_tanh",  # bloom_gelu_forward: the tanh approximation
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        out_bias=True,
        positions="alibi",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def to_hf(config) -> dict[str, Any]:
    return dict(
        model_type="bloom",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        layer_norm_epsilon=config.norm_eps,
        apply_residual_connection_post_layernorm=False,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def weights(config) -> list[Tensor]:
    e, n, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer, attn, mlp = "transformer.h.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    return [
        same("transformer.word_embeddings.weight", ("decoder", "embed_tokens"), (config.vocab_size, e)),
        *norm("transformer.word_embeddings_layernorm", ("decoder", "embed_norm"), e),
        *norm(f"{layer}.input_layernorm", LAYERS + ("attn_norm",), e),
        *per_head_qkv(f"{layer}.self_attention.query_key_value", attn, n, d, e),
        *linear(f"{layer}.self_attention.dense", attn + ("o_proj",), (n, d), (e,)),
        *norm(f"{layer}.post_attention_layernorm", LAYERS + ("mlp_norm",), e),
        *linear(f"{layer}.mlp.dense_h_to_4h", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.dense_4h_to_h", mlp + ("down_proj",), (m,), (e,)),
        *norm("transformer.ln_f", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, e)),
        *linear("score", ("value_head",), (e,), (1,)),
    ]
