"""GPT-NeoX and Pythia: LayerNorm, rotary on the first `rotary_pct` of each head, a GELU MLP,
biases everywhere, an untied output matrix (`embed_out`), and by default the parallel residual
x + attn(ln1(x)) + mlp(ln2(x)).

q, k and v live in one HF tensor, `query_key_value`, whose output dim is laid out per head as
[heads, 3, head_dim]: each of our q_proj, k_proj, v_proj is a strided view of it.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.config import freeze
from jaxrlhf.models.families.base import LAYERS, Tensor, linear, norm, per_head_qkv, rope_fields, same, transposed

MODEL_TYPES = ("gpt_neox",)
ARCHITECTURES = {"gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")}
PREFIX = "gpt_neox."
# HF's one adapter on the fused query_key_value becomes one adapter on each of q_proj, k_proj, v_proj.
LORA_TARGETS = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("up_proj",),
    "dense_4h_to_h": ("down_proj",),
}


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    head_dim = hf["hidden_size"] // num_heads
    rope_theta, rope = rope_fields(hf, theta_key="rotary_emb_base")
    partial = rope.pop("partial_rotary_factor", hf.get("rotary_pct", 0.25))  # 0.25: HF's default
    bias = bool(hf.get("attention_bias", True))
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        activation=hf.get("hidden_act", "gelu"),
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=bias,
        out_bias=bias,
        positions="rope",
        rotary_dim=int(head_dim * partial),  # as HF rounds it
        rope_theta=rope_theta,
        rope_scaling=freeze(rope),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_hf(config) -> dict[str, Any]:
    rope = {**config.rope_parameters(), "rope_theta": config.rope_theta}
    return dict(
        model_type="gpt_neox",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        layer_norm_eps=config.norm_eps,
        use_parallel_residual=config.parallel_residual,
        hidden_act=config.activation,
        attention_bias=config.qkv_bias,
        rope_parameters={**rope, "partial_rotary_factor": config.rope_dim / config.head_dim},
        tie_word_embeddings=config.tie_word_embeddings,
    )


def weights(config) -> list[Tensor]:
    e, n, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer, attn, mlp = "gpt_neox.layers.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    return [
        same("gpt_neox.embed_in.weight", ("decoder", "embed_tokens"), (config.vocab_size, e)),
        *norm(f"{layer}.input_layernorm", LAYERS + ("attn_norm",), e),
        *per_head_qkv(f"{layer}.attention.query_key_value", attn, n, d, e),
        *linear(f"{layer}.attention.dense", attn + ("o_proj",), (n, d), (e,)),
        *norm(f"{layer}.post_attention_layernorm", LAYERS + ("mlp_norm",), e),
        *linear(f"{layer}.mlp.dense_h_to_4h", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.dense_4h_to_h", mlp + ("down_proj",), (m,), (e,)),
        *norm("gpt_neox.final_layer_norm", ("decoder", "final_norm"), e),
        transposed("embed_out.weight", ("lm_head",), (config.vocab_size, e)),
        *linear("score", ("value_head",), (e,), (1,)),
    ]
