"""One decoder config for every supported family, read from a Hugging Face config.json.

The families differ only in a handful of switches (norm type, position encoding, MLP shape,
biases, where the norm sits, parallel residual, rotary layout); each family module in `jaxrlhf.models.families`
maps its config.json names onto them and back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

# HF activation names we run. HF "gelu" is the exact (erf) GELU; "gelu_new" and
# "gelu_pytorch_tanh" are the tanh approximation (jax.nn.gelu's default).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


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
    norm: str = "rms"  # "rms" (LLaMA family) or "layer" (OPT, GPT-NeoX, GPT-2)
    norm_eps: float = 1e-6
    norm_before_block: bool = True  # OPT-350m puts LayerNorm after the residual add
    parallel_residual: bool = False  # GPT-NeoX: x + attn(attn_norm(x)) + mlp(mlp_norm(x))
    shared_norm: bool = False  # GPT-J: the parallel branches read one norm, x + attn(ln(x)) + mlp(ln(x))
    final_norm: bool = True
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU (gate * up) vs a plain fc1 -> act -> fc2
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before rotary
    out_bias: bool = False
    positions: str = "rope"  # "rope", "learned" (OPT, GPT-2) or "alibi" (BLOOM: a bias per head on each key's position)
    rotary_dim: int | None = None  # GPT-NeoX, GPT-J: rotary on the first rotary_dim dims of each head (None: all)
    rotary_interleaved: bool = False  # GPT-J: rotate pairs (x0, x1), (x2, x3)... rather than the two halves
    rope_theta: float = 10000.0
    rope_scaling: tuple = ("__dict__",)  # hashable copy of HF's rope parameters
    learned_position_offset: int = 0  # OPT shifts position ids by 2
    word_embed_proj_dim: int | None = None  # OPT: embeddings narrower than the residual stream
    embed_norm: bool = False  # BLOOM: a norm on the token embeddings
    # per layer: its sliding window (a key is seen while query - key < window) or None (full attention);
    # () when no layer has one. HF's layer_types, Mistral's one window, Qwen's max_window_layers.
    layer_windows: tuple[int | None, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3: the windowed layers' rotary base (default rope)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    post_norms: bool = False  # Gemma 2/3: each sub-block's output is normed too, before the residual add
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size), in the compute dtype
    query_scale_dim: float | None = None  # Gemma: scores scaled by query_scale_dim ** -0.5 (None: head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: scores become cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2/3: logits become cap * tanh(logits / cap)
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False  # GPT-J: the LM head adds a bias per token
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # "none", "dots" (keep the weight matmuls' outputs) or "block": what the backward recomputes
    scan_layers: bool = True  # stacked blocks run by lax.scan (training); False: one module per block (generation)
    attention: str = "auto"  # training/prefill: "auto" (cuDNN flash on a GPU where it applies), "xla", "cudnn"
    hf_config: tuple = dataclasses.field(default=("__dict__",), compare=False, repr=False)

    def __post_init__(self):
        windows = tuple(self.layer_windows)
        if all(window is None for window in windows):
            windows = ()
        elif len(windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(windows)} entries for {self.num_layers} layers")
        object.__setattr__(self, "layer_windows", windows)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, None for full attention."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def attention_scale(self) -> float | None:
        """The scores' scale where it is not head_dim ** -0.5 (Gemma's query_pre_attn_scalar), else None."""
        return None if self.query_scale_dim is None else self.query_scale_dim**-0.5

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

    @property
    def rope_dim(self) -> int:
        """How many dims of each head rotate (GPT-NeoX and GPT-J rotate only the first `rotary_dim`)."""
        return self.rotary_dim or self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> DecoderConfig:
        """Builds the config from a config.json dict; raises on an unsupported family or option."""
        from jaxrlhf.models.families import family

        fields = family(hf.get("model_type")).config_fields(hf)
        if fields["activation"] not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {fields['activation']!r}; supported: {', '.join(ACTIVATIONS)}")
        fields.update(overrides)
        return cls(model_type=hf["model_type"], hf_config=freeze(hf), **fields)

    def to_hf(self) -> dict[str, Any]:
        """config.json for transformers: the loaded one (token ids and the like) with every
        architecture key written from this config by its family."""
        from jaxrlhf.models.families import family

        return {**self.hf_dict(), **family(self.model_type).to_hf(self)}


def freeze(value):
    """Dicts and lists to tagged nested tuples, so the config stays hashable (a static jit argument)."""
    if isinstance(value, dict):
        return ("__dict__",) + tuple((k, freeze(v)) for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ("__list__",) + tuple(freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, tuple) and value and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1:]}
    if isinstance(value, tuple) and value and value[0] == "__list__":
        return [_thaw(v) for v in value[1:]]
    return value
