"""What every family module builds on: the entries of its weight map and the reading of rotary settings.

A weight map lists every Hugging Face tensor of a family and the parameters of ours it holds, each
as a numpy *view* of the HF tensor in our layout (reshape, transpose and indexing only). Loading
applies the view to the memory-mapped file and copies out just the slice one device needs;
saving applies the same view to learn where in the file each element of a device's slice lies,
and writes it there. So one function per parameter serves both directions, fused tensors
(GPT-NeoX and BLOOM `query_key_value`, GPT-2 `c_attn`) included: each of q, k, v is a different view of
the one tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

Path = tuple[str, ...]  # our parameter path, e.g. ("decoder", "layers", "attn", "q_proj", "kernel")
View = Callable[[np.ndarray], np.ndarray]  # one HF tensor -> one parameter of ours, as a view
LAYERS: Path = ("decoder", "layers")  # parameters under it are stacked [layers, ...]; their HF names hold "{i}"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor (`name` holds "{i}" for a per-layer tensor) of `shape`, and the parameters of
    ours it holds, each with its view. Entries for parameters a model lacks (a bias it does not
    have, the LM head of a tied model, the value head of a causal LM) are skipped."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[Path, View], ...]


def same(name: str, path: Path, shape) -> Tensor:
    """A tensor stored exactly as we store it (embeddings, norm weights)."""
    return Tensor(name, tuple(shape), ((path, lambda w: w),))


def transposed(name: str, path: Path, shape) -> Tensor:
    """A [vocab, embed] HF matrix that we store as [embed, vocab] (the LM head)."""
    return Tensor(name, tuple(shape), ((path, lambda w: w.T),))


def linear(name: str, path: Path, in_shape, out_shape) -> list[Tensor]:
    """A torch Linear (weight [out, in], flat) holding our Dense at `path` (kernel [*in, *out]) and its bias."""
    n_out = len(out_shape)

    def kernel(w):
        w = w.reshape(*out_shape, *in_shape)
        return w.transpose(*range(n_out, w.ndim), *range(n_out))

    return [
        Tensor(f"{name}.weight", (math.prod(out_shape), math.prod(in_shape)), ((path + ("kernel",), kernel),)),
        Tensor(f"{name}.bias", (math.prod(out_shape),), ((path + ("bias",), lambda b: b.reshape(out_shape)),)),
    ]


def conv1d(name: str, path: Path, in_shape, out_shape) -> list[Tensor]:
    """GPT-2's Conv1D (weight stored transposed, [in, out], flat) holding our Dense at `path`, and its bias."""
    return [
        Tensor(
            f"{name}.weight",
            (math.prod(in_shape), math.prod(out_shape)),
            ((path + ("kernel",), lambda w: w.reshape(*in_shape, *out_shape)),),
        ),
        Tensor(f"{name}.bias", (math.prod(out_shape),), ((path + ("bias",), lambda b: b.reshape(out_shape)),)),
    ]


def norm(name: str, path: Path, dim: int) -> list[Tensor]:
    """RMSNorm or LayerNorm: weight -> scale, bias -> bias (LayerNorm only)."""
    return [same(f"{name}.weight", path + ("scale",), (dim,)), same(f"{name}.bias", path + ("bias",), (dim,))]


def rope_fields(hf: dict[str, Any], theta_key: str = "rope_theta") -> tuple[float, dict[str, Any]]:
    """(rope_theta, the rest of HF's rope parameters) from `rope_parameters` (transformers 5) or the
    older `rope_scaling` + `theta_key`; refuses a scaling we do not compute."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get(theta_key, 10000.0))
    rope_type = rope.pop("type", None) or rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    rope["rope_type"] = rope_type
    return float(theta), rope


WINDOWED, FULL = "sliding_attention", "full_attention"  # HF's layer_types


def layer_windows(hf: dict[str, Any], layer_types) -> tuple[int | None, ...]:
    """Per-layer windows from HF's `layer_types`: a "sliding_attention" layer sees the last
    `sliding_window` keys, a "full_attention" layer all; () when the config has no window."""
    unknown = sorted(set(layer_types) - {WINDOWED, FULL})
    if unknown:
        raise ValueError(f"{hf['model_type']} with layer_types {unknown} is not supported")
    window = hf.get("sliding_window")
    return () if window is None else tuple(window if kind == WINDOWED else None for kind in layer_types)


def window_and_layer_types(config) -> tuple[int | None, list[str]]:
    """HF's (sliding_window, layer_types) for our per-layer windows: transformers has one window size."""
    sizes = sorted({window for window in config.layer_windows if window is not None})
    if len(sizes) > 1:
        raise ValueError(f"{config.model_type} has one sliding window in transformers, not {sizes}")
    types = [FULL if config.window(layer) is None else WINDOWED for layer in range(config.num_layers)]
    return (sizes[0] if sizes else None), types


def require_unset(hf: dict[str, Any], **defaults) -> None:
    """Refuses, naming the key, an option of the HF config that the shared decoder does not run."""
    for key, default in defaults.items():
        if hf.get(key, default) != default:
            raise ValueError(f"{hf['model_type']} with {key}={hf[key]!r} is not supported")


def per_head_qkv_views(part: int, heads: int, head_dim: int, hidden: int) -> tuple[View, View]:
    """Views of q (part 0), k (1) or v (2) in a fused torch Linear whose output dim is laid out
    per head as [heads, 3, head_dim]: weight [heads * 3 * head_dim, hidden] -> our kernel
    [hidden, heads, head_dim]; bias [heads * 3 * head_dim] -> [heads, head_dim]."""
    kernel = lambda w: w.reshape(heads, 3, head_dim, hidden)[:, part].transpose(2, 0, 1)
    bias = lambda b: b.reshape(heads, 3, head_dim)[:, part]
    return kernel, bias


def per_head_qkv(name: str, attn: Path, heads: int, head_dim: int, hidden: int) -> list[Tensor]:
    """GPT-NeoX's and BLOOM's `query_key_value` (weight and bias): our q_proj, k_proj and v_proj
    under `attn`, each a strided view of it."""
    views = [per_head_qkv_views(part, heads, head_dim, hidden) for part in range(3)]
    paths = [attn + (projection,) for projection in ("q_proj", "k_proj", "v_proj")]
    return [
        Tensor(
            f"{name}.weight",
            (3 * heads * head_dim, hidden),
            tuple((path + ("kernel",), kernel) for path, (kernel, _) in zip(paths, views)),
        ),
        Tensor(
            f"{name}.bias",
            (3 * heads * head_dim,),
            tuple((path + ("bias",), bias) for path, (_, bias) in zip(paths, views)),
        ),
    ]
