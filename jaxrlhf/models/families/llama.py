"""The LLaMA family: LLaMA 1/2/3, Mistral, Qwen2, Qwen3.

RMSNorm before each sub-block, rotary positions (default, linear or llama3 scaling), SwiGLU MLP,
grouped-query attention. Qwen2 biases q, k and v (not o); Qwen3 RMS-normalises each head's
queries and keys before rotary. Sliding windows: Mistral's on every layer; Qwen's (when
`use_sliding_window`) on the layers HF's `layer_types` names, from `max_window_layers` on.
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

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
}
PREFIX = "model."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {name: (name,) for name in PROJECTIONS}
_QWEN = ("qwen2", "qwen3")
QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default for Qwen2/3


def _layer_windows(hf: dict[str, Any]) -> tuple[int | None, ...]:
    """Mistral windows every layer; Qwen2/3, when `use_sliding_window`, the layers `layer_types`
    names "sliding_attention" (an older config.json: the layers from `max_window_layers` on)."""
    layers = hf["num_hidden_layers"]
    if hf["model_type"] not in _QWEN:
        return layer_windows(hf, [WINDOWED] * layers)
    if not hf.get("use_sliding_window", False):
        return ()
    first = hf.get("max_window_layers", QWEN_MAX_WINDOW_LAYERS) or 0
    return layer_windows(hf, hf.get("layer_types") or [FULL if i < first else WINDOWED for i in range(layers)])


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    model_type, num_heads = hf["model_type"], hf["num_attention_heads"]
    rope_theta, rope = rope_fields(hf)
    bias = bool(hf.get("attention_bias", False))
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation=hf.get("hidden_act", "silu"),
        gated_mlp=True,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qkv_bias=True if model_type == "qwen2" else bias,
        qk_norm=model_type == "qwen3",
        out_bias=False if model_type == "qwen2" else bias,
        positions="rope",
        rope_theta=rope_theta,
        rope_scaling=freeze(rope),
        layer_windows=_layer_windows(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_hf(config) -> dict[str, Any]:
    window, layer_types = window_and_layer_types(config)
    hf = dict(
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
        hidden_act=config.activation,
        mlp_bias=config.mlp_bias,
        rope_parameters={**config.rope_parameters(), "rope_theta": config.rope_theta},
        sliding_window=window,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.model_type != "qwen2":  # Qwen2's q, k, v biases are not a setting
        hf["attention_bias"] = config.qkv_bias
    if config.model_type in _QWEN:
        first = layer_types.index(WINDOWED) if window is not None else config.num_layers
        hf.update(use_sliding_window=window is not None, layer_types=layer_types, max_window_layers=first)
    elif FULL in layer_types and window is not None:
        raise ValueError(f"{config.model_type} windows every layer or none, not {config.layer_windows}")
    return hf


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
        *norm(f"{layer}.post_attention_layernorm", LAYERS + ("mlp_norm",), e),
        *linear(f"{layer}.mlp.gate_proj", mlp + ("gate_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.up_proj", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.down_proj", mlp + ("down_proj",), (m,), (e,)),
        *norm("model.norm", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, e)),
        *linear("score", ("value_head",), (e,), (1,)),
    ]
