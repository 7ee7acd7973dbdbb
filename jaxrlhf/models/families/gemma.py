"""Gemma 2 and Gemma 3 (text): the LLaMA layout with Gemma's own touches.

Embeddings scaled by sqrt(hidden_size); RMSNorm computed in float32 that scales by (1 + weight);
a norm before and after both the attention and the MLP (the outputs normed before their residual
add); a GeGLU MLP (tanh GELU); scores scaled by query_pre_attn_scalar ** -0.5; tied embeddings;
sliding-window and full-attention layers mixed (HF's `layer_types`: Gemma 2 alternates, Gemma 3
has five windowed layers to one full). Gemma 2 soft-caps the attention scores and the final
logits as cap * tanh(x / cap); Gemma 3 caps neither by default, RMS-normalises each head's
queries and keys, and turns its windowed layers' rotary at a base of their own.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.config import freeze
from jaxrlhf.models.families.base import (
    FULL,
    LAYERS,
    WINDOWED,
    Tensor,
    layer_windows,
    linear,
    norm,
    rope_fields,
    same,
    transposed,
    window_and_layer_types,
)

MODEL_TYPES = ("gemma2", "gemma3_text")
ARCHITECTURES = {
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}
PREFIX = "model."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {name: (name,) for name in PROJECTIONS}
GEMMA3_LOCAL_THETA = 10000.0  # transformers' default base of Gemma 3's windowed layers
GEMMA3_PATTERN = 6  # an older Gemma 3 config.json: every sliding_window_pattern-th layer is full


def _layer_types(hf: dict[str, Any]) -> list[str]:
    """HF's layer_types, or the pattern an older config.json implies: Gemma 2 windows the even
    layers, Gemma 3 all but every `sliding_window_pattern`-th."""
    if hf.get("layer_types"):
        return hf["layer_types"]
    pattern = 2 if hf["model_type"] == "gemma2" else hf.get("sliding_window_pattern", GEMMA3_PATTERN)
    return [WINDOWED if (i + 1) % pattern else FULL for i in range(hf["num_hidden_layers"])]


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any], float | None]:
    """(rope_theta, rope parameters of the full layers, Gemma 3's windowed layers' base or None).
    transformers 5 keeps Gemma 3's per layer type in `rope_parameters`; older config.json files
    name them rope_theta, rope_scaling and rope_local_base_freq."""
    if hf["model_type"] == "gemma2":
        return (*rope_fields(hf), None)
    parameters = hf.get("rope_parameters") or {}
    if FULL in parameters:
        theta, rope = rope_fields({"rope_parameters": parameters[FULL]})
        local = dict(parameters.get(WINDOWED) or {})
    else:
        theta, rope = rope_fields({**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)})
        local = {"rope_theta": hf.get("rope_local_base_freq", GEMMA3_LOCAL_THETA)}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3_text with sliding_attention rope_type {local['rope_type']!r} is not supported")
    return theta, rope, float(local.get("rope_theta", GEMMA3_LOCAL_THETA))


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    model_type, num_heads = hf["model_type"], hf["num_attention_heads"]
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type} with use_bidirectional_attention=True is not supported")
    rope_theta, rope, local_theta = _rope(hf)
    bias = bool(hf.get("attention_bias", False))
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_plus_one=True,
        post_norms=True,
        activation=hf.get("hidden_activation") or "gelu_pytorch_tanh",
        gated_mlp=True,
        qkv_bias=bias,
        out_bias=bias,
        qk_norm=model_type == "gemma3_text",
        positions="rope",
        rope_theta=rope_theta,
        rope_scaling=freeze(rope),
        local_rope_theta=local_theta,
        layer_windows=layer_windows(hf, _layer_types(hf)),
        scale_embeddings=True,
        query_scale_dim=hf.get("query_pre_attn_scalar", 256),
        # transformers' Gemma 3 never passes attn_logit_softcapping to its attention
        attn_logit_softcap=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def to_hf(config) -> dict[str, Any]:
    window, layer_types = window_and_layer_types(config)
    rope = {**config.rope_parameters(), "rope_theta": config.rope_theta}
    if config.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": config.local_rope_theta}
        rope = {FULL: rope, WINDOWED: local}
    return dict(
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        hidden_activation=config.activation,
        attention_bias=config.qkv_bias,
        rope_parameters=rope,
        sliding_window=window,
        layer_types=layer_types,
        query_pre_attn_scalar=config.query_scale_dim,
        attn_logit_softcapping=config.attn_logit_softcap,
        final_logit_softcapping=config.final_logit_softcap,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def weights(config) -> list[Tensor]:
    e, n, kv, d, m = (
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.intermediate_size,
    )
    layer, attn, mlp = "model.layers.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    return [
        same("model.embed_tokens.weight", ("decoder", "embed_tokens"), (config.vocab_size, e)),
        *norm(f"{layer}.input_layernorm", LAYERS + ("attn_norm",), e),
        *linear(f"{layer}.self_attn.q_proj", attn + ("q_proj",), (e,), (n, d)),
        *linear(f"{layer}.self_attn.k_proj", attn + ("k_proj",), (e,), (kv, d)),
        *linear(f"{layer}.self_attn.v_proj", attn + ("v_proj",), (e,), (kv, d)),
        *linear(f"{layer}.self_attn.o_proj", attn + ("o_proj",), (n, d), (e,)),
        *norm(f"{layer}.self_attn.q_norm", attn + ("q_norm",), d),
        *norm(f"{layer}.self_attn.k_norm", attn + ("k_norm",), d),
        *norm(f"{layer}.post_attention_layernorm", LAYERS + ("post_attn_norm",), e),
        *norm(f"{layer}.pre_feedforward_layernorm", LAYERS + ("mlp_norm",), e),
        *norm(f"{layer}.post_feedforward_layernorm", LAYERS + ("post_mlp_norm",), e),
        *linear(f"{layer}.mlp.gate_proj", mlp + ("gate_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.up_proj", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.down_proj", mlp + ("down_proj",), (m,), (e,)),
        *norm("model.norm", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, e)),
        *linear("score", ("value_head",), (e,), (1,)),
    ]
