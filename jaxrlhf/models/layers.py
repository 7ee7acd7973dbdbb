"""Decoder building blocks as Flax NNX modules.

Every parameter carries logical axis names (`axes` metadata), which the sharding rules in
`jaxrlhf.parallel` map to mesh axes. Block parameters are created stacked on a leading
"layers" axis so that the decoder runs its blocks with one `lax.scan` (compile time does not
grow with depth); a block module therefore only computes on one layer's slice, merged in by
the scan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.config import ACTIVATIONS, DecoderConfig

MASKED_SCORE = -1e30  # a masked score in the written-out attention: finite, so no inf - inf = NaN


class LoraParam(nnx.Param):
    """A low-rank adapter weight: trained when LoRA is on, merged into the kernel on export."""


def make_param(rngs: nnx.Rngs | None, shape, axes, init: str, dtype, stack: int | None = None):
    """A parameter of `shape` with logical `axes`; with `stack`, a leading "layers" axis is added."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:  # "normal": the 0.02 std init HF uses for these families
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class Dense(nnx.Module):
    """y = x . kernel (+ bias), contracting x's trailing `in_shape` dims; optional LoRA adapter."""

    def __init__(
        self,
        in_shape,
        out_shape,
        in_axes,
        out_axes,
        *,
        bias: bool,
        config: DecoderConfig,
        rngs: nnx.Rngs,
        stack: int | None = None,
    ):
        dtype = config.weight_dtype
        self.in_ndim = len(in_shape)
        self.kernel = make_param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), "normal", dtype, stack)
        self.bias = make_param(rngs, out_shape, out_axes, "zeros", dtype, stack) if bias else None
        self.out_shape, self.out_axes, self.stack = tuple(out_shape), tuple(out_axes), stack
        self.in_shape, self.in_axes = tuple(in_shape), tuple(in_axes)
        self.compute_dtype = config.compute_dtype
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # filled by add_lora
        self.lora_scale = 0.0

    def add_lora(self, rank: int, alpha: float, rngs: nnx.Rngs):
        """Adds a rank-`rank` adapter B.A initialised so that the layer's output is unchanged.
        Adapters are float32 (they are what trains) whatever the frozen kernel's dtype."""
        dtype = jnp.float32
        stack = (self.stack,) if self.stack is not None else ()
        lead = ("layers",) if self.stack is not None else ()
        a_shape = (*stack, *self.in_shape, rank)
        fan_in = math.prod(self.in_shape)
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / math.sqrt(fan_in)
        self.lora_a = LoraParam(a.astype(dtype), axes=(*lead, *self.in_axes, "lora_rank"))
        self.lora_b = LoraParam(
            jnp.zeros((*stack, rank, *self.out_shape), dtype), axes=(*lead, "lora_rank", *self.out_axes)
        )
        self.lora_scale = alpha / rank

    def merged_kernel(self):
        """The kernel with the adapter folded in, W + scale * A.B, in the kernel's dtype."""
        kernel = self.kernel[...]
        if self.lora_a is None:
            return kernel
        product = lambda a, b: jnp.tensordot(a, b, axes=1)
        if self.stack is not None:
            product = jax.vmap(product)
        delta = product(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        return (kernel.astype(jnp.float32) + self.lora_scale * delta).astype(kernel.dtype)

    def __call__(self, x):
        x = x.astype(self.compute_dtype)
        kernel = self.kernel[...].astype(self.compute_dtype)
        y = jnp.tensordot(x, kernel, axes=self.in_ndim)
        if self.lora_a is not None:
            down = jnp.tensordot(x, self.lora_a[...].astype(self.compute_dtype), axes=self.in_ndim)
            y = y + self.lora_scale * jnp.tensordot(down, self.lora_b[...].astype(self.compute_dtype), axes=1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (LLaMA family) or LayerNorm (OPT, GPT-NeoX, GPT-2), computed in float32; Gemma's
    RMSNorm scales by (1 + weight)."""

    def __init__(self, dim: int, config: DecoderConfig, rngs: nnx.Rngs | None, stack: int | None = None):
        self.kind, self.eps, self.compute_dtype = config.norm, config.norm_eps, config.compute_dtype
        self.plus_one = config.norm_plus_one
        init = "zeros" if self.plus_one else "ones"
        self.scale = make_param(rngs, (dim,), ("norm",), init, config.weight_dtype, stack)
        self.bias = (
            make_param(rngs, (dim,), ("norm",), "zeros", config.weight_dtype, stack) if config.norm == "layer" else None
        )

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + scale if self.plus_one else scale)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


def rope_inverse_frequencies(config: DecoderConfig, windowed: bool = False) -> jnp.ndarray:
    """Per-pair rotation frequencies [rope_dim // 2], with HF's linear and llama3 scalings; a
    `windowed` layer of Gemma 3 turns by the default rope at its own base, `local_rope_theta`."""
    dim = config.rope_dim
    if windowed and config.local_rope_theta is not None:
        return 1.0 / (config.local_rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    params = config.rope_parameters()
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq, interleaved: bool = False):
    """Rotates pairs of the first 2 * len(inv_freq) dims of each head, the rest passing unrotated
    (GPT-NeoX's and GPT-J's partial rotary). Pair i is (x_i, x_{i + rot/2}), HF's rotate_half
    convention, or with `interleaved` (x_{2i}, x_{2i+1}), GPT-J's rotate_every_two; either way it
    turns by positions * inv_freq[i]. x: [batch, seq, heads, dim]."""
    rot = 2 * inv_freq.shape[-1]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, seq, rot/2]
    x32 = x[..., :rot].astype(jnp.float32)
    if interleaved:  # each angle turns the adjacent pair (x_2i, x_2i+1)
        angles = jnp.repeat(angles, 2, axis=-1)
        rotated = jnp.stack([-x32[..., 1::2], x32[..., 0::2]], axis=-1).reshape(x32.shape)
    else:  # each angle turns (x_i, x_i+rot/2)
        angles = jnp.concatenate([angles, angles], axis=-1)
        rotated = jnp.concatenate([-x32[..., rot // 2 :], x32[..., : rot // 2]], axis=-1)
    out = (x32 * jnp.cos(angles)[:, :, None, :] + rotated * jnp.sin(angles)[:, :, None, :]).astype(x.dtype)
    return out if rot == x.shape[-1] else jnp.concatenate([out, x[..., rot:]], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's slope per head [heads], float32, as HF's BLOOM computes them: the geometric sequence
    of the largest power of two n <= heads, then, for the remaining heads, every other slope of the
    sequence for 2n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** -(2 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, closest + 1, dtype=np.float32)
    if closest != num_heads:
        extra_base = np.float32(2 ** -(2 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 2 * extra, 2, dtype=np.float32)])
    return slopes.astype(np.float32)


def alibi_bias(config: DecoderConfig, key_positions):
    """ALiBi's attention bias [batch, heads, 1, keys], float32: slope * the key's position
    (key_positions [batch, keys]), or None for a model without ALiBi. Softmax ignores a shift per
    query, so this is ALiBi's -slope * (query - key) distance, and HF's BLOOM bias exactly."""
    if config.positions != "alibi":
        return None
    slopes = jnp.asarray(alibi_slopes(config.num_heads))
    return slopes[None, :, None, None] * key_positions[:, None, None, :].astype(jnp.float32)


def attention(q, k, v, mask, implementation: str = "auto", bias=None, *, scale=None, softcap=None):
    """Softmax attention; q [b, t, heads, d], k/v [b, s, kv_heads, d], mask [b, 1, t, s] (True = attend),
    bias (ALiBi, or None) added to the scores, broadcastable to [b, heads, t, s]; the scores scaled
    by `scale` (None: d ** -0.5) and, with `softcap` (Gemma 2), capped as softcap * tanh(scores / softcap).

    Training and prefill, grouped-query heads included. "auto" takes cuDNN's fused flash
    attention on a GPU for bf16/fp16 inputs (it never materializes the [b, heads, t, s] scores;
    the mask becomes a bias) and falls back to XLA's attention when cuDNN refuses the shapes, the
    mask or its own version at trace time; "xla" and "cudnn" force one. Neither caps the scores,
    so a soft-capped model always takes `softcapped_attention`. (A decode step, one query
    against the KV cache, goes through `jaxrlhf.generation.kernels.decode_attention`.)
    """
    if softcap is not None:
        return softcapped_attention(q, k, v, mask, bias, scale, softcap)
    if implementation == "cudnn" or (implementation == "auto" and _cudnn_may_apply(q)):
        try:
            return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError, TypeError):
            if implementation == "cudnn":
                raise
    return jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation="xla")


def softcapped_attention(q, k, v, mask, bias, scale, softcap):
    """`attention` written out, the scores capped before the mask as HF's eager Gemma 2 does;
    float32 scores and softmax, the [b, heads, t, s] scores materialized."""
    batch, t, heads, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    scale = d**-0.5 if scale is None else scale
    groups = q.reshape(batch, t, kv_heads, heads // kv_heads, d)  # query head h reads kv head h // group
    scores = jnp.einsum("btkgd,bskd->bkgts", groups, k, preferred_element_type=jnp.float32) * scale
    scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + jnp.broadcast_to(bias, (batch, heads, t, s)).reshape(scores.shape)
    scores = jnp.where(mask[:, :, None], scores, MASKED_SCORE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, t, heads, d).astype(q.dtype)


def _cudnn_may_apply(q) -> bool:
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


class Attention(nnx.Module):
    """Projections around an attention step the caller chooses (training, prefill or decode):
    `project` gives rotated q, k, v; `output` maps the attended heads back to the residual stream."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs, stack: int | None = None):
        e, n, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dense = lambda i, o, ia, oa, bias: Dense(i, o, ia, oa, bias=bias, config=config, rngs=rngs, stack=stack)
        self.q_proj = dense((e,), (n, d), ("embed",), ("heads", "head_dim"), config.qkv_bias)
        self.k_proj = dense((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), config.qkv_bias)
        self.v_proj = dense((e,), (kv, d), ("embed",), ("kv_heads", "head_dim"), config.qkv_bias)
        self.o_proj = dense((n, d), (e,), ("heads", "head_dim"), ("embed",), config.out_bias)
        self.q_norm = Norm(d, config, rngs, stack) if config.qk_norm else None
        self.k_norm = Norm(d, config, rngs, stack) if config.qk_norm else None
        self.use_rope = config.positions == "rope"
        self.rotary_interleaved = config.rotary_interleaved
        self.implementation = config.attention
        self.scale, self.softcap = config.attention_scale, config.attn_logit_softcap

    def project(self, x, positions, inv_freq):
        """x [b, t, e] -> q [b, t, heads, d], k and v [b, t, kv_heads, d], rotary applied."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:  # per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            rope = lambda t: apply_rope(t, positions, inv_freq, self.rotary_interleaved)
            q, k = rope(q), rope(k)
        return q, k, v

    def output(self, attended):
        """[b, t, heads, d] -> [b, t, e]."""
        return self.o_proj(attended)

    def __call__(self, x, positions, mask, inv_freq, bias=None):
        q, k, v = self.project(x, positions, inv_freq)
        attended = attention(q, k, v, mask, self.implementation, bias, scale=self.scale, softcap=self.softcap)
        return self.output(attended)


class MLP(nnx.Module):
    """SwiGLU (gate_proj, up_proj, down_proj) or a plain up_proj -> activation -> down_proj (OPT, GPT-NeoX, GPT-2)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs, stack: int | None = None):
        e, m, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        dense = lambda i, o, ia, oa: Dense((i,), (o,), (ia,), (oa,), bias=bias, config=config, rngs=rngs, stack=stack)
        self.gate_proj = dense(e, m, "embed", "mlp") if config.gated_mlp else None
        self.up_proj = dense(e, m, "embed", "mlp")
        self.down_proj = dense(m, e, "mlp", "embed")
        self.activation = ACTIVATIONS[config.activation]

    def __call__(self, x):
        hidden = (
            self.activation(self.up_proj(x))
            if self.gate_proj is None
            else (self.activation(self.gate_proj(x)) * self.up_proj(x))
        )
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """Attention then MLP, each wrapped in a residual, with the norm before (default) or after;
    or both side by side on the same input (GPT-NeoX's parallel residual), each with its own
    norm or, GPT-J, both reading one (`mlp_norm` is then None). Gemma also norms each sub-block's
    output before its residual add (`post_attn_norm`, `post_mlp_norm`)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs, stack: int | None = None):
        post_norm = lambda: Norm(config.hidden_size, config, rngs, stack) if config.post_norms else None
        self.attn_norm = Norm(config.hidden_size, config, rngs, stack)
        self.attn = Attention(config, rngs, stack)
        self.post_attn_norm = post_norm()
        self.mlp_norm = None if config.shared_norm else Norm(config.hidden_size, config, rngs, stack)
        self.mlp = MLP(config, rngs, stack)
        self.post_mlp_norm = post_norm()
        self.norm_before = config.norm_before_block
        self.parallel = config.parallel_residual or config.shared_norm

    def __call__(self, x, attend):
        """x [b, t, e] -> (x, aux). `attend(attn, h) -> (out, aux)` runs the attention sub-block,
        the one place where training, prefill and a cached decode step differ (aux: e.g. the
        updated KV cache)."""
        if self.parallel:  # x + attn(attn_norm(x)) + mlp(mlp_norm(x)), or one norm for both (GPT-J)
            normed = self.attn_norm(x)
            h, aux = attend(self.attn, normed)
            return x + h + self.mlp(normed if self.mlp_norm is None else self.mlp_norm(x)), aux
        h = self.attn_norm(x) if self.norm_before else x
        h, aux = attend(self.attn, h)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        if not self.norm_before:
            x = self.attn_norm(x)
        h = self.mlp(self.mlp_norm(x) if self.norm_before else x)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        x = x + h
        if not self.norm_before:
            x = self.mlp_norm(x)
        return x, aux
