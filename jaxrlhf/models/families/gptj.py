"""GPT-J: attention and MLP side by side on ONE LayerNorm (x + attn(ln_1(x)) + mlp(ln_1(x))),
rotary on the first `rotary_dim` dims of each head with pairs interleaved (rotate_every_two),
q, k, v and out_proj without biases, a tanh-GELU MLP (fc_in, fc_out) with biases, and an untied
LM head that has a bias.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.families.base import LAYERS, Tensor, linear, norm, same, transposed

MODEL_TYPES = ("gptj",)
ARCHITECTURES = {"gptj": ("GPTJForCausalLM", "GPTJForSequenceClassification")}
PREFIX = "transformer."
LORA_TARGETS = {
    "q_proj": ("q_proj",),
    "k_proj": ("k_proj",),
    "v_proj": ("v_proj",),
    "out_proj": ("o_proj",),
    "fc_in": ("up_proj",),
    "fc_out": ("down_proj",),
}
ROPE_THETA = 10000.0  # fixed in GPT-J, not a config.json setting


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    e, num_heads = hf["n_embd"], hf["n_head"]
    head_dim = e // num_heads
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=e,
        intermediate_size=hf.get("n_inner") or 4 * e,
        num_layers=hf["n_layer"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("n_positions", 2048),
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        parallel_residual=True,
        shared_norm=True,
        activation=hf.get("activation_function", "gelu_new"),
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=False,
        out_bias=False,
        positions="rope",
        rotary_dim=hf.get("rotary_dim") or head_dim,
        rotary_interleaved=True,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        lm_head_bias=True,
    )


def to_hf(config) -> dict[str, Any]:
    return dict(
        model_type="gptj",
        vocab_size=config.vocab_size,
        n_embd=config.hidden_size,
        n_inner=config.intermediate_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_positions=config.max_position_embeddings,
        rotary_dim=config.rope_dim,
        layer_norm_epsilon=config.norm_eps,
        activation_function=config.activation,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def weights(config) -> list[Tensor]:
    e, n, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer, attn, mlp = "transformer.h.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    return [
        same("transformer.wte.weight", ("decoder", "embed_tokens"), (config.vocab_size, e)),
        *norm(f"{layer}.ln_1", LAYERS + ("attn_norm",), e),
        *linear(f"{layer}.attn.q_proj", attn + ("q_proj",), (e,), (n, d)),
        *linear(f"{layer}.attn.k_proj", attn + ("k_proj",), (e,), (n, d)),
        *linear(f"{layer}.attn.v_proj", attn + ("v_proj",), (e,), (n, d)),
        *linear(f"{layer}.attn.out_proj", attn + ("o_proj",), (n, d), (e,)),
        *linear(f"{layer}.mlp.fc_in", mlp + ("up_proj",), (e,), (m,)),
        *linear(f"{layer}.mlp.fc_out", mlp + ("down_proj",), (m,), (e,)),
        *norm("transformer.ln_f", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, e)),
        same("lm_head.bias", ("lm_head_bias",), (config.vocab_size,)),
        *linear("score", ("value_head",), (e,), (1,)),
    ]
