"""OPT: LayerNorm before (or, OPT-350m, after) each sub-block, learned positions shifted by 2,
a ReLU MLP, biases everywhere, and embeddings that may be narrower than the residual stream
(`word_embed_proj_dim`, projected in and out)."""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.families.base import LAYERS, Tensor, linear, norm, require_unset, same, transposed

MODEL_TYPES = ("opt",)
ARCHITECTURES = {"opt": ("OPTForCausalLM", "OPTForSequenceClassification")}
PREFIX = "model."  # the Hub's facebook/opt-* checkpoints name tensors decoder.*
LORA_TARGETS = {
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "out_proj": ("o_proj",),
    "fc1": ("up_proj",),
    "fc2": ("down_proj",),
}
POSITION_OFFSET = 2  # OPT's learned positions start at row 2


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    require_unset(hf, layer_norm_elementwise_affine=True)
    num_heads, bias = hf["num_attention_heads"], bool(hf.get("enable_bias", True))
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    proj_dim = hf.get("word_embed_proj_dim") or hf["hidden_size"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["ffn_dim"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm="layer",
        norm_eps=1e-5,
        norm_before_block=pre_norm,
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        activation=hf.get("activation_function", "relu"),
        gated_mlp=False,
        mlp_bias=bias,
        qkv_bias=bias,
        out_bias=bias,
        positions="learned",
        learned_position_offset=POSITION_OFFSET,
        word_embed_proj_dim=proj_dim if proj_dim != hf["hidden_size"] else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def to_hf(config) -> dict[str, Any]:
    return dict(
        model_type="opt",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        ffn_dim=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        do_layer_norm_before=config.norm_before_block,
        _remove_final_layer_norm=config.norm_before_block and not config.final_norm,
        activation_function=config.activation,
        enable_bias=config.qkv_bias,
        word_embed_proj_dim=config.embed_dim,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def weights(config) -> list[Tensor]:
    e, p, m = config.hidden_size, config.embed_dim, config.intermediate_size
    layer, attn, mlp = "model.decoder.layers.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    positions = config.max_position_embeddings + POSITION_OFFSET
    return [
        same("model.decoder.embed_tokens.weight", ("decoder", "embed_tokens"), (config.vocab_size, p)),
        same("model.decoder.embed_positions.weight", ("decoder", "embed_positions"), (positions, e)),
        *linear("model.decoder.project_in", ("decoder", "project_in"), (p,), (e,)),
        *linear("model.decoder.project_out", ("decoder", "project_out"), (e,), (p,)),
        *norm(f"{layer}.self_attn_layer_norm", LAYERS + ("attn_norm",), e),
        *linear(f"{layer}.self_attn.q_proj", attn + ("q_proj",), (e,), (config.num_heads, config.head_dim)),
        *linear(f"{layer}.self_attn.k_proj", attn + ("k_proj",), (e,), (config.num_kv_heads, config.head_dim)),
        *linear(f"{layer}.self_attn.v_proj", attn + ("v_proj",), (e,), (config.num_kv_heads, config.head_dim)),
        *linear(f"{layer}.self_attn.out_proj", attn + ("o_proj",), (config.num_heads, config.head_dim), (e,)),
        *norm(f"{layer}.final_layer_norm", LAYERS + ("mlp_norm",), e),
        *linear(f"{layer}.fc1", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.fc2", mlp + ("down_proj",), (m,), (e,)),
        *norm("model.decoder.final_layer_norm", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, p)),
        *linear("score", ("value_head",), (p,), (1,)),
    ]
