"""Models with fresh random weights, created directly in their shards (for benchmarks and tests)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.parallel.rules import TRAINING_RULES, Rules, state_shardings


def create_model(
    config: DecoderConfig, seed: int = 0, mesh: Mesh | None = None, rules: Rules = TRAINING_RULES, model_cls=CausalLM
):
    """Initializes under jit with the target shardings as outputs, so no device holds it whole."""
    if mesh is None:
        return model_cls(config, nnx.Rngs(seed))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(config, nnx.Rngs(seed))))
    shardings = state_shardings(abstract, rules, mesh)
    state = jax.jit(lambda: nnx.split(model_cls(config, nnx.Rngs(seed)))[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
