"""The refill engine (continuous batching) against static generation: the same tokens row for row,
log-probs within float32 rounding, whatever the slots, the chunk, the queue and the layout; and a
KV cache sized by the slots, not the rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import padded_batch, save_tiny_model, tiny_hf_configs

from jaxrlhf.generation.compiled_report import generate_temp_bytes
from jaxrlhf.generation.generate import SamplingSettings, generate_from_state
from jaxrlhf.generation.hybrid_engine import HybridEngine
from jaxrlhf.generation.layout import to_generation_layout
from jaxrlhf.models import DecoderConfig, load_pretrained
from jaxrlhf.models.decoder import CausalLM
from jaxrlhf.parallel import TRAINING_RULES, make_mesh

EOS, PAD, NEW = 7, 1, 10
FAMILY = "llama_gqa_llama3"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(FAMILY, str(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def split_model(model_dir):
    return nnx.split(to_generation_layout(load_pretrained(model_dir)))


def prompts(rows: int = 7):
    lengths = [6, 3, 8, 1, 5, 2, 7, 4][:rows]  # different lengths, left padded
    ids, mask = padded_batch(lengths, 8, left=True, seed=3)
    return jnp.asarray(ids), jnp.asarray(mask)


def static_settings(greedy: bool, eos: int = EOS) -> SamplingSettings:
    return SamplingSettings(eos_id=eos, pad_id=PAD, max_new_tokens=NEW, temperature=1.0, greedy=greedy)


def refill(settings: SamplingSettings, slots: int, chunk: int = 0) -> SamplingSettings:
    return dataclasses.replace(settings, engine="refill", slots=slots, refill_chunk=chunk)


def assert_same_tokens(out, expected):
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(out.attention_mask), np.asarray(expected.attention_mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "greedy,samples,slots,chunk",  # 7 (or 21) rows: never a multiple of the slots
    [(False, 1, 3, 1), (True, 3, 4, 2), (False, 3, 5, 0), (True, 1, 5, 0)],
    ids=["sampled-3slots", "greedy-n3-4slots", "sampled-n3-5slots", "greedy-5slots"],
)
def test_refill_equals_static(split_model, greedy, samples, slots, chunk):
    graphdef, state = split_model
    ids, mask = prompts()
    key = jax.random.key(5)
    settings = static_settings(greedy)
    expected = generate_from_state(graphdef, state, ids, mask, key, settings, samples_per_prompt=samples)
    out = generate_from_state(
        graphdef, state, ids, mask, key, refill(settings, slots, chunk), samples_per_prompt=samples
    )
    assert_same_tokens(out, expected)
    assert int(out.steps) > int(expected.steps)  # fewer slots than rows: more, smaller decode steps


def test_answers_ending_at_the_first_token_and_at_the_limit(split_model):
    """EOS chosen as one row's greedy first token: that row ends at once (its slot is free before
    any decode step); per-row limits end the others at 1, 2, ... max_new_tokens."""
    graphdef, state = split_model
    ids, mask = prompts()
    key = jax.random.key(0)
    first = int(generate_from_state(graphdef, state, ids, mask, key, static_settings(True)).tokens[0, ids.shape[1]])
    settings = static_settings(True, eos=first)
    limits = jnp.asarray([NEW, 1, 2, NEW, 5, NEW, 3])
    expected = generate_from_state(graphdef, state, ids, mask, key, settings, answer_limits=limits)
    lengths = np.asarray(expected.attention_mask[:, ids.shape[1] :].sum(1))
    assert lengths[0] == 1 and lengths[1] == 1 and lengths[2] <= 2 and lengths[6] <= 3
    assert lengths.max() == NEW  # some row runs to the limit
    for slots, chunk in [(2, 1), (3, 3), (7, 2)]:
        out = generate_from_state(graphdef, state, ids, mask, key, refill(settings, slots, chunk), answer_limits=limits)
        assert_same_tokens(out, expected)


def test_slots_default_to_one_per_row(split_model):
    """With a slot per row the slots are filled at once: the same decode steps as static."""
    graphdef, state = split_model
    ids, mask = prompts()
    key = jax.random.key(1)
    expected = generate_from_state(graphdef, state, ids, mask, key, static_settings(False))
    out = generate_from_state(graphdef, state, ids, mask, key, refill(static_settings(False), 0))
    assert_same_tokens(out, expected)
    assert int(out.steps) == int(expected.steps) - 1  # static's count includes the first (prefill) token


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_refill_tensor_parallel(model_dir, greedy):
    """fsdp 4 x tensor 2 on 8 devices (slots sharded over the data axes, heads over tensor) and
    tensor 2 alone: refill equals static on one device."""
    ids, mask = prompts(8)
    key = jax.random.key(2)
    graphdef, state = nnx.split(to_generation_layout(load_pretrained(model_dir)))
    expected = generate_from_state(graphdef, state, ids, mask, key, static_settings(greedy), samples_per_prompt=2)
    for mesh in (make_mesh(fsdp=4, tensor=2), make_mesh(fsdp=1, tensor=2, devices=jax.devices()[:2])):
        sharded = nnx.split(load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES))
        engine = HybridEngine(sharded[0], (sharded[1],), mesh, 2, refill(static_settings(greedy), 4, 2))
        out, _ = engine.generate((sharded[1],), ids, mask, key, samples_per_prompt=2)
        assert_same_tokens(out, expected)


def test_slots_must_divide_over_the_data_axes(model_dir):
    mesh = make_mesh(fsdp=4, tensor=2)
    graphdef, state = nnx.split(load_pretrained(model_dir, mesh=mesh, rules=TRAINING_RULES))
    with pytest.raises(ValueError, match="slots=6"):
        HybridEngine(graphdef, (state,), mesh, 2, refill(static_settings(True), 6))


def test_refill_memory_grows_with_slots_not_rows():
    """XLA's temporary memory: 4x the rows at the same slots adds only the [rows, new] outputs;
    twice the slots adds about a slot cache's worth per slot."""
    config = DecoderConfig.from_hf(tiny_hf_configs()[FAMILY].to_dict())
    prompt_len, new = 64, 64
    settings = refill(SamplingSettings(eos_id=EOS, pad_id=PAD, max_new_tokens=new, greedy=True), 8, 4)
    slot_cache = 2 * config.num_layers * config.num_kv_heads * (prompt_len + new) * config.head_dim * 4
    small = generate_temp_bytes(config, 32, prompt_len, settings)
    many_rows = generate_temp_bytes(config, 128, prompt_len, settings)
    more_slots = generate_temp_bytes(config, 32, prompt_len, dataclasses.replace(settings, slots=16))
    static = generate_temp_bytes(config, 128, prompt_len, dataclasses.replace(settings, engine="static"))
    per_row_outputs = 3 * 4 * new + 4 * 2 * prompt_len  # tokens, log-probs, mask; the prompts' copies
    print(f"slot cache {slot_cache}: 32 rows {small}, 128 rows {many_rows}, 16 slots {more_slots}, static {static}")
    assert many_rows - small <= 96 * per_row_outputs * 1.5
    assert more_slots - small >= 8 * slot_cache
    assert static > many_rows + 100 * slot_cache  # static holds a cache row for every row


def test_refill_with_the_pallas_kernel_and_a_sliding_window(tmp_path):
    """bfloat16 like a real run: the Mosaic GPU decode kernel (interpret mode on CPU) reads each
    slot's own key range, narrowed by a window shorter than the answers (without a window:
    test_generate's kernel test); the tokens are static generation's with the reference attention."""
    ids, mask = prompts()
    path = save_tiny_model("llama_mqa_headdim64", str(tmp_path))
    model = to_generation_layout(load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16"))
    state = nnx.state(model)

    def tokens(window, **engine):
        config = dataclasses.replace(model.config, layer_windows=(window,) * model.config.num_layers)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(config, nnx.Rngs(0))))
        settings = dataclasses.replace(static_settings(True), **engine)
        return np.asarray(generate_from_state(graphdef, state, ids, mask, jax.random.key(0), settings).tokens)

    expected = tokens(5, attention="reference")
    np.testing.assert_array_equal(tokens(5, attention="pallas", engine="refill", slots=3), expected)
    np.testing.assert_array_equal(tokens(5, attention="reference", engine="refill", slots=3), expected)
