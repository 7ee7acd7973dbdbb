"""The hybrid engine: the actor trains in the FSDP layout and generates in a tensor-parallel one.

Per rollout: one jitted program folds LoRA adapters into the kernels, unstacks the blocks, casts
every weight to the compute dtype (float32 master weights -> bf16) and writes each array
straight into its tensor-parallel shards over the same devices (leaf by leaf, no replicated
intermediate, no host copy); then generate, and let the generation copy go. The copy is made
on one device too: generation must not read float32 master weights or slice stacked layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrlhf.generation.generate import Generation, SamplingSettings, generate_from_state
from jaxrlhf.generation.layout import to_generation_layout
from jaxrlhf.parallel.mesh import make_mesh
from jaxrlhf.parallel.rules import (
    GENERATION_RULES,
    Rules,
    batch_sharding,
    logical_to_spec,
    state_shardings,
)


@dataclass
class GenerationTimings:
    reshard_s: float
    generate_s: float


class HybridEngine:
    """Generates with an actor given in its training layout; see the module docstring.

    `states` is the actor's split state as a tuple, e.g. (trainable params, frozen rest).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        states: tuple,
        train_mesh: Mesh,
        tensor_parallel: int,
        settings: SamplingSettings,
        rules: Rules = GENERATION_RULES,
    ):
        self.settings = settings
        self.rules = rules
        devices = train_mesh.devices.flatten()
        self.mesh = make_mesh(data=1, fsdp=-1, tensor=tensor_parallel, devices=devices)

        def generation_model(states):
            return to_generation_layout(nnx.merge(graphdef, *states))

        self.graphdef, abstract = nnx.split(nnx.eval_shape(generation_model, states))
        self.shardings = state_shardings(abstract, rules, self.mesh)
        self._to_generation = jax.jit(
            lambda states: nnx.split(generation_model(states))[1], out_shardings=self.shardings
        )
        # KV cache buffers [batch, kv_heads, max_len, head_dim]: rows like the prompts, kv heads like k_proj.
        kv_heads = nnx.merge(graphdef, *states).config.num_kv_heads
        rows = batch_sharding(self.mesh, 2, rules).spec[0]
        heads = logical_to_spec(("kv_heads",), (kv_heads,), rules, self.mesh)
        self.cache_sharding = NamedSharding(self.mesh, PartitionSpec(rows, *(heads or (None,)), None, None))
        row_shards = self.mesh.devices.size // tensor_parallel
        if settings.engine == "refill" and settings.slots % row_shards:
            raise ValueError(
                f"generation slots={settings.slots} must be a multiple of the {row_shards} row shards of the "
                f"generation mesh (devices / tensor_parallel): each shard decodes its own slots"
            )

    def generation_state(self, states: tuple) -> nnx.State:
        """The actor's weights in the generation layout and shardings (a new copy)."""
        return self._to_generation(states)

    def generate_with(self, state: nnx.State, prompt_ids, prompt_mask, key, samples_per_prompt: int = 1) -> Generation:
        """Generates from a generation-layout state (e.g. one kept across calls by a chat session);
        `samples_per_prompt` n gives prompts * n rows, prompt-major, each prompt prefilled once."""
        rows = batch_sharding(self.mesh, 2, self.rules)
        prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), rows)
        return generate_from_state(
            self.graphdef,
            state,
            prompt_ids,
            prompt_mask,
            key,
            self.settings,
            self.cache_sharding,
            samples_per_prompt=samples_per_prompt,
            activations=(self.mesh, self.rules),
        )

    def generate(
        self, states: tuple, prompt_ids, prompt_mask, key, samples_per_prompt: int = 1
    ) -> tuple[Generation, GenerationTimings]:
        start = time.perf_counter()
        state = jax.block_until_ready(self.generation_state(states))
        resharded = time.perf_counter()
        out = jax.block_until_ready(self.generate_with(state, prompt_ids, prompt_mask, key, samples_per_prompt))
        del state  # the generation copy is freed here
        return out, GenerationTimings(resharded - start, time.perf_counter() - resharded)
