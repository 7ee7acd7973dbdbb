"""What every family module builds on: the entries of its weight map and the reading of rotary settings.

A weight map lists every Hugging Face tensor of a family and the parameters of ours it holds, each
as a numpy *view* of the HF tensor in our layout (reshape, transpose and indexing only). Loading
applies the view to the memory-mapped file and copies out just the slice one device needs;
saving applies the same view to learn where in the file each element of a device's slice lies,
and writes it there. So one function per parameter serves both directions, fused tensors
(GPT-NeoX `query_key_value`, GPT-2 `c_attn`) included: each of q, k, v is a different view of
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


def require_unset(hf: dict[str, Any], **defaults) -> None:
    """Refuses, naming the key, an option of the HF config that the shared decoder does not run."""
    for key, default in defaults.items():
        if hf.get(key, default) != default:
            raise ValueError(f"{hf['model_type']} with {key}={hf[key]!r} is not supported")
