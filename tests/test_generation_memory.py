"""What XLA compiles for generation touches each cache byte once: no cache-sized copy, transpose or
conversion in the decode loop, the cache updated in place, and no more temporary memory than the
cache plus one layer's prefill activations. Shapes only: no weights are allocated."""

import jax
import jax.numpy as jnp
import pytest
import transformers

from jaxrlhf.generation.compiled_report import (
    abstract_generation_model,
    compile_decode_step,
    decode_loop_big_buffers,
    entry_big_buffers,
    generation_report,
)
from jaxrlhf.generation.generate import SamplingSettings
from jaxrlhf.models import DecoderConfig

BATCH, PROMPT, NEW = 8, 64, 64


def small_config(family: str, dtype: str) -> DecoderConfig:
    if family == "llama_gqa":
        hf = transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    else:
        hf = transformers.OPTConfig(
            vocab_size=512,
            hidden_size=128,
            ffn_dim=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            max_position_embeddings=256,
        )
    return DecoderConfig.from_hf(hf.to_dict(), dtype=dtype, param_dtype=dtype)


def layer_cache_elements(config: DecoderConfig) -> int:
    return BATCH * config.num_kv_heads * (PROMPT + NEW) * config.head_dim


@pytest.mark.parametrize("family", ["llama_gqa", "opt"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_loop_materializes_nothing_cache_sized(family, dtype):
    if dtype == "bfloat16" and jax.default_backend() == "cpu":
        pytest.skip(
            "XLA:CPU has no bfloat16 arithmetic: it rewrites a bf16 cache update as "
            "convert(dynamic-update-slice(convert(cache))); GPUs and TPUs update bf16 in place"
        )
    config = small_config(family, dtype)
    report = generation_report(config, BATCH, PROMPT, NEW)
    assert report.decode_loop_big_buffers == []


@pytest.mark.parametrize("family", ["llama_gqa", "opt"])
def test_a_donated_decode_step_updates_the_cache_in_place(family):
    config = small_config(family, "float32")
    graphdef, state = abstract_generation_model(config)
    settings = SamplingSettings(eos_id=0, pad_id=0, max_new_tokens=NEW, greedy=True)
    step = compile_decode_step(graphdef, state, BATCH, PROMPT, NEW, settings)
    text = step.as_text()
    assert entry_big_buffers(text, layer_cache_elements(config)) == []
    # every cache buffer of the output is the donated input buffer itself
    aliases = text.split("input_output_alias={", 1)[1].split("\n", 1)[0]
    assert aliases.count("may-alias") + aliases.count("must-alias") >= 2 * config.num_layers
    one_buffer_bytes = layer_cache_elements(config) * config.compute_dtype.itemsize
    assert step.memory_analysis().temp_size_in_bytes < one_buffer_bytes  # not even one layer's keys are copied


@pytest.mark.parametrize("family", ["llama_gqa", "opt"])
def test_generate_temporary_memory_is_the_cache_plus_one_layers_prefill(family):
    """float32, so that the CPU backend's bfloat16 upcasts (it has no bf16 matmul) do not count."""
    config = small_config(family, "float32")
    report = generation_report(config, BATCH, PROMPT, NEW)
    assert report.generate_temp_bytes <= report.cache_bytes + report.prefill_temp_bytes, report.summary()


def test_the_checker_sees_a_cache_copy():
    """Negative control: a loop that rewrites its whole cache every step is caught."""

    def loop(cache):
        return jax.lax.fori_loop(0, 4, lambda i, c: jnp.roll(c, 1, axis=2) * 2, cache)

    cache = jax.ShapeDtypeStruct((BATCH, 2, PROMPT + NEW, 16), jnp.float32)
    text = jax.jit(loop, donate_argnums=0).lower(cache).compile().as_text()
    assert decode_loop_big_buffers(text, BATCH * 2 * (PROMPT + NEW) * 16)
