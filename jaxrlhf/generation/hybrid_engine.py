"""The hybrid engine: the actor trains in the FSDP layout and generates in a tensor-parallel one.

Per call: fold LoRA adapters into the kernels (if any) and move every weight straight from its
FSDP shards to its tensor-parallel shards over the same devices (one jitted program with the
generation shardings as outputs: leaf by leaf, no replicated intermediate, no host copy),
generate, and let the generation copy go. On one device without LoRA
the training weights are used as they are: no copy at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.generation.generate import Generation, SamplingSettings, generate_from_state
from jaxrlhf.models.lora import has_lora, merge_lora
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.parallel.rules import GENERATION_RULES, batch_sharding, state_shardings


@dataclass
class GenerationTimings:
    reshard_s: float
    generate_s: float


class HybridEngine:
    """Generates with an actor given in its training layout; see the module docstring.

    `states` is the actor's split state as a tuple, e.g. (trainable params, frozen rest).
    """

    def __init__(self, graphdef: nnx.GraphDef, states: tuple, train_mesh: Mesh, tensor_parallel: int,
                 settings: SamplingSettings):
        self.train_graphdef = graphdef
        self.settings = settings
        self.uses_lora = has_lora(nnx.merge(graphdef, *states))
        devices = train_mesh.devices.flatten()
        self.mesh = make_mesh(data=1, fsdp=-1, tensor=tensor_parallel, devices=devices)
        self.no_copy = len(devices) == 1 and not self.uses_lora

        def merged(states):
            return merge_lora(nnx.merge(graphdef, *states))

        self.graphdef, abstract = nnx.split(nnx.eval_shape(merged, states))
        self.shardings = state_shardings(abstract, GENERATION_RULES, self.mesh)
        # One jitted program folds LoRA in (if any) and writes every weight straight into its
        # tensor-parallel shards: a reshard leaf by leaf on device, no host copy.
        self._to_generation = jax.jit(lambda states: nnx.split(merged(states))[1], out_shardings=self.shardings)

    def generation_state(self, states: tuple) -> nnx.State:
        """The actor's weights in the generation layout (LoRA merged)."""
        if self.no_copy:
            return nnx.split(nnx.merge(self.train_graphdef, *states))[1]  # the same arrays, regrouped
        return self._to_generation(states)

    def generate(self, states: tuple, prompt_ids, prompt_mask, key) -> tuple[Generation, GenerationTimings]:
        start = time.perf_counter()
        state = jax.block_until_ready(self.generation_state(states))
        resharded = time.perf_counter()
        rows = batch_sharding(self.mesh, 2, GENERATION_RULES)
        prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), rows)
        out = generate_from_state(self.graphdef, state, prompt_ids, prompt_mask, key, self.settings)
        out = jax.block_until_ready(out)
        del state  # the generation copy is freed here (unless it is the training state itself)
        return out, GenerationTimings(resharded - start, time.perf_counter() - resharded)
