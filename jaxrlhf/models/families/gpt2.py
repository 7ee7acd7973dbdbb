"""GPT-2: learned absolute positions (`wpe`), LayerNorm before each sub-block, a tanh-GELU MLP
("gelu_new"), biases everywhere, the LM head tied to `wte`.

Its linear layers are Conv1D, whose weights are stored transposed ([in, out]); q, k and v live
in one `c_attn` tensor, concatenated along the output dim: each of our q_proj, k_proj, v_proj is
a slice of it.
"""

from __future__ import annotations

from typing import Any

from jaxrlhf.models.families.base import LAYERS, Tensor, conv1d, linear, norm, require_unset, same, transposed

MODEL_TYPES = ("gpt2",)
ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification")}
PREFIX = "transformer."
# HF's one adapter on the fused c_attn becomes one on each of q_proj, k_proj, v_proj; "c_proj"
# names both the attention output and the MLP's second matrix, as it does for PEFT.
LORA_TARGETS = {
    "c_attn": ("q_proj", "k_proj", "v_proj"),
    "c_proj": ("o_proj", "down_proj"),
    "c_fc": ("up_proj",),
}


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    require_unset(hf, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, scale_attn_weights=True)
    e, num_heads = hf["n_embd"], hf["n_head"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=e,
        intermediate_size=hf.get("n_inner") or 4 * e,
        num_layers=hf["n_layer"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=e // num_heads,
        max_position_embeddings=hf["n_positions"],
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"),
        gated_mlp=False,
        mlp_bias=True,
        qkv_bias=True,
        out_bias=True,
        positions="learned",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def to_hf(config) -> dict[str, Any]:
    return dict(
        model_type="gpt2",
        vocab_size=config.vocab_size,
        n_embd=config.hidden_size,
        n_inner=config.intermediate_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_positions=config.max_position_embeddings,
        layer_norm_epsilon=config.norm_eps,
        activation_function=config.activation,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def _c_attn(part: int, heads: int, head_dim: int, hidden: int):
    """Views of q (part 0), k (1) or v (2) in c_attn: weight [hidden, 3 * hidden] -> our kernel
    [hidden, heads, head_dim]; bias [3 * hidden] -> [heads, head_dim]."""
    kernel = lambda w: w.reshape(hidden, 3, heads, head_dim)[:, part]
    bias = lambda b: b.reshape(3, heads, head_dim)[part]
    return kernel, bias


def weights(config) -> list[Tensor]:
    e, n, d, m = config.hidden_size, config.num_heads, config.head_dim, config.intermediate_size
    layer, attn, mlp = "transformer.h.{i}", LAYERS + ("attn",), LAYERS + ("mlp",)
    c_attn = [_c_attn(part, n, d, e) for part in range(3)]
    projections = [attn + (name,) for name in ("q_proj", "k_proj", "v_proj")]
    return [
        same("transformer.wte.weight", ("decoder", "embed_tokens"), (config.vocab_size, e)),
        same("transformer.wpe.weight", ("decoder", "embed_positions"), (config.max_position_embeddings, e)),
        *norm(f"{layer}.ln_1", LAYERS + ("attn_norm",), e),
        Tensor(
            f"{layer}.attn.c_attn.weight",
            (e, 3 * e),
            tuple((path + ("kernel",), views[0]) for path, views in zip(projections, c_attn)),
        ),
        Tensor(
            f"{layer}.attn.c_attn.bias",
            (3 * e,),
            tuple((path + ("bias",), views[1]) for path, views in zip(projections, c_attn)),
        ),
        *conv1d(f"{layer}.attn.c_proj", attn + ("o_proj",), (n, d), (e,)),
        *norm(f"{layer}.ln_2", LAYERS + ("mlp_norm",), e),
        *conv1d(f"{layer}.mlp.c_fc", mlp + ("up_proj",), (e,), (m,)),
        *conv1d(f"{layer}.mlp.c_proj", mlp + ("down_proj",), (m,), (e,)),
        *norm("transformer.ln_f", ("decoder", "final_norm"), e),
        transposed("lm_head.weight", ("lm_head",), (config.vocab_size, e)),
        *linear("score", ("value_head",), (e,), (1,)),  # GPT2ForSequenceClassification's head is a torch Linear
    ]
