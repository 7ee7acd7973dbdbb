"""What XLA makes of generation, from shapes alone: memory, bytes per decode step, and the decode loop's buffers.

Nothing here allocates weights: the model is an `nnx.eval_shape` of the generation layout and the
programs are lowered from `jax.ShapeDtypeStruct`s and compiled, so a 70B-class shape can be
checked on a laptop CPU. Used by `scripts/bench_generate.py --memory` and by the tests.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrlhf.generation.generate import DecodeState, SamplingSettings, decode_step, generate_from_state
from jaxrlhf.generation.kv_cache import KVCache, prefill
from jaxrlhf.generation.layout import generation_config
from jaxrlhf.models.config import DecoderConfig
from jaxrlhf.models.decoder import CausalLM, positions_from_mask


@dataclasses.dataclass
class GenerationReport:
    generate_temp_bytes: int  # XLA's temporary memory for the whole generate program
    cache_bytes: int  # the KV cache (part of the temporary memory: it lives inside the program)
    prefill_temp_bytes: int  # temporary memory of the prefill alone, cache excluded: one layer's activations
    weight_bytes: int  # the generation copy of the weights (program arguments)
    step_bytes_accessed: float | None  # XLA's cost model for one decode step (None where it has none)
    step_ideal_bytes: int  # weights read once, the filled cache read once, the new keys/values written once
    decode_loop_big_buffers: list[str]  # optimized-HLO lines of the decode loop materializing >= a layer's cache

    def summary(self) -> str:
        gb = lambda n: f"{n / 1e9:.3f} GB"
        lines = [
            f"generate temporary memory {gb(self.generate_temp_bytes)} = KV cache {gb(self.cache_bytes)} "
            f"+ {gb(self.generate_temp_bytes - self.cache_bytes)} "
            f"(one layer's prefill activations: {gb(self.prefill_temp_bytes)})",
            f"generation weights {gb(self.weight_bytes)}",
        ]
        if self.step_bytes_accessed is not None:
            lines.append(
                f"decode step: XLA bytes accessed {gb(self.step_bytes_accessed)}, ideal {gb(self.step_ideal_bytes)} "
                f"({self.step_bytes_accessed / self.step_ideal_bytes:.2f}x)"
            )
        big = self.decode_loop_big_buffers
        lines.append(
            "decode loop buffers of a layer's cache size or more, besides the in-place cache update: "
            + (f"{len(big)}, e.g. {big[0]}" if big else "none")
        )
        return "\n".join(lines)


def abstract_generation_model(config: DecoderConfig):
    """(graphdef, abstract state) of a CausalLM in the generation layout: shapes only."""
    return nnx.split(nnx.eval_shape(lambda: CausalLM(generation_config(config), nnx.Rngs(0))))


def generation_report(
    config: DecoderConfig, batch: int, prompt_len: int, new_tokens: int, settings: SamplingSettings | None = None
) -> GenerationReport:
    """Compiles generate, prefill and one decode step for these shapes on the default backend."""
    graphdef, state = abstract_generation_model(config)
    gen_config = generation_config(config)
    settings = settings or SamplingSettings(eos_id=0, pad_id=0, max_new_tokens=new_tokens, greedy=True)
    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    generate = generate_from_state.lower(graphdef, state, ids, ids, key, settings).compile()
    max_len = prompt_len + new_tokens

    prefill_memory = compile_prefill(graphdef, state, batch, prompt_len, max_len).memory_analysis()
    step = compile_decode_step(graphdef, state, batch, prompt_len, new_tokens, settings)
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    bytes_accessed = (cost or {}).get("bytes accessed")

    itemsize = gen_config.compute_dtype.itemsize
    slot_bytes = 2 * gen_config.num_layers * batch * gen_config.num_kv_heads * gen_config.head_dim * itemsize
    weight_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    filled = prompt_len + new_tokens // 2  # slots filled at the average decode step
    layer_cache_elements = batch * gen_config.num_kv_heads * max_len * gen_config.head_dim
    return GenerationReport(
        generate_temp_bytes=generate.memory_analysis().temp_size_in_bytes,
        cache_bytes=slot_bytes * max_len,
        prefill_temp_bytes=prefill_memory.temp_size_in_bytes,
        weight_bytes=weight_bytes,
        step_bytes_accessed=None if bytes_accessed is None or jax.default_backend() == "cpu" else bytes_accessed,
        step_ideal_bytes=weight_bytes + slot_bytes * (filled + 1),
        decode_loop_big_buffers=decode_loop_big_buffers(generate.as_text(), layer_cache_elements),
    )


def compile_prefill(graphdef, state, batch: int, prompt_len: int, max_len: int):
    """The prefill alone (cache of `max_len` slots, last-position logits) as its own jitted program."""

    def prefill_only(state, ids, mask):
        model = nnx.merge(graphdef, state)
        cache = KVCache.zeros(model.config, batch, max_len)
        hidden, cache = prefill(model, ids, mask, positions_from_mask(mask), cache)
        return model.logits(hidden[:, -1:]), cache

    ids = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    return jax.jit(prefill_only).lower(state, ids, ids).compile()


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@dataclasses.dataclass
class SamplesPerPromptFlops:
    """XLA's FLOP counts for n samples of each of `batch` prompts."""

    with_n: float  # generate(batch prompts, samples_per_prompt=n): one prefill per prompt
    repeated: float  # generate(the prompts repeated n times, samples_per_prompt=1)
    prefill: float  # one prefill of the batch prompts alone

    def summary(self, n: int) -> str:
        saved = self.repeated - self.with_n
        return (
            f"{n} samples per prompt: generate {self.with_n:.4g} FLOPs vs {self.repeated:.4g} with repeated prompts, "
            f"{saved:.4g} saved = {saved / self.prefill:.2f} prefills of the prompts (ideal {n - 1})"
        )


def samples_per_prompt_flops(
    config: DecoderConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    n: int,
    settings: SamplingSettings | None = None,
) -> SamplesPerPromptFlops:
    """Compiles generate with n samples per prompt, with n-times repeated prompts, and the prefill alone."""
    graphdef, state = abstract_generation_model(config)
    settings = settings or SamplingSettings(eos_id=0, pad_id=0, max_new_tokens=new_tokens, temperature=1.0)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def generate_flops(rows: int, samples: int) -> float:
        ids = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
        return compiled_flops(
            generate_from_state.lower(graphdef, state, ids, ids, key, settings, None, samples).compile()
        )

    return SamplesPerPromptFlops(
        with_n=generate_flops(batch, n),
        repeated=generate_flops(batch * n, 1),
        prefill=compiled_flops(compile_prefill(graphdef, state, batch, prompt_len, prompt_len + new_tokens)),
    )


def compile_decode_step(graphdef, state, batch: int, prompt_len: int, new_tokens: int, settings: SamplingSettings):
    """One decode step as its own jitted program, the carried state (cache included) donated."""
    model = nnx.merge(graphdef, state)
    config = model.config

    def step(state, decode_state, prompt_lengths, row_keys):
        return decode_step(nnx.merge(graphdef, state), decode_state, prompt_len, prompt_lengths, row_keys, settings)

    shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(s, dtype)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, prompt_len + new_tokens))
    decode_state = DecodeState(
        step=shape(),
        tokens=shape(batch, new_tokens),
        logprobs=shape(batch, new_tokens, dtype=jnp.float32),
        answer_mask=shape(batch, new_tokens),
        done=shape(batch, dtype=bool),
        cache=cache,
    )
    row_keys = jax.ShapeDtypeStruct((batch,), jax.random.key(0).dtype)
    return jax.jit(step, donate_argnums=1).lower(state, decode_state, shape(batch), row_keys).compile()


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
_ALIASES = {"parameter", "get-tuple-element", "tuple", "bitcast"}  # no new buffer


def decode_loop_big_buffers(hlo_text: str, min_elements: int) -> list[str]:
    """Instructions of every while loop body (the decode step) in optimized HLO that produce an
    array of at least `min_elements`, other than aliases and in-place dynamic-update-slice
    fusions: each is a cache-sized copy, transpose, conversion or temporary made on every step."""
    computations = _computations(hlo_text)
    bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo_text)
    return [line for body in bodies for line in big_buffers(computations.get(body, []), computations, min_elements)]


def entry_big_buffers(hlo_text: str, min_elements: int) -> list[str]:
    """The same check on the entry computation (e.g. of a single decode step compiled alone)."""
    computations = _computations(hlo_text)
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo_text, re.M).group(1)
    return big_buffers(computations[entry], computations, min_elements)


def big_buffers(lines: list[str], computations: dict[str, list[str]], min_elements: int) -> list[str]:
    offenders = []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, dtype, dims, opcode, rest = match.groups()
        elements = math.prod(int(d) for d in dims.split(",")) if dims else 1
        if elements < min_elements or opcode in _ALIASES:
            continue
        if opcode == "dynamic-update-slice" or (
            opcode == "fusion" and _root_opcode(computations, rest) == "dynamic-update-slice"
        ):
            continue
        offenders.append(f"{name} ({opcode} {dtype}[{dims}])")
    return offenders


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
        elif name is not None and line.startswith(" "):
            computations[name].append(line)
    return computations


def _root_opcode(computations, rest: str) -> str | None:
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    for line in computations.get(called.group(1), []) if called else []:
        if line.strip().startswith("ROOT"):
            match = _INSTRUCTION.match(line)
            return match.group(4) if match else None
    return None


def generate_temp_bytes(config: DecoderConfig, rows: int, prompt_len: int, settings: SamplingSettings) -> int:
    """XLA's temporary memory for the whole generate program of `rows` prompts (cache included)."""
    graphdef, state = abstract_generation_model(config)
    ids = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    compiled = generate_from_state.lower(graphdef, state, ids, ids, key, settings).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def refill_memory_summary(config: DecoderConfig, rows: int, prompt_len: int, new_tokens: int, slots: int) -> str:
    """The refill engine's temporary memory at `rows` and 4 x `rows` (the same slots) against static
    generation's: what grows with the rows is only the [rows, new] outputs."""
    refill = SamplingSettings(eos_id=0, pad_id=0, max_new_tokens=new_tokens, greedy=True, engine="refill", slots=slots)
    static = dataclasses.replace(refill, engine="static", slots=0)
    gb = lambda n: f"{n / 1e9:.3f} GB"
    cells = [
        f"{count} rows: refill {gb(generate_temp_bytes(config, count, prompt_len, refill))}, "
        f"static {gb(generate_temp_bytes(config, count, prompt_len, static))}"
        for count in (rows, 4 * rows)
    ]
    return f"generate temporary memory with {slots} refill slots vs static: " + "; ".join(cells)
