"""LoRA: low-rank adapters on chosen projections, trained alone, merged for generation and export."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxrlhf.models.families import family
from jaxrlhf.models.layers import Dense, LoraParam


def apply_lora(model: nnx.Module, rank: int, alpha: float, target_modules, seed: int = 0) -> int:
    """Adds adapters to every Dense whose attribute name is in `target_modules`; returns how many.
    Targets are our names (q_proj ... down_proj, any family) or the model family's own
    (`LORA_TARGETS`: OPT's fc1, GPT-NeoX's query_key_value, GPT-2's c_attn, ...)."""
    config = getattr(model, "config", None)  # a bare block (the memory planner's) has none: our names only
    aliases = family(config.model_type).LORA_TARGETS if config is not None else {}
    targets = {ours for name in target_modules for ours in aliases.get(name, (name,))}
    rngs = nnx.Rngs(seed)
    count = 0
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and path and path[-1] in targets:
            module.add_lora(rank, alpha, rngs)
            count += 1
    if count == 0:
        raise ValueError(f"lora.target_modules {sorted(target_modules)} matched no projection of the model")
    return count


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, Dense) and m.lora_a is not None for _, m in nnx.iter_graph(model))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds each adapter into its kernel (W + scale * A.B) and removes it, in place; jit-able."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora_a is not None:
            module.kernel.set_value(module.merged_kernel())
            module.lora_a, module.lora_b = None, None
    return model


def trainable_filter(lora_rank: int):
    """What the optimizer updates: with LoRA on, the adapters and a value model's new head (it starts
    at zero and has no adapter); every parameter otherwise."""
    return nnx.Any(LoraParam, nnx.PathContains("value_head")) if lora_rank > 0 else nnx.Param


def adapters_off(params: nnx.State) -> nnx.State:
    """A trainable state with every LoRA B set to zero: exactly the frozen base model, which
    serves as the reference policy (PPO, DPO) without a second copy of the weights."""
    flat = [
        (path, v.replace(value=jnp.zeros_like(v.get_value())) if path[-1] == "lora_b" else v)
        for path, v in nnx.to_flat_state(params)
    ]
    return nnx.from_flat_state(flat)
