"""The generation layout of a causal LM: LoRA folded in, one module per block, weights in the compute dtype.

Training keeps stacked float32 master weights (one `lax.scan` over layers, FSDP shards). A decode
step is memory bound: it should read every weight once, where it lies, in the dtype it computes
in. So generation runs on a copy made once per rollout: adapters merged, blocks unstacked (no
per-layer slice of a stacked array inside the step), every array cast to the compute dtype
(bf16 instead of float32 halves the bytes read per token).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.lora import merge_lora


def generation_config(config: DecoderConfig) -> DecoderConfig:
    return dataclasses.replace(config, scan_layers=False, param_dtype=config.dtype, remat="none")


def to_generation_layout(model: nnx.Module) -> nnx.Module:
    """A new model of the same class in the generation layout (see the module docstring); jit-able.
    Adapters are merged into `model` in place first."""
    config = model.config
    merge_lora(model)
    target = nnx.eval_shape(lambda: type(model)(generation_config(config), nnx.Rngs(0)))
    graphdef, target_state = nnx.split(target)
    source = dict(nnx.to_flat_state(nnx.state(model)))
    unstack = config.scan_layers
    filled = []
    for path, variable in nnx.to_flat_state(target_state):
        if unstack and path[:2] == ("decoder", "layers"):
            value = source[path[:2] + path[3:]].get_value()[path[2]]  # layer path[2] of the stacked weight
        else:
            value = source[path].get_value()
        filled.append((path, variable.replace(value=value.astype(variable.get_value().dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
