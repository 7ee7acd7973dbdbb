"""One decoder config for every supported family, read from a Hugging Face config.json.

The families differ only in a handful of switches (norm type, position encoding, MLP shape,
biases, where the norm sits); `DecoderConfig.from_hf` maps each family's names onto them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + ("opt",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" (LLaMA family) or "layer" (OPT)
    norm_eps: float = 1e-6
    norm_before_block: bool = True  # OPT-350m puts LayerNorm after the residual add
    final_norm: bool = True
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU (gate * up) vs a plain fc1 -> act -> fc2
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before rotary
    out_bias: bool = False
    positions: str = "rope"  # "rope" or "learned" (OPT)
    rope_theta: float = 10000.0
    rope_scaling: tuple = ("__dict__",)  # hashable copy of HF's rope parameters
    learned_position_offset: int = 0  # OPT shifts position ids by 2
    word_embed_proj_dim: int | None = None  # OPT: embeddings narrower than the residual stream
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # "none", "dots" (keep the weight matmuls' outputs) or "block": what the backward recomputes
    scan_layers: bool = True  # stacked blocks run by lax.scan (training); False: one module per block (generation)
    attention: str = "auto"  # training/prefill: "auto" (cuDNN flash on a GPU where it applies), "xla", "cudnn"
    hf_config: tuple = dataclasses.field(default=("__dict__",), compare=False, repr=False)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (OPT may project it up to hidden_size)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_projection(self) -> bool:
        return self.embed_dim != self.hidden_size

    def hf_dict(self) -> dict[str, Any]:
        return _thaw(self.hf_config)

    def rope_parameters(self) -> dict[str, Any]:
        return _thaw(self.rope_scaling)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> DecoderConfig:
        """Builds the config from a config.json dict; raises on an unsupported family."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        fields = _opt_fields(hf) if model_type == "opt" else _llama_family_fields(hf)
        fields.update(overrides)
        return cls(model_type=model_type, hf_config=_freeze(hf), **fields)


def _llama_family_fields(hf: dict[str, Any]) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    rope["rope_type"] = rope_type
    bias = bool(hf.get("attention_bias", False))
    is_qwen2, is_qwen3 = hf["model_type"] == "qwen2", hf["model_type"] == "qwen3"
    sliding_window = hf.get("sliding_window")
    if (is_qwen2 or is_qwen3) and not hf.get("use_sliding_window", False):
        sliding_window = None
    # Qwen2/3 window only the layers from max_window_layers on; one window for every layer is all we run
    partial = (is_qwen2 or is_qwen3) and hf.get("max_window_layers", 0) not in (0, None)
    if sliding_window is not None and partial:
        raise ValueError(
            f"{hf['model_type']} with use_sliding_window=true and max_window_layers={hf['max_window_layers']} "
            "(a sliding window on some layers only) is not supported"
        )
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
        qkv_bias=True if is_qwen2 else bias,
        qk_norm=is_qwen3,
        out_bias=False if is_qwen2 else bias,
        positions="rope",
        rope_theta=float(rope_theta),
        rope_scaling=_freeze(rope),
        sliding_window=sliding_window,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _opt_fields(hf: dict[str, Any]) -> dict[str, Any]:
    num_heads = hf["num_attention_heads"]
    bias = bool(hf.get("enable_bias", True))
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    proj_dim = hf.get("word_embed_proj_dim") or hf["hidden_size"]
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=false is not supported")
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
        learned_position_offset=2,
        word_embed_proj_dim=proj_dim if proj_dim != hf["hidden_size"] else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _freeze(value):
    """Dicts and lists to tagged nested tuples, so the config stays hashable (a static jit argument)."""
    if isinstance(value, dict):
        return ("__dict__",) + tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return ("__list__",) + tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1:]}
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1:]]
    return value
